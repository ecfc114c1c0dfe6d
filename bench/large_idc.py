#!/usr/bin/env python
"""python bench/large_idc.py [--data PATH] [--n 277524] [--tiled /tmp/idc-tiled] [--size 50] [--epoch]

The breast histopathology (IDC) release's size on this machine: the real subset tiled, by symbolic
links to its patches (never copies), into an IDC tree of ``--n`` patches (the full release: 277,524)
in /tmp, then, with a fresh cache folder: discover (listing and hashing every file), the decoded
cache build (images/s, peak resident memory of this process and of its decoding workers, the
anonymous part sampled too) and its size on disk; with ``--epoch``, one training epoch of cnn2x32
on it (``bloodcell train --epochs 1 --threads 1`` in a child process: its peak resident memory,
sampled total and anonymous, and its wall time). Tile ``k`` of patient ``P`` is patient ``Pt<k>``.

The tiled copies are byte-identical links, so discover joins each real patient's copies into one
group (byte-identical files always share a group): the split has the subset's 19 groups. The
figures measured are the cache's and the loop's, which do not depend on that.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import machine_info, machine_md, md_table, peak_rss_mb, proc_status_mb, write_outputs

from bloodcell.data import discover
from bloodcell.data.cache import build_cache


def tile(src: Path, dst: Path, n: int) -> int:
    """Fill ``dst`` with ``n`` links to the patches of the IDC tree ``src`` (patient by patient)."""
    patches = sorted(src.glob("*/[01]/*.png"))
    if dst.exists():
        shutil.rmtree(dst)
    made, k = 0, 0
    while made < n:
        for p in patches:
            if made == n:
                break
            patient, cls = p.parts[-3], p.parts[-2]
            folder = dst / f"{patient}t{k}" / cls
            folder.mkdir(parents=True, exist_ok=True)
            (folder / p.name.replace(patient, f"{patient}t{k}", 1)).symlink_to(p.resolve())
            made += 1
        k += 1
    return made


class Sampler:
    """The peak of a process's VmRSS and RssAnon (/proc/PID/status), sampled every 0.2 s."""

    def __init__(self, pid: int | str = "self"):
        self.pid, self.peak, self.stop = pid, {"VmRSS": 0.0, "RssAnon": 0.0}, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    key, _, rest = line.partition(":")
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(rest.split()[0]) / 1024)
            except (OSError, ValueError):
                pass
            self.stop.wait(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def main() -> None:
    """Tile, discover, build the cache (and train one epoch); print and write a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=277_524, help="patches (the full release: 277,524)")
    ap.add_argument("--data", default=str(Path(os.environ.get("BLOODCELL_TEST_DATA", "../shared/data"))
                                          / "breast-histopathology"))
    ap.add_argument("--tiled", default="/tmp/idc-tiled")
    ap.add_argument("--size", type=int, default=50)
    ap.add_argument("--workers", type=int, default=0, help="decoding processes (0: all cores)")
    ap.add_argument("--epoch", action="store_true", help="also one training epoch (cnn2x32, 1 thread)")
    ap.add_argument("--out", default="bench/out/large_idc")
    args = ap.parse_args()
    info = machine_info()
    tiled = Path(args.tiled)
    t0 = time.perf_counter()
    made = tile(Path(args.data), tiled, args.n)
    t_tile = time.perf_counter() - t0
    cache = Path(tempfile.mkdtemp(prefix="bloodcell-large-cache-"))
    try:
        t0 = time.perf_counter()
        src = discover(tiled)
        t_discover = time.perf_counter() - t0
        with Sampler() as s:
            t0 = time.perf_counter()
            images, errors, _ = build_cache(src.items, args.size, "squash", cache, args.workers or None)
            t_build = time.perf_counter() - t0
        build = {"images": len(src.items), "seconds": t_build, "images_per_s": len(src.items) / t_build,
                 "peak_rss_mb": peak_rss_mb(), "peak_anon_mb": s.peak["RssAnon"],
                 "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                 "cache_mb": sum(f.stat().st_size for f in cache.glob("*.npy")) / 2**20,
                 "errors": sum(e is not None for e in errors), "now": proc_status_mb()}
        del images
        rows = [["patches (links)", f"{made:,}", f"tiled in {t_tile:.0f} s"],
                ["discover (list + hash)", f"{t_discover:.0f} s", f"{len(src.items) / t_discover:,.0f} files/s"],
                ["cache build", f"{t_build:.0f} s", f"{build['images_per_s']:,.0f} images/s"],
                ["build: peak RSS, this process", f"{build['peak_rss_mb']:,.0f} MB",
                 f"anonymous {build['peak_anon_mb']:,.0f} MB"],
                ["build: peak RSS, one decoding worker", f"{build['workers_peak_rss_mb']:,.0f} MB", ""],
                ["cache on disk", f"{build['cache_mb']:,.0f} MB", f"{args.size} x {args.size} x 3 uint8"]]
        result = {"machine": info, "n": made, "tile_s": t_tile, "discover_s": t_discover, "build": build}
        if args.epoch:
            run = Path(tempfile.mkdtemp(prefix="bloodcell-large-run-"))
            cmd = [sys.executable, "-m", "bloodcell", "train", "--data", str(tiled), "--model", "cnn2x32",
                   "--image-size", str(args.size), "--epochs", "1", "--threads", "1", "--cache-dir", str(cache),
                   "--out", str(run / "run"), "--quiet"]
            t0 = time.perf_counter()
            child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            with Sampler(child.pid) as s:
                _, status, usage = os.wait4(child.pid, 0)
            t_train = time.perf_counter() - t0
            log = child.stdout.read()
            child.returncode = os.waitstatus_to_exitcode(status)
            print(log)
            shutil.rmtree(run, ignore_errors=True)
            result["epoch"] = {"seconds": t_train, "peak_rss_mb": usage.ru_maxrss / 1024,
                               "peak_anon_mb": s.peak["RssAnon"], "rc": child.returncode, "log": log[-4000:]}
            rows += [["one epoch + evaluation (cnn2x32, 1 thread)", f"{t_train / 60:.1f} min",
                      f"exit {child.returncode}"],
                     ["training: peak RSS", f"{usage.ru_maxrss / 1024:,.0f} MB",
                      f"anonymous {s.peak['RssAnon']:,.0f} MB"]]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    md = md_table(["what", "figure", "note"], rows, "lrl") + "\n\n" + machine_md(info)
    write_outputs(args.out, "large_idc", md, result)


if __name__ == "__main__":
    main()
