#!/usr/bin/env python
"""python bench/data_speed.py [--data PATH] [--size 64] [--resize squash]

Images/s to build the decoded cache of the full Kaggle TRAIN split (a fresh, empty cache folder, all
cores), and images/s to read one augmented epoch from it (BatchLoader, batch 64, augment strong),
the two figures the data-layer issue asks for.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from bloodcell.data import BatchLoader, discover_grouped
from bloodcell.data.cache import build_cache
from bloodcell.runtime import physical_cores


def main() -> None:
    """Measure and print a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("BLOODCELL_TEST_DATA", "../shared/data")) / "blood-cells"
    ap.add_argument("--data", default=str(default))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--resize", default="squash")
    ap.add_argument("--augment", default="strong")
    args = ap.parse_args()
    torch.set_num_threads(physical_cores())

    t = time.perf_counter()
    src = discover_grouped(args.data)
    train = [it for it in src.items if it.split == "train"]
    t_discover = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        arr, errors, cached = build_cache(train, args.size, args.resize, cache_dir=cache)
        t_build = time.perf_counter() - t
        assert not cached and not any(errors)
        t = time.perf_counter()
        build_cache(train, args.size, args.resize, cache_dir=cache)
        t_hit = time.perf_counter() - t

        class S:  # a Split view over the whole TRAIN cache
            images = arr
            labels = torch.tensor([it.label for it in train]).numpy()

        loader = BatchLoader(S, 64, shuffle=True, augment=args.augment, seed=0)
        loader.set_epoch(1)
        t = time.perf_counter()
        n = sum(len(y) for _, y in loader)
        t_epoch = time.perf_counter() - t
    print(f"| what ({len(train):,} Kaggle TRAIN images, {args.size} px, {args.resize}) | seconds | images/s |")
    print("|---|---:|---:|")
    print(f"| list + hash files (discover) | {t_discover:.1f} | {len(train) / t_discover:,.0f} |")
    print(f"| build cache ({physical_cores()} processes, decode + resize + write) | {t_build:.1f} | "
          f"{len(train) / t_build:,.0f} |")
    print(f"| open the cache again (hit: no decoding) | {t_hit:.2f} | - |")
    print(f"| one augmented epoch from the cache (batch 64, augment {args.augment}) | {t_epoch:.1f} | "
          f"{n / t_epoch:,.0f} |")


if __name__ == "__main__":
    main()
