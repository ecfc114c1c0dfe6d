"""``bloodcell gate``: a colour run and a grey-level run joined into one model with a colour gate.

The library is imported inside the handlers (lazy imports, marked): ``bloodcell --help`` and a bad
flag answer at once, without loading torch.
"""

from __future__ import annotations

import argparse
import sys

from bloodcell.cli.flags import bounded


def cmd_gate(args) -> int:
    """bloodcell gate COLOUR_RUN GREY_RUN --out RUN [--data DATA ...] [--quantile Q]

    Join two runs of one task, one trained on colour (--stain-norm lab, image or none) and one on
    grey levels (--stain-norm gray), into one model: an image whose colours (its l-alpha-beta mean
    and spread) lie within those of a lab the runs trained on is read by the colour run, any other
    by the grey-level one. Colour reads a known lab's cells better; grey levels read a lab never
    seen better. The gate is fitted on the train split of the colour run's data (each --data
    source one lab); RUN is a run folder every command takes, with gate.json (the share of each
    lab read in colour) and metrics.json (the gated model and each run on the val and test splits).
    """
    from bloodcell.studies.gate import join  # lazy: start-up

    join(args.colour, args.grey, args.out, data=args.data, quantile=args.quantile, cache_dir=args.cache_dir,
         overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr))
    print(f"run folder: {args.out}")
    return 0


def add_parsers(sub) -> None:
    """Register `bloodcell gate`."""
    p = sub.add_parser("gate", help="join a colour run and a grey-level run: colour for a lab they know, grey "
                       "levels for any other", description=cmd_gate.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("colour", help="run folder or checkpoint trained on colour")
    p.add_argument("grey", help="run folder or checkpoint trained with --stain-norm gray, on the same classes, "
                   "image size and resize")
    p.add_argument("--out", required=True, help="run folder for the gated model")
    p.add_argument("--data", action="append", metavar="DATA",
                   help="the training labs whose colours the gate learns, one --data each (default: the colour "
                        "run's own data; split as the run split it, only the train split is read)")
    p.add_argument("--quantile", type=bounded(float, 0.5, 1.0), default=0.99,
                   help="the share of the training images the colour run reads (default: 0.99; %(type)s)")
    p.add_argument("--cache-dir", help="decoded-image cache folder")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.set_defaults(func=cmd_gate)
