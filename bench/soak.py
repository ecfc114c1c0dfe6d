"""Soak test of ``bloodcell serve model.onnx``: 10,000 requests from 32 clients, no error allowed;
latency percentiles, and the server's resident memory after the first 1,000 and at the end.

Usage:
    python bench/soak.py --onnx model.onnx --image cell.jpeg --json out.json
    python bench/soak.py --requests 10000 --concurrency 32 --workers 1

The server runs in its own process on 127.0.0.1 (``serve_speed.start_server``); its resident set
(VmRSS, /proc, summed over its worker processes) is read while the clients (``load_test.fast_load``)
run: after request 1,000 and every 1,000 after that. The pass mark: no error, and the memory at
the end within 10 % of the memory after the first 1,000.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the sibling bench scripts, not the package
from load_test import fast_load, free_port  # noqa: E402
from serve_speed import add_server_args, model_and_payload, start_server  # noqa: E402


def rss_mb(pid: int) -> float:
    """Resident MB of a process and its children (uvicorn workers)."""
    total = 0.0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(c) for c in children.read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


def main(argv: list[str] | None = None) -> dict:
    """python bench/soak.py --requests 10000 --concurrency 32"""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(ap)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        onnx, payload = model_and_payload(args, Path(tmp))
        port = free_port()
        proc = start_server(onnx, port, args)
        memory: dict[int, float] = {0: rss_mb(proc.pid)}

        def progress(n: int) -> None:
            if n % 1000 == 0:
                memory[n] = rss_mb(proc.pid)

        try:
            res = fast_load(f"http://127.0.0.1:{port}", payload, args.requests, args.concurrency,
                            timeout=3600, progress=progress)
            memory[args.requests] = rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
    first = memory.get(1000, float("nan"))
    end = memory[args.requests]
    growth = end / first - 1
    lat = res.pop("latencies_ms")
    result = {**res, "workers": args.workers, "memory_mb": memory, "memory_after_1000_mb": first,
              "memory_end_mb": end, "growth_after_1000": growth, "mean_ms": statistics.fmean(lat),
              "passed": res["errors"] == 0 and not res["timed_out"] and abs(growth) <= 0.10}
    print(f"{res['ok']}/{res['requests']} ok, {res['errors']} errors, {args.concurrency} clients, "
          f"{res['seconds']:.1f} s ({res['throughput_rps']:.0f} req/s): p50 {res['p50_ms']:.1f} ms, "
          f"p95 {res['p95_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, max {res['max_ms']:.1f} ms")
    print("resident MB: " + ", ".join(f"{k}: {v:.1f}" for k, v in sorted(memory.items())))
    print(f"end vs after 1,000: {100 * growth:+.1f} % ({'pass' if result['passed'] else 'FAIL'})")
    for e in res["error_examples"]:
        print("  error:", e)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
