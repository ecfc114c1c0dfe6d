#!/usr/bin/env python
"""python bench/kaggle_groups.py [--data PATH] [--seed 0]

Which Kaggle images are copies of the same cell? The measurements behind ``group_by: similar``.

Every image becomes the colour histogram bloodcell groups by (``data.groups.histogram``). Per
class, it reports:

- how often an image's nearest neighbour in TRAIN (almost surely a copy of the same cell: see the
  distances) has the same K in its ``_K_N`` name, against the rate K would match by chance;
- the median distance from an image to its nearest neighbour in its own split, from a TEST
  image to the nearest TRAIN image (does TEST share cells with TRAIN?), and from a validation image
  to the nearest training image (is validation as far from what is learnt as TEST is?);
- for the validation split carved out of TRAIN (seed ``--seed``), the share of validation images
  with a near-twin (closer than the grouping threshold) in the training split, when the split is
  grouped by K (``group_by name``) and by look-alike copies (``group_by similar``);
- the number of groups each way.

Writes bench/out/kaggle_groups.md and .json.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np
from _common import OUT, default_data, machine_info, machine_md, md_table, write_outputs

from bloodcell.data.dataset import discover_grouped
from bloodcell.data.groups import SIMILAR_THRESHOLD, histograms
from bloodcell.data.layouts import KAGGLE_NAME
from bloodcell.data.splits import make_splits


def nearest(a: np.ndarray, b: np.ndarray, same: bool) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of each row of ``a``'s nearest row of ``b`` (itself excluded if same)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    d = (a64 * a64).sum(1)[:, None] + (b64 * b64).sum(1)[None, :] - 2 * a64 @ b64.T
    if same:
        np.fill_diagonal(d, np.inf)
    j = d.argmin(1)
    return d[np.arange(len(a)), j], j


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    ap.add_argument("--data", default=default_data())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    t0 = time.perf_counter()
    by = {how: discover_grouped(args.data, group_by=how) for how in ("name", "similar")}
    src = by["similar"]
    if src.layout != "kaggle":
        raise SystemExit(f"{args.data}: not the Kaggle blood-cells layout")
    feats = histograms([it.path for it in src.items], 2)
    row_of = {it.path: i for i, it in enumerate(src.items)}
    rows, result = [], {"classes": {}}
    for label, cls in enumerate(src.classes):
        idx = {s: [i for i, it in enumerate(src.items) if it.label == label and it.split == s]
               for s in ("train", "test")}
        k = np.array([KAGGLE_NAME.match(Path(src.items[i].path).name).group(1) for i in idx["train"]])
        f_tr, f_te = feats[idx["train"]], feats[idx["test"]]
        d_tr, j = nearest(f_tr, f_tr, same=True)
        shares_k = float((k[j] == k).mean())
        counts = Counter(k.tolist())
        chance = sum((n / len(k)) ** 2 for n in counts.values())
        d_te, _ = nearest(f_te, f_te, same=True)
        d_cross, _ = nearest(f_te, f_tr, same=False)
        twins, groups, val_to_train = {}, {}, {}
        for how, s in by.items():
            sp = make_splits(s.items, seed=args.seed)
            tr = [row_of[s.items[i].path] for i in sp["train"] if s.items[i].label == label]
            va = [row_of[s.items[i].path] for i in sp["val"] if s.items[i].label == label]
            d_va, _ = nearest(feats[va], feats[tr], same=False)
            twins[how] = float((d_va < SIMILAR_THRESHOLD).mean())
            val_to_train[how] = float(np.median(d_va))
            groups[how] = {sp_name: len({s.items[i].group for i in sp[sp_name] if s.items[i].label == label})
                           for sp_name in ("train", "val", "test")}
        result["classes"][cls] = {
            "nn_shares_k": shares_k, "k_chance": chance, "median_nn_train": float(np.median(d_tr)),
            "median_nn_test": float(np.median(d_te)), "median_test_to_train": float(np.median(d_cross)),
            "val_twin_share": twins, "median_val_to_train": val_to_train, "groups": groups}
        rows.append([cls, f"{100 * shares_k:.1f} % (chance {100 * chance:.1f} %)",
                     f"{np.median(d_tr):.4f} / {np.median(d_te):.4f}", f"{np.median(d_cross):.4f}",
                     f"{val_to_train['similar']:.4f}",
                     f"{100 * twins['name']:.1f} %", f"{100 * twins['similar']:.1f} %",
                     "{train} / {val} / {test}".format(**groups["name"]),
                     "{train} / {val} / {test}".format(**groups["similar"])])
    secs = time.perf_counter() - t0
    info = machine_info()
    md = f"""# Kaggle blood cells: which images are copies of one cell

{len(src.items):,} images; grouping threshold {SIMILAR_THRESHOLD} (squared distance of square-rooted \
colour histograms, data.groups); validation split seed {args.seed}; {secs:.0f} s in all.

{md_table(["class", "TRAIN: nearest image has the same K", "median nearest-image distance (TRAIN / TEST)",
           "median TEST-to-nearest-TRAIN distance", "median val-to-nearest-train distance (look-alike split)",
           "val images with a train twin, split by K",
           "... split by look-alike", "groups by K (train / val / test)",
           "groups by look-alike (train / val / test)"], rows)}

## Machine

{machine_md(info)}
"""
    base = write_outputs(args.out, "kaggle_groups", md, {"machine": info, **result})
    print(f"wrote {base}.md and .json")


if __name__ == "__main__":
    main()
