#!/usr/bin/env python
"""python bench/crosslab.py [--preset crosslab] [--model cnn4x32] [--seeds 0,1,2] [--set key=value ...]

The leave-one-lab-out protocol over the four labs of BLOODCELL_TEST_DATA (Kaggle blood-cells, the
PBC share, Tecom, CellaVision; their shared classes) for each seed: one `bloodcell crosslab` per seed
into OUT/seed<N> (resumable: finished folds are kept), then the mean and spread over seeds of each
held-out lab's accuracy and of the in-lab test accuracies, as a Markdown matrix. Nothing of a
held-out lab chooses anything (crosslab trains and validates on the other labs only).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import yaml

from bloodcell.compare import load_protocol
from bloodcell.crosslab import crosslab

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


def main() -> None:
    """Run the seeds (resumable) and print the matrix."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="crosslab", help="a compare preset for the settings ('none': defaults)")
    ap.add_argument("--model", default="cnn4x32")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config keys on top of the preset")
    ap.add_argument("--out", default="bench/out/crosslab")
    args = ap.parse_args()
    shared, _, _ = load_protocol(None, None if args.preset == "none" else args.preset)
    shared.pop("ensemble", None)
    shared.update({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    shared.update({"data": [str(p) for p in LABS], "model": args.model})
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        results.append(crosslab({**shared, "seed": seed}, Path(args.out) / f"seed{seed}", progress=False,
                                command=f"bench/crosslab.py seed {seed}"))
    print(f"classes: {', '.join(results[0]['classes'])}; seeds {args.seeds}; model {args.model}; "
          f"preset {args.preset}; set {' '.join(args.set) or '-'}")
    print(table(results))


if __name__ == "__main__":
    main()
