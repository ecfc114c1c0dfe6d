#!/usr/bin/env python
"""python bench/lolo_ensemble.py RECIPE_A_OUT RECIPE_B_OUT [--seeds 0,1,2]

Leave one lab out: does the mean of two recipes' probabilities read a lab never seen better than
either? Each OUT is a bench/crosslab.py (or bench/label_curve.py) output folder, OUT/seed<N>/folds/
<k>-<lab>/held_out/predictions_all.csv: the fold's model on every image of its held-out lab. For
each seed and held-out lab, the accuracy of A, of B, and of the mean of their class probabilities
(the same images, matched by path); prints the mean ± sd over seeds as a Markdown table. Nothing of
a held-out lab chooses anything: the two recipes and the mean are fixed before looking.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from crosslab import mean_sd


def read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    classes = [k.removeprefix("p_") for k in rows[0] if k.startswith("p_")]
    probs = {r["path"]: np.array([float(r[f"p_{c}"]) for c in classes]) for r in rows}
    return probs, {r["path"]: r["label"] for r in rows}, classes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    got: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds.split(","):
        for fold in sorted((Path(args.a) / f"seed{seed}" / "folds").iterdir()):
            other = Path(args.b) / f"seed{seed}" / "folds" / fold.name / "held_out" / "predictions_all.csv"
            pa, labels, classes = read(fold / "held_out" / "predictions_all.csv")
            pb, _, classes_b = read(other)
            if classes != classes_b or set(pa) != set(pb):
                raise SystemExit(f"{fold.name}, seed {seed}: the two recipes scored other images or classes")
            y = [classes.index(labels[p]) for p in pa]
            lab = fold.name.split("-", 1)[1]
            row = got.setdefault(lab, {"a": [], "b": [], "mean": []})
            for key, pr in (("a", [pa[p] for p in pa]), ("b", [pb[p] for p in pa]),
                            ("mean", [(pa[p] + pb[p]) / 2 for p in pa])):
                row[key].append(float(np.mean(np.argmax(pr, 1) == y)))
    print(f"| held out | {Path(args.a).name} | {Path(args.b).name} | mean of both |")
    print("|---|---:|---:|---:|")
    for lab, row in got.items():
        print(f"| {lab} | {mean_sd(row['a'])} | {mean_sd(row['b'])} | {mean_sd(row['mean'])} |")
    means = {k: np.mean([np.mean(r[k]) for r in got.values()]) for k in ("a", "b", "mean")}
    print(f"| mean over labs | {100 * means['a']:.1f} | {100 * means['b']:.1f} | {100 * means['mean']:.1f} |")


if __name__ == "__main__":
    main()
