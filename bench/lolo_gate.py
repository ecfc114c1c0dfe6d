#!/usr/bin/env python
"""python bench/lolo_gate.py COLOUR_OUT GREY_OUT [--seeds 0,1,2] [--out bench/out/lolo-gate]

Leave one lab out: does the colour gate (`bloodcell gate`: colour for an image whose colours look
like a training lab's, grey levels for any other) keep the colour recipe's reading at home and the
grey recipe's on a lab never seen? COLOUR_OUT and GREY_OUT are bench/crosslab.py (or
bench/label_curve.py) output folders of one protocol, the first trained with stain_norm=lab, the
second with the grey-level preset: OUT/seed<N>/folds/<k>-<lab>/ each. For every seed and fold the
two fold runs are joined (`bloodcell gate`, fitted on the fold's training labs' train split only),
then the gated model and each branch are scored with TTA on every image of the held-out lab, and
on the training labs' test split ("home"). Prints the mean ± sd over seeds as Markdown tables, and
the share of each held-out lab the gate read in colour. Nothing of a held-out lab chooses anything:
the gate's threshold is the 99 % quantile of the training labs' own images, fixed before looking.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from crosslab import mean_sd

from bloodcell.data import BatchLoader
from bloodcell.models.checkpoint import load_model
from bloodcell.studies.gate import join
from bloodcell.training.evaluate import checkpoint_data, evaluate_checkpoint

MODELS = ("gated", "colour", "grey")


def colour_share(run: Path, data: str) -> float:
    """The share of a data set's images the gated model reads in colour."""
    model, meta = load_model(run)
    split = checkpoint_data(meta, data).splits
    routed = []
    for s in split.values():
        for x, _ in BatchLoader(s, 512, mean=meta["mean"], std=meta["std"]):
            with torch.no_grad():
                routed.append(model.routes(x).numpy())
    return float(np.concatenate(routed).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("colour")
    ap.add_argument("grey")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="bench/out/lolo-gate")
    args = ap.parse_args()
    got: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds.split(","):
        for fold in sorted((Path(args.colour) / f"seed{seed}" / "folds").iterdir()):
            grey = Path(args.grey) / f"seed{seed}" / "folds" / fold.name
            held = json.loads((fold.parents[1] / "crosslab.json").read_text())["folds"][int(fold.name.split("-")[0])]
            held = held["held_out"]
            lab = fold.name.split("-", 1)[1]
            out = Path(args.out) / f"seed{seed}" / fold.name
            if not (out / "DONE").is_file():
                join(fold, grey, out, overwrite=True, log=lambda m: None)
            home = json.loads((out / "metrics.json").read_text())
            row = got.setdefault(lab, {})
            for key, run in zip(MODELS, (out, fold, grey), strict=True):
                r = evaluate_checkpoint(run, held, split="all", tta=True, log=lambda m: None)
                m = r.get("all") or next(iter(r.values()))
                row.setdefault(f"held {key}", []).append(m["accuracy"])
                row.setdefault(f"home {key}", []).append(home[key]["test"]["accuracy"])
            row.setdefault("to colour", []).append(colour_share(out, held))
            print(f"seed {seed}, {lab} held out: " + ", ".join(f"{k} {100 * v[-1]:.1f}" for k, v in row.items()),
                  flush=True)
    for where in ("held", "home"):
        title = "every image of the held-out lab" if where == "held" else "the training labs' test split"
        print(f"\n{title}\n\n| held out | gated | colour | grey |" + (" read in colour |" if where == "held" else ""))
        print("|---|---:|---:|---:|" + ("---:|" if where == "held" else ""))
        for lab, row in got.items():
            cells = [mean_sd(row[f"{where} {k}"]) for k in MODELS]
            if where == "held":
                cells.append(mean_sd(row["to colour"]))
            print(f"| {lab} | " + " | ".join(cells) + " |")
        means = [100 * np.mean([np.mean(r[f"{where} {k}"]) for r in got.values()]) for k in MODELS]
        print("| mean over labs | " + " | ".join(f"{v:.1f}" for v in means) + (" | |" if where == "held" else " |"))


if __name__ == "__main__":
    main()
