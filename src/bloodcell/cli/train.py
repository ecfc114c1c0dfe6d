"""``bloodcell train``, ``bloodcell evaluate`` and ``bloodcell adapt``: one model into a run folder,
its scores on any data, and its adaptation to a new lab's images.

The library is imported inside the handlers (lazy imports, marked): ``bloodcell --help`` and a bad
flag answer at once, without loading torch.
"""

from __future__ import annotations

import argparse
import json
import sys

from bloodcell.cli.flags import DATA_HELP, add_config_flags, train_config
from bloodcell.config import CHOICES, TrainConfig


def cmd_train(args) -> int:
    """bloodcell train --data PATH --model NAME --epochs E --out RUN_DIR [--folds K]

    With --folds K: K models, each validated on its own grouped, stratified fold of the train and
    val images, into RUN_DIR/folds/<k>/; the test split is the same for all and chooses nothing;
    RUN_DIR/folds.json holds the mean and spread over the folds.

    On several processes: --nproc N on this machine, or
    torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT] -m bloodcell train ...
    """
    from bloodcell.crossval import cross_validate, is_crossval_dir  # lazy: start-up
    from bloodcell.distributed import env_world, launched  # lazy: start-up
    from bloodcell.train import train  # lazy: start-up

    if args.resume:
        if is_crossval_dir(args.resume):
            cross_validate(TrainConfig(folds=2), args.resume, resume=True, progress=not args.quiet)
        else:
            train(TrainConfig(), args.resume, resume=True, progress=not args.quiet)
        return 0
    cfg = train_config(args)
    if cfg.folds and cfg.fold is None:
        cross_validate(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    else:
        train(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    if env_world().main and not launched():  # once for a run of several processes
        print(f"run folder: {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    """bloodcell evaluate RUN_DIR|CHECKPOINT --data PATH [--split NAME[,NAME...]]"""
    from bloodcell.evaluate import evaluate_checkpoint  # lazy: start-up
    from bloodcell.metrics import binary_line  # lazy: start-up

    data = args.data[0] if len(args.data) == 1 else args.data
    res = evaluate_checkpoint(args.checkpoint, data, split=args.split, class_map=args.class_map,
                              tta=args.tta, cache_dir=args.cache_dir, device=args.device, out=args.out,
                              restrict=args.restrict,
                              log=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    for name, m in res.items():
        ci = m.get("accuracy_ci") or [float("nan")] * 2
        gci = m.get("group_accuracy_ci") or [float("nan")] * 2
        print(f"{name:12s} n={m['n']:<6} accuracy {m['accuracy']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]  "
              f"macro-F1 {m['macro_f1']:.4f}  loss {m['loss']:.4f}  "
              f"group accuracy {m.get('group_accuracy', float('nan')):.4f} [{gci[0]:.4f}, {gci[1]:.4f}] "
              f"(n={m.get('n_groups', '?')} groups)")
        if binary_line(m):
            print(f"{'':12s} {binary_line(m)}")
        for root, ms in m.get("per_source", {}).items():
            print(f"  {root}: n={ms['n']:<6} accuracy {ms['accuracy']:.4f}  macro-F1 {ms['macro_f1']:.4f}")
    return 0


def cmd_adapt(args) -> int:
    """bloodcell adapt RUN_DIR --data NEW_LAB --out RUN2 [--entropy-steps N]

    Re-estimate the model's batch-norm statistics from the new lab's images (and, with
    --entropy-steps, first make its predictions on them more confident, through the normalisation
    layers only), reading no label; RUN2 is a run folder every command accepts. The adapted and the
    original model are then scored on the splits not adapted on (metrics.json).
    """
    from bloodcell.adapt import adapt  # lazy: start-up

    adapt(args.run, args.data, args.out, split=args.split, entropy_steps=args.entropy_steps, lr=args.lr,
          batch_size=args.batch_size, seed=args.seed, cache_dir=args.cache_dir, device=args.device,
          overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr))
    print(f"run folder: {args.out}")
    return 0


def add_parsers(sub) -> None:
    """Register `bloodcell train`, `bloodcell evaluate` and `bloodcell adapt`."""
    p = sub.add_parser("train", help="train one model into a run folder (or K folds: --folds)",
                       description=cmd_train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/train", help="run folder (default: runs/train)")
    p.add_argument("--config", help="YAML file of config keys (flags override it)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a trained model on any data set",
                       description=cmd_evaluate.__doc__)
    p.add_argument("checkpoint", help="run folder (its best.pt) or checkpoint file")
    p.add_argument("--data", required=True, action="append", metavar="DATA", help=DATA_HELP)
    p.add_argument("--split", help="split(s) to evaluate, comma-separated, 'all' for every image, 'train+val' for "
                                   "splits scored as one (default: "
                                   "test and test_simple of the training data; all images of another data set)")
    p.add_argument("--class-map", help="DATA=MODEL,... where class names differ beyond case")
    p.add_argument("--tta", action="store_true", help="average over the 8 flips and rotations")
    p.add_argument("--restrict", action="store_true",
                   help="score only the classes the data has (renormalised): e.g. an 8-class model on a "
                        "4-class set")
    p.add_argument("--cache-dir", help="decoded-image cache folder")
    p.add_argument("--device", default="auto", choices=list(CHOICES["device"]))
    p.add_argument("--out", help="folder for metrics.json and predictions CSVs")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("adapt", help="adapt a trained model to a new lab's images, reading no label",
                       description=cmd_adapt.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder (its best.pt) or checkpoint file to adapt")
    p.add_argument("--data", required=True, metavar="DATA",
                   help="the new lab's images (any layout --data takes; split as the run would split it)")
    p.add_argument("--out", required=True, help="run folder for the adapted model")
    p.add_argument("--split", default="train",
                   help="the images to adapt on: a split of the data, or 'all' (then nothing unseen is "
                        "left to score) (default: train)")
    p.add_argument("--entropy-steps", type=int, default=0,
                   help="steps of entropy minimisation (Tent) before the statistics are re-estimated "
                        "(default: 0, statistics only)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of those steps (default: 0.001)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the entropy steps' batch order (default: 0)")
    p.add_argument("--cache-dir", help="decoded-image cache folder")
    p.add_argument("--device", default="auto", choices=list(CHOICES["device"]))
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.set_defaults(func=cmd_adapt)
