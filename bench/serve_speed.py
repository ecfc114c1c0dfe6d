"""The server against the model itself: ``bloodcell serve model.onnx`` from C clients vs the same
ONNX model in-process, one image at a time, from the same JPEG bytes; the ratio is the figure.

Usage:
    python bench/serve_speed.py --onnx model.onnx --image cell.jpeg --rounds 3 --json out.json
    python bench/serve_speed.py --workers 2 --concurrency 32 --requests 3000

The two are measured interleaved (round 1: in-process, then the server; round 2: ...), so a noisy,
shared machine biases neither; the medians over rounds are reported. In-process is what
``OnnxPredictor`` does per image (decode with draft, normalise, forward, probabilities), on the
threads the server would use. The server runs in its own process on 127.0.0.1 (its own workers);
the clients are ``load_test.fast_load`` (asyncio, pre-built requests: little CPU of their own).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the sibling bench scripts, not the package
from load_test import fast_load, free_port, wait_healthy  # noqa: E402

from bloodcell.data.images import decode_image  # noqa: E402
from bloodcell.inference.onnx import OnnxPredictor  # noqa: E402


def in_process_rate(onnx: str, payload: bytes, seconds: float, threads: int = 0) -> float:
    """Images per second, one at a time: JPEG bytes -> probabilities, as the server computes them."""
    p = OnnxPredictor(onnx, threads=threads)
    p.rows(decode_image(payload, p.image_size, p.resize)[None])  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        p.rows(decode_image(payload, p.image_size, p.resize)[None])
        n += 1
    return n / (time.perf_counter() - t0)


def start_server(onnx: str, port: int, args) -> subprocess.Popen:
    """``bloodcell serve`` in its own process; returns once /health answers."""
    cmd = [sys.executable, "-m", "bloodcell", "serve", onnx, "--port", str(port), "--log-level", "warning",
           "--workers", str(args.workers), "--decoders", str(args.decoders), "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    wait_healthy(f"http://127.0.0.1:{port}", proc, 120)
    return proc


def default_model(folder: Path) -> tuple[str, bytes]:
    """An untrained cnn4x32 at 64 px exported to ONNX, and a generated 320 x 240 JPEG."""
    from infer_speed import jpeg_bytes, make_checkpoint

    from bloodcell.inference.export import export_model

    out = folder / "bench.onnx"
    export_model(make_checkpoint(folder, "cnn4x32", 64), "onnx", out)
    return str(out), jpeg_bytes()


def add_server_args(ap: argparse.ArgumentParser) -> None:
    """The flags of the model, the request and the server (serve_speed.py and soak.py)."""
    ap.add_argument("--onnx", help="exported model (default: an untrained cnn4x32 at 64 px)")
    ap.add_argument("--image", help="JPEG to send (default: a generated 320 x 240 one)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--decoders", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", help="write the figures here")


def model_and_payload(args, folder: Path) -> tuple[str, bytes]:
    """The model file to serve and the bytes each request sends, as the flags say."""
    onnx, payload = default_model(folder) if not args.onnx else (args.onnx, b"")
    return onnx, Path(args.image).read_bytes() if args.image else payload


def main(argv: list[str] | None = None) -> dict:
    """python bench/serve_speed.py --onnx model.onnx --image cell.jpeg"""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(ap)
    ap.add_argument("--requests", type=int, default=3000, help="per round")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0, help="in-process measurement per round")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        onnx, payload = model_and_payload(args, Path(tmp))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(onnx, port, args)
        rates, serves = [], []
        try:
            fast_load(url, payload, requests=300, concurrency=args.concurrency)  # warm-up
            for _ in range(args.rounds):
                rates.append(in_process_rate(onnx, payload, args.seconds, args.threads))
                res = fast_load(url, payload, args.requests, args.concurrency, timeout=600)
                if res["errors"] or res["timed_out"]:
                    raise SystemExit(f"server errors: {res['error_examples']}")
                serves.append(res)
        finally:
            proc.terminate()
            proc.wait(30)
    rps = [r["throughput_rps"] for r in serves]
    ratios = [s / r for s, r in zip(rps, rates, strict=True)]
    med = {k: statistics.median(r[k] for r in serves) for k in ("p50_ms", "p95_ms", "p99_ms")}
    result = {"onnx": Path(onnx).name, "payload_bytes": len(payload), "workers": args.workers,
              "concurrency": args.concurrency, "requests_per_round": args.requests, "rounds": args.rounds,
              "cpus": os.cpu_count(), "in_process_img_s": rates, "server_rps": rps, "ratio": ratios,
              "ratio_median": statistics.median(ratios), **med,
              "p99_ms_all": [r["p99_ms"] for r in serves]}
    print(f"{args.workers} worker(s), {args.concurrency} clients, {args.requests} requests x {args.rounds} "
          f"rounds, {len(payload)} B JPEG")
    for i, (a, b, q) in enumerate(zip(rates, rps, ratios, strict=True)):
        print(f"round {i + 1}: in-process {a:,.0f} img/s, server {b:,.0f} req/s, ratio {q:.2f}, "
              f"p50 {serves[i]['p50_ms']:.1f} ms, p95 {serves[i]['p95_ms']:.1f} ms, p99 {serves[i]['p99_ms']:.1f} ms")
    print(f"median ratio {result['ratio_median']:.2f}, p99 {med['p99_ms']:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
