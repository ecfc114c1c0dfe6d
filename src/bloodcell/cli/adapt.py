"""``bloodcell adapt``: a trained model fitted to a new lab's images, reading no label.

The library is imported inside the handlers (lazy imports, marked): ``bloodcell --help`` and a bad
flag answer at once, without loading torch.
"""

from __future__ import annotations

import argparse
import sys

from bloodcell.cli.flags import bounded, field_type
from bloodcell.config import CHOICES


def cmd_adapt(args) -> int:
    """bloodcell adapt RUN_DIR --data NEW_LAB --out RUN2 [--entropy-steps N]

    Re-estimate the model's batch-norm statistics from the new lab's images (and, with
    --entropy-steps, first make its predictions on them more confident, through the normalisation
    layers only), reading no label; RUN2 is a run folder every command accepts. The adapted and the
    original model are then scored on the splits not adapted on (metrics.json).
    """
    from bloodcell.studies.adapt import adapt  # lazy: start-up

    adapt(args.run, args.data, args.out, split=args.split, entropy_steps=args.entropy_steps, lr=args.lr,
          batch_size=args.batch_size, seed=args.seed, cache_dir=args.cache_dir, device=args.device,
          overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr))
    print(f"run folder: {args.out}")
    return 0


def add_parsers(sub) -> None:
    """Register `bloodcell adapt`."""
    p = sub.add_parser("adapt", help="adapt a trained model to a new lab's images, reading no label",
                       description=cmd_adapt.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder (its best.pt) or checkpoint file to adapt")
    p.add_argument("--data", required=True, metavar="DATA",
                   help="the new lab's images (any layout --data takes; split as the run would split it)")
    p.add_argument("--out", required=True, help="run folder for the adapted model")
    p.add_argument("--split", default="train",
                   help="the images to adapt on: a split of the data, or 'all' (then nothing unseen is "
                        "left to score) (default: train)")
    p.add_argument("--entropy-steps", type=bounded(int, 0, 100_000), default=0,
                   help="steps of entropy minimisation (Tent) before the statistics are re-estimated "
                        "(default: 0, statistics only; %(type)s)")
    p.add_argument("--lr", type=field_type("lr"), default=1e-3,
                   help="Adam learning rate of those steps (default: 0.001; %(type)s)")
    p.add_argument("--batch-size", type=field_type("batch_size"), default=64,
                   help="images per batch (default: 64; %(type)s)")
    p.add_argument("--seed", type=field_type("seed"), default=0,
                   help="seed of the entropy steps' batch order (default: 0; %(type)s)")
    p.add_argument("--cache-dir", help="decoded-image cache folder")
    p.add_argument("--device", default="auto", choices=list(CHOICES["device"]))
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.set_defaults(func=cmd_adapt)
