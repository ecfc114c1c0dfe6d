#!/usr/bin/env python
"""python bench/adapt_methods.py CROSSLAB_DIR [--steps 0,10,50] [--out bench/out/adapt]

For each fold of a finished `bloodcell crosslab` folder: `bloodcell adapt` of the fold's model on
its held-out lab's train split (no label read), with 0 (batch-norm statistics re-estimated only)
and N Tent entropy steps before it; prints the held-out lab's test-split accuracy as trained and
after each, as a Markdown table. Nothing adapted on is scored.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bloodcell.studies.adapt import adapt


def main() -> None:
    """Adapt every fold with each number of entropy steps and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("crosslab_dir")
    ap.add_argument("--steps", default="0,10,50")
    ap.add_argument("--out", default="bench/out/adapt")
    args = ap.parse_args()
    root = Path(args.crosslab_dir)
    steps = [int(s) for s in args.steps.split(",")]
    res = json.loads((root / "crosslab.json").read_text())
    print("| held out (test images) | as trained | " + " | ".join(
        "BN re-estimated" if s == 0 else f"+ Tent, {s} steps" for s in steps) + " |")
    print("|---|---:|" + "---:|" * len(steps))
    for f in res["folds"]:
        cells = []
        for s in steps:
            m = adapt(root / f["run_dir"], f["held_out"], Path(args.out) / f["name"] / f"steps{s}",
                      entropy_steps=s, overwrite=True, log=lambda _: None)["test"]
            cells.append(f"{100 * m['accuracy']:.1f}")
        print(f"| {f['name']} ({m['n']:,}) | {100 * m['before']['accuracy']:.1f} | " + " | ".join(cells) + " |",
              flush=True)


if __name__ == "__main__":
    main()
