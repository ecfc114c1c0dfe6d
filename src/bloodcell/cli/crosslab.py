"""``bloodcell crosslab``: leave one lab out (train on the others, test on it) and the label curve.

The library is imported inside the handlers (lazy imports, marked): ``bloodcell --help`` and a bad
flag answer at once, without loading torch.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bloodcell.cli.flags import CONFIG_USAGE, add_config_flags, check_given, given
from bloodcell.config import TrainConfig
from bloodcell.errors import BloodcellError


def cmd_crosslab(args) -> int:
    """bloodcell crosslab --data LAB_A --data LAB_B [--data LAB_C ...] --model cnn4x32 --out DIR

    Leave one lab out: for each lab, a model trained on the others (validation from them only) is
    tested on every image of that lab; DIR/crosslab.json and DIR/report.html hold the lab-by-lab
    matrix. Rerun the same command to continue an interrupted run: finished folds are kept.

    How many cells must a new lab label? --label-curve 5,10,25,50 also scores each fold's model on
    its held-out lab's test split as trained, adapted without labels (bloodcell adapt), and
    fine-tuned on K labelled cells per class of that lab's train split, for each K."""
    from bloodcell.studies.compare import load_protocol  # lazy: start-up
    from bloodcell.studies.lab_out import crosslab  # lazy: start-up
    from bloodcell.training.distributed import single_process  # lazy: start-up

    single_process("crosslab")

    shared, _, overrides = load_protocol(args.config, args.preset)
    if overrides:
        print("bloodcell: warning: the preset's per-model overrides do not apply to crosslab", file=sys.stderr)
    shared.pop("ensemble", None)
    check_given(args)  # a flag out of its range: one line before any work
    shared.update(given(args, TrainConfig))
    try:
        ks = tuple(int(k) for k in filter(None, (args.label_curve or "").split(",")))
    except ValueError:
        raise BloodcellError(f"--label-curve takes whole numbers, comma-separated; got {args.label_curve!r}") from None
    if any(k < 1 for k in ks):
        raise BloodcellError(f"--label-curve: each K must be 1 or more; got {args.label_curve!r}")
    crosslab(shared, args.out, overwrite=args.overwrite, progress=not args.quiet, report=not args.no_report,
             command="bloodcell " + shlex.join(sys.argv[1:]), label_curve=ks)
    print(f"results: {Path(args.out) / 'crosslab.json'}")
    return 0


def add_parsers(sub) -> None:
    """Register `bloodcell crosslab`."""
    p = sub.add_parser("crosslab", usage=CONFIG_USAGE, help="leave one lab out: train on the other labs, test on the one left out",
                       description=cmd_crosslab.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/crosslab", help="crosslab folder (default: runs/crosslab)")
    p.add_argument("--config", help="YAML of shared config keys")
    p.add_argument("--preset", help="a compare preset's settings (e.g. crosslab); its model list is not used")
    p.add_argument("--overwrite", action="store_true", help="start again, replacing DIR's folds and results")
    p.add_argument("--label-curve", metavar="K,K,...",
                   help="also adapt each fold's model to its held-out lab without labels and fine-tune it "
                        "on K labelled cells per class (e.g. 5,10,25,50): accuracy against K")
    p.add_argument("--no-report", action="store_true", help="skip report.html/report.md")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(p, TrainConfig, skip=("folds", "fold"))  # its folds are the labs
    p.set_defaults(func=cmd_crosslab)
