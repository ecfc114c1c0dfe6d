#!/usr/bin/env python
"""python bench/crosslab.py [--preset crosslab] [--model cnn4x32] [--seeds 0,1,2] [--set key=value ...] [--label-curve 5,10,25,50]

The leave-one-lab-out protocol over the four labs of BLOODCELL_TEST_DATA (Kaggle blood-cells, the
PBC share, Tecom, CellaVision; their shared classes) for each seed: one `bloodcell crosslab` per seed
into OUT/seed<N> (resumable: finished folds are kept), then the mean and spread over seeds of each
held-out lab's accuracy and of the in-lab test accuracies, as a Markdown matrix, and the mean
validation macro-F1 over the folds (the training labs' pooled validation: the only figure that may
choose between recipes). Nothing of a held-out lab chooses anything (crosslab trains and validates
on the other labs only). With --label-curve, the held-out labs' test-split accuracy as trained,
adapted without labels and fine-tuned on K labelled cells per class, as a second table.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import yaml

from bloodcell.studies.compare import load_protocol
from bloodcell.studies.lab_out import crosslab

ROOT = Path(os.environ.get("BLOODCELL_TEST_DATA", "../shared/data"))
LABS = [ROOT / "blood-cells", ROOT / "pbc" / "PBC_dataset_normal_DIB", ROOT / "other-labs" / "tecom",
        ROOT / "other-labs" / "cellavision"]


def mean_sd(values: list[float]) -> str:
    """'93.1 ± 0.4' in percent (sample standard deviation over seeds)."""
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def table(results: list[dict]) -> str:
    """Rows: held-out lab; columns: the lab scored (bold: the held-out one), mean ± sd over seeds."""
    names = [lab["name"] for lab in results[0]["labs"]]
    lines = ["| held out | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in names:
        cells = []
        for col in names:
            vals = [r["matrix"][row][col] for r in results if col in r["matrix"].get(row, {})]
            text = mean_sd(vals)
            cells.append(f"**{text}**" if row == col else text)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def val_f1(results: list[dict], out: Path) -> str:
    """Mean over seeds and folds of each fold's best validation macro-F1 (training labs only)."""
    vals = []
    for r, seed in zip(results, SEEDS, strict=True):
        for f in r["folds"]:
            m = yaml.safe_load((out / f"seed{seed}" / f["run_dir"] / "metrics.json").read_text())
            vals.append(m["val"]["macro_f1"])
    return mean_sd(vals)


def curve_table(results: list[dict]) -> str:
    """Rows: held-out lab; columns: K = 0 (as trained), 0 adapted, then each K; mean ± sd over seeds."""
    curves = [r["label_curve"] for r in results if r.get("label_curve")]
    if not curves:
        return ""
    ks = sorted({int(k) for c in curves for lab in c.values() for k in lab["k"]})
    lines = ["| held out | test images | K = 0 | K = 0, adapted | " + " | ".join(f"K = {k}" for k in ks) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(ks)]
    for lab in curves[0]:
        cells = [str(curves[0][lab]["n_test"]), mean_sd([c[lab]["trained"]["accuracy"] for c in curves]),
                 mean_sd([c[lab]["adapted"]["accuracy"] for c in curves])]
        for k in ks:
            vals = [c[lab]["k"][str(k)]["accuracy"] for c in curves if str(k) in c[lab]["k"]]
            few = min((min(c[lab]["k"][str(k)]["cells"].values()) for c in curves if str(k) in c[lab]["k"]),
                      default=k)
            cells.append(mean_sd(vals) + (f" ({few})" if few < k else ""))
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SEEDS: list[int] = []


def main() -> None:
    """Run the seeds (resumable) and print the matrix."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="crosslab", help="a compare preset for the settings ('none': defaults)")
    ap.add_argument("--model", default="cnn4x32")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config keys on top of the preset")
    ap.add_argument("--out", default="bench/out/crosslab")
    ap.add_argument("--label-curve", default="", help="K,K,...: also adapt and fine-tune on K cells per class")
    args = ap.parse_args()
    ks = tuple(int(k) for k in args.label_curve.split(",") if k)
    shared, _, _ = load_protocol(None, None if args.preset == "none" else args.preset)
    shared.pop("ensemble", None)
    shared.update({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    shared.update({"data": [str(p) for p in LABS], "model": args.model})
    results = []
    SEEDS[:] = [int(s) for s in args.seeds.split(",")]
    for seed in SEEDS:
        results.append(crosslab({**shared, "seed": seed}, Path(args.out) / f"seed{seed}", progress=False,
                                command=f"bench/crosslab.py seed {seed}", label_curve=ks))
    print(f"classes: {', '.join(results[0]['classes'])}; seeds {args.seeds}; model {args.model}; "
          f"preset {args.preset}; set {' '.join(args.set) or '-'}")
    print(table(results))
    print(f"\nvalidation macro-F1 (training labs, mean over folds and seeds): {val_f1(results, Path(args.out))}")
    if ks:
        print("\nheld-out lab's test split: accuracy against labelled cells per class (the fewest a class had, "
              "where below K)\n")
        print(curve_table(results))


if __name__ == "__main__":
    main()
