"""Load test of ``bloodcell serve``: N requests to POST /predict from C concurrent clients on loopback.

Usage:
    python bench/load_test.py                                  # untrained cnn4x32, 200 requests, 8 clients
    python bench/load_test.py --checkpoint runs/cnn4x32 --image cell.jpeg --requests 1000 --json out.json

The server runs in its own process (``python -m bloodcell.cli serve``) on 127.0.0.1 and a free port,
so that the clients do not share its interpreter. Latency is measured by the client, per request,
from sending to the parsed answer; throughput is requests completed per wall-clock second.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def summary(latencies: list[float], errors: list[str], requests: int, concurrency: int, wall: float) -> dict:
    """A load run's figures: counts, errors (the first 3), throughput and latency percentiles (ms)."""
    done = len(latencies)
    qs = statistics.quantiles(latencies, n=100) if done >= 2 else [float("nan")] * 99
    return {"requests": requests, "concurrency": concurrency, "ok": done, "errors": len(errors),
            "error_examples": errors[:3], "timed_out": done + len(errors) < requests,
            "seconds": wall, "throughput_rps": done / wall if wall > 0 else 0.0,
            "p50_ms": 1e3 * qs[49], "p95_ms": 1e3 * qs[94], "p99_ms": 1e3 * qs[98],
            "max_ms": 1e3 * max(latencies, default=0)}


def load(url: str, payload: bytes, requests: int = 200, concurrency: int = 8, timeout: float = 120.0,
         filename: str = "cell.jpeg", content_type: str = "image/jpeg") -> dict:
    """Send ``requests`` POST /predict from ``concurrency`` threads; latency percentiles and errors."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    todo = iter(range(requests))
    deadline = time.monotonic() + timeout

    def client() -> None:
        with httpx.Client(base_url=url, timeout=30.0) as c:
            while time.monotonic() < deadline:
                with lock:
                    if next(todo, None) is None:
                        return
                t0 = time.perf_counter()
                try:
                    r = c.post("/predict", files={"file": (filename, payload, content_type)})
                    ok = r.status_code == 200 and "class" in r.json()
                    what = f"HTTP {r.status_code}: {r.text[:100]}"
                except httpx.HTTPError as e:
                    ok, what = False, f"{type(e).__name__}: {e}"
                dt = time.perf_counter() - t0
                with lock:
                    (latencies.append(dt) if ok else errors.append(what))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 5)
    return summary(latencies, errors, requests, concurrency, time.perf_counter() - t0)


def multipart_request(host: str, port: int, payload: bytes, filename: str = "cell.jpeg",
                      content_type: str = "image/jpeg", path: str = "/predict",
                      headers: dict | None = None) -> bytes:
    """The bytes of one keep-alive POST of ``payload`` as multipart field ``file``."""
    boundary = "bloodcellbench7d3f"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n{extra}\r\n")
    return head.encode() + body


def fast_load(url: str, payload: bytes, requests: int = 200, concurrency: int = 8, timeout: float = 120.0,
              headers: dict | None = None, progress=None) -> dict:
    """As ``load``, from ``concurrency`` asyncio connections that send pre-built requests and parse
    only the status line and Content-Length: a client that costs the shared CPU little, so that
    the figure is the server's. Each answer must be 200 with a class in it. ``progress(n)`` is
    called after each answer with the number answered so far; ``latencies_ms`` lists them all."""
    import asyncio
    from urllib.parse import urlsplit

    u = urlsplit(url)
    request = multipart_request(u.hostname, u.port, payload, headers=headers)
    latencies: list[float] = []
    errors: list[str] = []
    left = [requests]

    async def client() -> None:
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        try:
            while left[0] > 0:
                left[0] -= 1
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                body = await reader.readexactly(length)
                dt = time.perf_counter() - t0
                if status == 200 and b'"class"' in body:
                    latencies.append(dt)
                else:
                    errors.append(f"HTTP {status}: {body[:100]!r}")
                if progress is not None:
                    progress(len(latencies) + len(errors))
        except (OSError, asyncio.IncompleteReadError, ValueError, StopIteration) as e:
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            writer.close()

    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(concurrency))), timeout)
        return time.perf_counter() - t0

    try:
        import uvloop

        wall = uvloop.run(main())
    except ImportError:
        wall = asyncio.run(main())
    return {**summary(latencies, errors, requests, concurrency, wall),
            "latencies_ms": [1e3 * t for t in latencies]}


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 60.0) -> None:
    """Poll GET /health until the server answers."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become healthy in time")


def main(argv: list[str] | None = None) -> dict:
    """python bench/load_test.py --requests 200 --concurrency 8"""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="run folder or checkpoint (default: an untrained cnn4x32, 64 px)")
    ap.add_argument("--image", help="image file to send (default: a generated 320 x 240 JPEG)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=120.0, help="bound on the whole test, seconds")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).parent))  # the sibling bench script, not the package
    from infer_speed import jpeg_bytes, make_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or str(make_checkpoint(Path(tmp), "cnn4x32", 64))
        payload = Path(args.image).read_bytes() if args.image else jpeg_bytes()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "bloodcell.cli", "serve", ckpt, "--host", "127.0.0.1",
                                 "--port", str(port), "--log-level", "warning", "--backend", args.backend])
        try:
            wait_healthy(url, proc)
            load(url, payload, requests=16, concurrency=2)  # warm-up
            res = load(url, payload, args.requests, args.concurrency, args.timeout)
            import httpx

            res["backend"] = httpx.get(url + "/health").json()["backend"]
        finally:
            proc.terminate()
            proc.wait(10)
    res["payload_bytes"] = len(payload)
    print(f"{res['ok']}/{res['requests']} ok, {res['errors']} errors, {res['concurrency']} clients, "
          f"{res['seconds']:.2f}s: {res['throughput_rps']:.0f} requests/s, p50 {res['p50_ms']:.1f} ms, "
          f"p95 {res['p95_ms']:.1f} ms, max {res['max_ms']:.1f} ms ({res['backend']})")
    for e in res["error_examples"]:
        print("  error:", e)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    res = main()
    sys.exit(1 if res["errors"] or res["timed_out"] else 0)
