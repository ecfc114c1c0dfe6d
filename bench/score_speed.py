#!/usr/bin/env python
"""python bench/score_speed.py [--configs cnn4x32@64,vgg3@64,resnet18@64] [--images 2048] [--rounds 3] [--threads 2]

Scoring a whole split, as `evaluate`, a training run's test split and a held-out lab are scored:
``training.engine.predict_probs`` over a BatchLoader of N images with 8-view TTA, in fp32, through
PyTorch (eager, channels-last) and through ONNX Runtime (the model exported in memory first; the
export is inside the timed call, as it is in a run). The two are interleaved round by round, so a
shared machine biases neither; prints the median images/s (each image's 8 views counted once), the
ratio and the export's seconds. Untrained models: the speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _common import cpu_model

from bloodcell.cpu import physical_cores
from bloodcell.data import BatchLoader, Split
from bloodcell.models import get_model
from bloodcell.training.engine import onnx_scorer, predict_probs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="cnn4x32@64,vgg3@64,resnet18@64", help="MODEL@SIZE,...")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="0: the physical cores")
    args = ap.parse_args()
    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    print(f"{cpu_model()}, {threads} threads, {args.images} images, 8-view TTA, fp32, batch 256")
    print("| config | PyTorch img/s | ONNX Runtime img/s | ratio | export s |")
    print("|---|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    cpu = torch.device("cpu")
    for config in args.configs.split(","):
        name, size = config.split("@")
        size = int(size)
        model = get_model(name, num_classes=4, image_size=size).eval()
        n = args.images
        split = Split(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 4, n),
                      np.arange(n), [str(i) for i in range(n)])
        t0 = time.perf_counter()
        onnx_scorer(model, size)
        export_s = time.perf_counter() - t0
        rates: dict[str, list[float]] = {"torch": [], "onnx": []}
        for _ in range(args.rounds):
            for backend in rates:
                t0 = time.perf_counter()
                predict_probs(model, BatchLoader(split, 256), cpu, tta=True, backend=backend)
                rates[backend].append(n / (time.perf_counter() - t0))
        a, b = statistics.median(rates["torch"]), statistics.median(rates["onnx"])
        print(f"| {config} | {a:,.0f} | {b:,.0f} | {b / a:.2f}x | {export_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
