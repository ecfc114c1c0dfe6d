#!/usr/bin/env python
"""python bench/count_speed.py [--fields 100] [--model builtin] [--detector builtin] [--threads 2]

How fast a field is counted on this CPU: BCCD's 640 x 480 fields ($BLOODCELL_TEST_DATA/blood-cells/
dataset-master/JPEGImages), side by side in one run and interleaved, field by field:

- detector alone: decode the field, scale it, find its cells;
- found, cropped and typed: the same, then every white cell cropped and typed by the classifier
  (inference.count.FieldCounter, what `bloodcell count` and POST /count run per field);

then a whole `bloodcell count` of those fields as one slide (a process: start-up, the crops and tables
written, report.html), the time a lab waits for a slide. Prints the median and 90th percentile per
field and the CPU it ran on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(os.environ.get("BLOODCELL_TEST_DATA", "../shared/data"))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text()
            kind = "AMX" if "amx_tile" in flags else "AVX-512" if "avx512f" in flags else "AVX2"
            return f"{line.split(':', 1)[1].strip()} ({kind}, {os.cpu_count()} cores)"
    return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=100)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--detector", default="builtin")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    from bloodcell.data.images import decode_field
    from bloodcell.inference.count import FieldCounter, read_field
    from bloodcell.inference.detect import Detector
    from bloodcell.inference.predict import Predictor
    from bloodcell.models.builtin import resolve_run

    files = sorted((ROOT / "blood-cells" / "dataset-master" / "JPEGImages").glob("*.jpg"))[:args.fields]
    det = Detector(resolve_run(args.detector, "detector"), threads=args.threads)
    counter = FieldCounter(Predictor(resolve_run(args.model, "classifier"), threads=args.threads), det)
    for f in files[:5]:  # warm up both paths
        counter.count_field(read_field(f))
    alone, full, cells = [], [], 0
    for f in files:
        t0 = time.perf_counter()
        img, s, wh = decode_field(f, det.input_size)
        det.detect_scaled([img], [s], [wh])
        alone.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = counter.count_field(read_field(f))
        full.append(time.perf_counter() - t0)
        cells += len(r["cells"])

    def ms(xs) -> str:
        xs = sorted(xs)
        return f"median {1e3 * statistics.median(xs):.1f} ms, p90 {1e3 * xs[int(0.9 * (len(xs) - 1))]:.1f} ms"

    print(f"CPU: {cpu_name()}; {len(files)} fields of 640 x 480, {cells} white cells typed")
    print(f"detector alone:            {ms(alone)}")
    print(f"found, cropped and typed:  {ms(full)}  ({statistics.median(full) / statistics.median(alone):.2f}x)")
    with tempfile.TemporaryDirectory() as tmp:
        slide = Path(tmp) / "slide"
        slide.mkdir()
        for f in files:
            os.symlink(f, slide / f.name)
        t0 = time.perf_counter()
        cmd = ["bloodcell", "count", str(slide), "--out", str(Path(tmp) / "out"), "--model", args.model,
               "--detector", args.detector, "--no-progress"] + (["--threads", str(args.threads)] if args.threads else [])
        subprocess.run(cmd, check=True, capture_output=True)
        whole = time.perf_counter() - t0
        print(f"bloodcell count, one slide of {len(files)} fields (a process, with report.html): {whole:.1f} s")
        shutil.rmtree(slide)


if __name__ == "__main__":
    main()
