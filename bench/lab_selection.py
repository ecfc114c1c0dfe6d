#!/usr/bin/env python
"""python bench/lab_selection.py [--seeds 0,1,2] [--grid KEY=V1,V2 ...] [--set key=value ...] [--out DIR]

Which rule picks a recipe that reads an unseen lab's cells: the training labs' own validation
(`tune --select val`) or each training lab left out in turn (`tune --select lab-out`, DomainBed's
leave-one-domain-out selection)? Over the four labs of BLOODCELL_TEST_DATA (Kaggle blood-cells,
the PBC share, Tecom, CellaVision; their four shared classes), for each held-out lab H: both
studies run the same grid of recipes on the other three labs (no pruning, every grid point
trained); each val-study trial is a model trained on those three labs, so scoring it on every
image of H gives every recipe's held-out accuracy (the oracle, shown, never used to choose).
Nothing of H chooses anything. The table: per H, each recipe's held-out accuracy and each rule's
score for it, and what each rule's pick reaches on H, per seed (the split and training seed); then
the mean over H and seeds per rule. Resumable: finished trials are kept (OUT/seed<N>/<H>/val and
.../lab-out).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import optuna
import yaml

from bloodcell.studies.compare import load_protocol
from bloodcell.studies.lab_out import lab_name, shared_classes
from bloodcell.training.evaluate import evaluate_checkpoint
from bloodcell.tune import tune

ROOT = Path(os.environ.get("BLOODCELL_TEST_DATA", "../shared/data"))
LABS = [ROOT / "blood-cells", ROOT / "pbc" / "PBC_dataset_normal_DIB", ROOT / "other-labs" / "tecom",
        ROOT / "other-labs" / "cellavision"]
GRID = ["stain_norm=gray,none", "stain_jitter=0,0.2"]


def recipe(params: dict) -> str:
    """A grid point as 'stain_norm=gray stain_jitter=0.2'."""
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()))


def trials(out: Path, model: str) -> list:
    """The completed trials of the study in out."""
    study = optuna.load_study(study_name=f"bloodcell-{model}", storage=f"sqlite:///{out.resolve()}/study.db")
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def main() -> None:
    """Run both studies per held-out lab (resumable), score the val study's models on it, print."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="crosslab", help="a compare preset for the settings ('none': defaults)")
    ap.add_argument("--model", default="cnn4x32")
    ap.add_argument("--grid", nargs="+", default=GRID, metavar="KEY=V1,V2")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config keys on top of the preset")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--held-out", default="", help="lab names to hold out, comma-separated (default: all four)")
    ap.add_argument("--out", default="bench/out/lab_selection")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base, _, _ = load_protocol(None, None if args.preset == "none" else args.preset)
    for k in ("ensemble", "data", "model", "models"):
        base.pop(k, None)
    base.update({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    labs = [str(p) for p in LABS]
    base["classes"] = shared_classes(tuple(labs))
    held = [s for s in labs if not args.held_out or lab_name(s) in args.held_out.split(",")]
    rows, picked = [], {"val": [], "lab-out": [], "oracle": []}
    for seed, h in ((int(seed), h) for seed in args.seeds.split(",") for h in held):
        others = [s for s in labs if s != h]
        name, scores = lab_name(h), {}
        for select in ("val", "lab-out"):
            out = Path(args.out) / f"seed{seed}" / name / select
            tune(others, args.model, None, out, grid=args.grid, select=select, pruner="none",
                 base={**base, "seed": seed}, sampler_seed=0, report=False,
                 log=lambda m, s=select, n=name, k=seed: print(f"[seed {k} {n} {s}] {m}", flush=True))
            for t in trials(out, args.model):
                scores.setdefault(recipe(t.params), {})[select] = t.value
                if select == "val":  # a model of the three other labs: score it on H (never chooses)
                    m = evaluate_checkpoint(out / "trials" / f"{t.number:04d}", h, split="all",
                                            log=lambda _m: None)["all"]
                    scores[recipe(t.params)]["held_out"] = m["accuracy"]
        best = {sel: max(scores, key=lambda r, sel=sel: scores[r][sel]) for sel in ("val", "lab-out", "held_out")}
        for r, s in sorted(scores.items()):
            marks = [sel for sel in ("val", "lab-out") if best[sel] == r]
            rows.append(f"| {seed} | {name} | {r} | {100 * s['val']:.1f} | {100 * s['lab-out']:.1f} | "
                        f"{100 * s['held_out']:.1f} | {', '.join(marks) or '-'} |")
        for sel, key in (("val", "val"), ("lab-out", "lab-out"), ("oracle", "held_out")):
            picked[sel].append((name, scores[best[key]]["held_out"]))
    print(f"\nmodel {args.model}; preset {args.preset}; set {' '.join(args.set) or '-'}; grid {' '.join(args.grid)}; "
          f"classes {', '.join(base['classes'])}\n")
    print("| seed | held out | recipe | val macro-F1 (training labs) | left-out-lab macro-F1 (training labs) | "
          "held-out accuracy | picked by |")
    print("|---:|---|---|---:|---:|---:|---|")
    print("\n".join(rows))
    names = list(dict.fromkeys(n for n, _ in picked["val"]))
    print("\nheld-out accuracy of each rule's pick, mean over seeds (oracle: the best recipe on H, for scale)\n")
    print("| rule | " + " | ".join(names) + " | mean |")
    print("|---|" + "---:|" * (len(names) + 1))
    for sel, v in picked.items():
        per = [statistics.mean(x for n, x in v if n == name) for name in names]
        print(f"| {sel} | " + " | ".join(f"{100 * x:.1f}" for x in per)
              + f" | {100 * statistics.mean(x for _, x in v):.1f} |")


if __name__ == "__main__":
    main()
