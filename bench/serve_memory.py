"""The server's memory: resident at idle for an .onnx file and for a run folder, and what 16
concurrent uploads of a 12,000 x 12,000 PNG cost it, under the default pixel limit and the old one.

Usage:
    python bench/serve_memory.py --onnx model.onnx --run RUN_DIR --image cell.jpeg
    python bench/serve_memory.py --onnx model.onnx --limits 25,400 --json out.json

Each server runs in its own process (``bloodcell serve``) on 127.0.0.1; resident memory is VmRSS
from /proc, read after 200 requests of ``--image`` (idle), and, during the giant uploads, every
10 ms together with a GET /health, plus VmHWM (the kernel's peak) at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from load_test import fast_load, free_port, wait_healthy  # noqa: E402
from soak import rss_mb  # noqa: E402


def giant_png(w: int = 12_000, h: int = 12_000) -> bytes:
    """A valid all-black w x h RGB PNG, built row by row (the pixels are never held)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(1 + 3 * w)
    body = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def serve(target: str, *flags: str):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bloodcell", "serve", target, "--port", str(port),
                             "--log-level", "warning", *flags], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, 180)
    return proc, url


def idle(target: str, payload: bytes) -> dict:
    proc, url = serve(target)
    try:
        start = rss_mb(proc.pid)
        res = fast_load(url, payload, 200, 8)
        time.sleep(1)
        return {"served": Path(target).name, "start_mb": start, "idle_mb": rss_mb(proc.pid),
                "errors": res["errors"]}
    finally:
        proc.terminate()
        proc.wait(30)


def giant(target: str, payload: bytes, limit_mp: float, n: int = 16) -> dict:
    import httpx

    proc, url = serve(target, "--max-megapixels", str(limit_mp))
    try:
        fast_load(url, payload, 200, 8)
        base = rss_mb(proc.pid)
        png = giant_png()
        peak, health, answers = [base], [], []

        def upload():
            r = httpx.post(url + "/predict", files={"file": ("huge.png", png, "image/png")}, timeout=600)
            answers.append(r.status_code)

        t0 = time.perf_counter()
        senders = [threading.Thread(target=upload) for _ in range(n)]
        for t in senders:
            t.start()
        while any(t.is_alive() for t in senders):
            peak[0] = max(peak[0], rss_mb(proc.pid))
            try:
                health.append(httpx.get(url + "/health", timeout=10).status_code)
            except httpx.HTTPError:
                health.append(0)
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        top = max(peak[0], hwm_mb(proc.pid))
        return {"limit_mp": limit_mp, "png_bytes": len(png), "answers": sorted(set(answers)),
                "n_answers": len(answers), "health_ok": sum(h == 200 for h in health), "health_polls": len(health),
                "idle_mb": base, "peak_above_idle_mb": top - base, "seconds": wall}
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv: list[str] | None = None) -> dict:
    """python bench/serve_memory.py --onnx model.onnx --run RUN_DIR --image cell.jpeg"""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--run", help="a run folder or checkpoint to compare (optional)")
    ap.add_argument("--image", required=True, help="a JPEG for the warm-up requests")
    ap.add_argument("--limits", default="25,400", help="--max-megapixels values for the giant PNGs")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    payload = Path(args.image).read_bytes()
    out = {"idle": [idle(t, payload) for t in [args.onnx, *([args.run] if args.run else [])]],
           "giant": [giant(args.onnx, payload, float(mp)) for mp in args.limits.split(",")]}
    for r in out["idle"]:
        print(f"{r['served']}: resident {r['start_mb']:.0f} MB after start, {r['idle_mb']:.0f} MB idle "
              f"after 200 requests ({r['errors']} errors)")
    for r in out["giant"]:
        print(f"16 x 12,000 x 12,000 PNG ({r['png_bytes']:,} B) at --max-megapixels {r['limit_mp']:g}: "
              f"answers {r['answers']} ({r['n_answers']}), /health {r['health_ok']}/{r['health_polls']} ok, "
              f"peak {r['peak_above_idle_mb']:+.0f} MB above idle ({r['idle_mb']:.0f} MB), {r['seconds']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
