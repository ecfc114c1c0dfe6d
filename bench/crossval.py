#!/usr/bin/env python
"""python bench/crossval.py [--data PATH] [--folds 5] [--models cnn2x32,cnn4x64,cnn4x32,vgg3] [--set key=value ...]

One split against K-fold cross-validation on a small lab (default: BLOODCELL_TEST_DATA's
other-labs/tecom, 300 cells), the study's four models, one run: `compare` with one train/val split
into OUT/single, then the same protocol with `folds: K` into OUT/folds<K> (resumable: finished
models and folds are kept). Prints per model the single split's val and test accuracy beside the
folds' mean ± sd (sample sd), their range and the out-of-fold accuracy (every train/val cell
scored once), and the ratio of the training minutes (K folds / one split) measured in this run.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import yaml

from bloodcell.studies.compare import compare

ROOT = Path(os.environ.get("BLOODCELL_TEST_DATA", "../shared/data"))
STUDY_MODELS = "cnn2x32,cnn4x64,cnn4x32,vgg3"


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def main() -> None:
    """Both protocols, then the Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT / "other-labs" / "tecom"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--models", default=STUDY_MODELS)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config keys (default budget: image_size=48 epochs=10 threads=1)")
    ap.add_argument("--out", default="bench/out/crossval")
    args = ap.parse_args()
    shared = {"data": args.data, "image_size": 48, "epochs": 10, "threads": 1, "precision": "fp32"}
    shared.update({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    models = args.models.split(",")
    t = time.perf_counter()
    one = compare(models, shared, Path(args.out) / "single", progress=False, report=False,
                  command="bench/crossval.py single")
    t_one = time.perf_counter() - t
    t = time.perf_counter()
    cv = compare(models, {**shared, "folds": args.folds}, Path(args.out) / f"folds{args.folds}", progress=False,
                 report=False, command=f"bench/crossval.py folds {args.folds}")
    t_cv = time.perf_counter() - t
    ds = one["dataset"]["splits"]
    n = {k: sum(v["images"].values()) for k, v in ds.items()}
    print(f"data {args.data}: {', '.join(f'{k} {v}' for k, v in n.items())}; {args.folds} folds of the "
          f"{n['train'] + n['val']} train+val cells; settings {shared}")
    print(f"| model | one split: val acc | one split: test acc | {args.folds}-fold val acc (own fold) | "
          f"{args.folds}-fold test acc | test acc range | out-of-fold acc |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for a, b in zip(one["models"], cv["models"], strict=True):
        v, te = b["cv"]["val"]["accuracy"], b["cv"]["test"]["accuracy"]
        print(f"| {a['model']} | {pct(a['val']['accuracy'])} | {pct(a['test']['accuracy'])} | "
              f"{pct(v['mean'])} ± {pct(v['sd'])} | {pct(te['mean'])} ± {pct(te['sd'])} | "
              f"{pct(te['min'])}–{pct(te['max'])} | {pct(b['out_of_fold']['accuracy'])} |")
    m_one = sum(r["train_minutes"] for r in one["models"])
    m_cv = sum(r["train_minutes"] for r in cv["models"])
    print(f"training minutes: one split {m_one:.2f}, {args.folds} folds {m_cv:.2f} (ratio {m_cv / m_one:.2f}); "
          f"wall this session {t_one / 60:.2f} and {t_cv / 60:.2f} min")


if __name__ == "__main__":
    main()
