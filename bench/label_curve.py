#!/usr/bin/env python
"""python bench/label_curve.py [--seeds 0,1,2] [--ks 5,10,25,50] [--set key=value ...] [--labs A,B,...] [--out DIR] [--start DIR] [--replot]

How many cells must a new lab label, with the fine-tune that never ends below its start? Each lab
of BLOODCELL_TEST_DATA (Kaggle blood-cells, the PBC share, Tecom, CellaVision; their shared classes)
is held out in turn: `bloodcell crosslab` trains a model on the others (bench/crosslab.py's
protocol, resumable: finished folds are kept), and on the held-out lab's test split (split as a run
of that lab alone would be) this scores the model as trained (K = 0), adapted without labels to
the lab's train images (K = 0, adapted), and fine-tuned by bloodcell.studies.finetune on K labelled
cells per class of its train split, chosen three ways: at random (one image per cell group, as
`--labels-per-class`); "review", as a person working through `bloodcell review` would label them
(the adapted model's review order: least sure first, classes and fields taking turns; the first K x
classes cells, one per group, whatever their true classes); and "balanced", the same person keeping
a cell only while its true class has fewer than K (at most K per class; the table gives how many
cells were looked at for them). The fine-tune weighs each labelled class alike in its loss. Each
fine-tune keeps the adapted start unless the labelled cells' own cross-validation shows a gain;
nothing of the test split chooses anything. Prints a Markdown table (mean ± sd over seeds; in
brackets how many seeds kept the fine-tune, and for "balanced" the cells looked at) and writes
OUT/label_curve.json and OUT/label_curve.png (the curves: accuracy against K, each lab a panel).
With --start DIR, each fold's curve starts from DIR/seed<N>/<fold>/best.pt instead of the crosslab
fold's model (bench/lolo_gate.py's gated models, say; the folds, splits and labels are the same),
and the table, json and plot go to DIR.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from pathlib import Path

import numpy as np
import yaml
from crosslab import LABS, mean_sd

from bloodcell.config import TrainConfig, make_config
from bloodcell.data.build import config_dataset
from bloodcell.data.sources import few_labels, select_classes, take
from bloodcell.inference.review import Cell, review_order
from bloodcell.models.checkpoint import load_model
from bloodcell.runfiles import read_json, write_json
from bloodcell.runtime import resolve_device, set_threads
from bloodcell.studies.compare import load_protocol
from bloodcell.studies.finetune import Recipe, adapted, probs_of, safe_finetune
from bloodcell.studies.lab_out import crosslab

HOW = ("random", "review", "balanced")


def in_review_order(probs: np.ndarray, split, classes: list[str]):
    """The split's rows as a person meets them in review order (by the model's probabilities), one
    image per group (a cell's copies are one cell to a person)."""
    cells = [Cell(id=split.paths[i], label=classes[int(p.argmax())], prob=float(p.max()), field=str(split.groups[i]))
             for i, p in enumerate(probs)]
    seen = set()
    for i in review_order(cells):
        if split.groups[i] not in seen:
            seen.add(split.groups[i])
            yield i


def review_rows(probs: np.ndarray, split, classes: list[str], n: int) -> np.ndarray:
    """The first ``n`` cells of the split in review order."""
    return np.array(sorted(itertools.islice(in_review_order(probs, split, classes), n)), dtype=np.int64)


def balanced_rows(probs: np.ndarray, split, classes: list[str], k: int) -> tuple[np.ndarray, int]:
    """A person working down the review order who labels each cell and keeps it only while its
    (true) class has fewer than ``k`` kept: the rows kept (at most ``k`` of each class, one image
    per group) and how many cells were looked at to get them."""
    rows, have, looked = [], np.zeros(len(classes), int), 0
    for i in in_review_order(probs, split, classes):
        looked += 1
        c = int(split.labels[i])
        if have[c] < k:
            have[c] += 1
            rows.append(i)
            if (have >= k).all():
                break
    return np.array(sorted(rows), dtype=np.int64), looked


def lab_curve(fold_dir: Path, lab: str, protocol: dict, ks: tuple[int, ...], seed: int, log) -> dict:
    """One held-out lab: K = 0 as trained and adapted, then each K chosen each way, fine-tuned."""
    model, meta = load_model(fold_dir / "best.pt")
    classes, mean, std = meta["classes"], meta["mean"], meta["std"]
    cfg = make_config(TrainConfig, {k: v for k, v in protocol.items() if k != "labs"}, {"data": lab})
    ds, _ = select_classes(config_dataset(cfg), classes)
    pool, test = ds.splits["train"], ds.splits["test"]
    device = str(resolve_device(cfg.device))
    set_threads(cfg.threads)  # crosslab's scoring may have taken every core

    def acc(m) -> float:
        return float((probs_of(m, test, device, mean, std).argmax(1) == test.labels).mean())

    start = copy.deepcopy(model)
    adapted(start, pool, device, mean, std)
    out = {"n_test": len(test), "trained": acc(model), "adapted": acc(start), "k": {}}
    order_probs = probs_of(start, pool, device, mean, std)
    for k in ks:
        out["k"][str(k)] = {}
        for how in HOW:
            looked = None
            if how == "random":
                rows = np.flatnonzero(np.isin(pool.paths, few_labels(ds, k, seed, ("train",)).splits["train"].paths))
            elif how == "review":
                rows = review_rows(order_probs, pool, classes, k * len(classes))
            else:
                rows, looked = balanced_rows(order_probs, pool, classes, k)
            run = fold_dir / f"finetune-{how}-k{k}"
            if (run / "DONE").exists():
                m = read_json(run / "metrics.json")
            else:
                m = safe_finetune(fold_dir / "best.pt", take(pool, rows), classes, run, recipe=Recipe(seed=seed),
                                  adapt_on=pool, adapt_name="the lab's train split", test=test, device=device,
                                  config=cfg.to_dict(), overwrite=True, log=lambda _: None)
            cv = m["finetune"]["cv"]
            out["k"][str(k)][how] = {"accuracy": m["test"]["accuracy"], "kept": m["run"]["kept"],
                                     "cells": m["run"]["labelled_cells"]["train"], "looked_at": looked or len(rows),
                                     "cv": {key: cv.get(key) for key in ("start", "finetune", "gain", "gain_se")}}
            log(f"  {fold_dir.name} K={k} {how}: test {m['test']['accuracy']:.4f} ({m['run']['kept']} kept; cells "
                + ", ".join(f"{c} {n}" for c, n in m["run"]["labelled_cells"]["train"].items()) + ")")
    return out


def table(curves: list[dict], ks: tuple[int, ...]) -> str:
    """Rows: held-out lab; columns: K = 0 as trained and adapted, then each K at random and by review."""
    head = ["held out", "test images", "K = 0", "K = 0, adapted"] + [f"K = {k} {h}" for k in ks for h in HOW]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for lab in curves[0]:
        cells = [str(curves[0][lab]["n_test"]), mean_sd([c[lab]["trained"] for c in curves]),
                 mean_sd([c[lab]["adapted"] for c in curves])]
        for k in ks:
            for how in HOW:
                got = [c[lab]["k"][str(k)][how] for c in curves]
                kept = sum(g["kept"] == "finetune" for g in got)
                looked = f"; {np.mean([g.get('looked_at', 0) for g in got]):.0f} seen" if how == "balanced" else ""
                cells.append(f"{mean_sd([g['accuracy'] for g in got])} ({kept}/{len(got)}{looked})")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: list[dict], ks: tuple[int, ...], path: Path) -> None:
    """Accuracy on each held-out lab's test split against K (mean and spread over seeds), a line per
    way of choosing the cells, the adapted start dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labs = list(curves[0])
    fig, axes = plt.subplots(1, len(labs), figsize=(3.2 * len(labs), 3.0), sharey=True, squeeze=False)
    for ax, lab in zip(axes[0], labs, strict=True):
        start = np.array([c[lab]["adapted"] for c in curves]) * 100
        ax.axhline(start.mean(), color="grey", ls="--", lw=1, label="K = 0, adapted")
        for how in HOW:
            acc = np.array([[c[lab]["k"][str(k)][how]["accuracy"] for k in ks] for c in curves]) * 100
            ax.errorbar(ks, acc.mean(0), yerr=acc.std(0), marker="o", ms=3, capsize=2, label=how)
        ax.set_title(Path(lab).name.split("_")[0], fontsize=9)
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("labelled cells per class (K)")
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Train the folds (resumable), then the label curve of each held-out lab; print and save it."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="crosslab", help="a compare preset for the settings ('none': defaults)")
    ap.add_argument("--model", default="cnn4x32")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ks", default="5,10,25,50", help="labelled cells per class")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config keys on top of the preset")
    ap.add_argument("--labs", default="", help="comma-separated data sources instead of the four labs")
    ap.add_argument("--out", default="bench/out/label_curve")
    ap.add_argument("--start", default="", help="start each fold from DIR/seed<N>/<fold>/best.pt; results in DIR")
    ap.add_argument("--replot", action="store_true", help="redraw OUT/label_curve.png from OUT/label_curve.json")
    args = ap.parse_args()
    if args.replot:
        if not (Path(args.out) / "label_curve.json").is_file():
            raise SystemExit(f"{Path(args.out) / 'label_curve.json'} not found: run the curve first")
        saved = read_json(Path(args.out) / "label_curve.json")
        plot(saved["curves"], tuple(saved["ks"]), Path(args.out) / "label_curve.png")
        return
    ks = tuple(int(k) for k in args.ks.split(",") if k)
    labs = [s for s in args.labs.split(",") if s] or [str(p) for p in LABS]
    shared, _, _ = load_protocol(None, None if args.preset == "none" else args.preset)
    shared.pop("ensemble", None)
    shared.update({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    shared.update({"data": labs, "model": args.model})
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    curves = []
    for seed in seeds:
        out = Path(args.out) / f"seed{seed}"
        res = crosslab({**shared, "seed": seed}, out, progress=False, report=False,
                       command=f"bench/label_curve.py seed {seed}", log=print)
        start = Path(args.start) / f"seed{seed}" if args.start else out
        curves.append({f["name"]: lab_curve(start / (Path(f["run_dir"]).name if args.start else f["run_dir"]),
                                            f["held_out"], res["protocol"], ks, seed, print)
                       for f in res["folds"]})
    if args.start:
        args.out = args.start
    write_json(Path(args.out) / "label_curve.json", {"labs": labs, "classes": res["classes"], "seeds": seeds,
                                                      "ks": list(ks), "set": args.set, "preset": args.preset,
                                                      "model": args.model, "curves": curves,
                                                      "minutes": (time.perf_counter() - t0) / 60})
    print(f"\nclasses: {', '.join(res['classes'])}; seeds {args.seeds}; model {args.model}; preset {args.preset}; "
          f"set {' '.join(args.set) or '-'}")
    print("held-out lab's test split: accuracy, then with K labelled cells per class chosen at random or in "
          "review order (in brackets: the seeds whose labels showed the fine-tune better, so kept it)\n")
    print(table(curves, ks))
    plot(curves, ks, Path(args.out) / "label_curve.png")
    print(f"\nwrote {Path(args.out) / 'label_curve.json'}")


if __name__ == "__main__":
    main()
