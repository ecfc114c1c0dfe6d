"""``bloodcell train``: one model into a run folder (or K folds).

The library is imported inside the handlers (lazy imports, marked): ``bloodcell --help`` and a bad
flag answer at once, without loading torch.
"""

from __future__ import annotations

import argparse

from bloodcell.cli.flags import CONFIG_USAGE, add_config_flags, given, train_config
from bloodcell.config import TrainConfig


def cmd_train(args) -> int:
    """bloodcell train --data PATH --model NAME --epochs E --out RUN_DIR [--folds K]

    With --init-from RUN and at most 50 labelled cells per class: RUN's model adapted to the lab's
    images, fine-tuned on the cells (the classifier and the norm layers), and kept only where the
    cells' own grouped cross-validation shows it beats the adapted start; else the start is kept
    (bloodcell.studies.finetune; --plain-finetune for a plain run).

    With --folds K: K models, each validated on its own grouped, stratified fold of the train and
    val images, into RUN_DIR/folds/<k>/; the test split is the same for all and chooses nothing;
    RUN_DIR/folds.json holds the mean and spread over the folds.

    On several processes: --nproc N on this machine, or
    torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT] -m bloodcell train ...
    """
    from bloodcell.studies.kfold import cross_validate, is_crossval_dir  # lazy: start-up
    from bloodcell.training.distributed import env_world, launched  # lazy: start-up
    from bloodcell.training.train import train  # lazy: start-up

    if args.resume:
        check_resume_flags(args)
        if is_crossval_dir(args.resume):
            cross_validate(TrainConfig(folds=2), args.resume, resume=True, progress=not args.quiet)
        else:
            train(TrainConfig(), args.resume, resume=True, progress=not args.quiet)
        return 0
    cfg = train_config(args)
    if args.adapt_data and (not cfg.init_from or args.plain_finetune):
        from bloodcell.errors import ConfigError  # lazy: start-up

        raise ConfigError("--adapt-data goes with --init-from, and not with --plain-finetune")
    if cfg.folds and cfg.fold is None:
        cross_validate(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    elif cfg.init_from and not args.plain_finetune and cfg.nproc == 1 and env_world().size == 1:
        from bloodcell.config import load_yaml  # lazy: start-up
        from bloodcell.studies.finetune import finetune  # lazy: start-up

        asked = set(load_yaml(args.config) if args.config else {}) | set(given(args, TrainConfig))
        finetune(cfg, args.out, given=asked, adapt_data=args.adapt_data, overwrite=args.overwrite,
                 progress=not args.quiet)
    else:
        train(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    if env_world().main and not launched():  # once for a run of several processes
        print(f"run folder: {args.out}")
    return 0


def check_resume_flags(args) -> None:
    """--resume continues a run as its config.yaml says: a config flag (or --config key) that differs
    from it is refused in one line naming each, rather than silently ignored; one that agrees is
    accepted."""
    import dataclasses
    from pathlib import Path

    from bloodcell.config import checked, load_yaml, make_config
    from bloodcell.errors import ConfigError

    saved_file = Path(args.resume) / "config.yaml"
    asked = checked(TrainConfig, load_yaml(args.config) if args.config else {}, given(args, TrainConfig))
    if not asked or not saved_file.is_file():  # no flag, or no run (train says so)
        return
    saved = make_config(TrainConfig, load_yaml(saved_file))
    try:
        wanted = dataclasses.replace(saved, **asked)
    except ConfigError:
        wanted = None
    differ = [k for k in asked if wanted is None or getattr(wanted, k) != getattr(saved, k)]
    if differ:
        raise ConfigError("--resume keeps the run's own config (" + str(saved_file) + "); these differ from it: "
                          + ", ".join(f"--{k.replace('_', '-')} {asked[k]} (the run's {getattr(saved, k)})"
                                      for k in differ)
                          + "; drop them, or start a new run (--out NEW) to change them")


def add_parsers(sub) -> None:
    """Register `bloodcell train`."""
    p = sub.add_parser("train", usage=CONFIG_USAGE, help="train one model into a run folder (or K folds: --folds)",
                       description=cmd_train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/train", help="run folder (default: runs/train)")
    p.add_argument("--config", help="YAML file of config keys (flags override it)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--adapt-data", metavar="PATH", help="with --init-from and few labelled cells: the lab's "
                   "images (a plain folder works) the start's batch-norm statistics are fitted to (default: "
                   "the labelled cells' own)")
    p.add_argument("--plain-finetune", action="store_true", help="with --init-from: a plain training run from "
                   "the model, not the fine-tune that keeps the adapted start unless the labelled cells' "
                   "cross-validation shows a gain (taken with at most 50 labelled cells per class)")
    add_config_flags(p, TrainConfig)
    p.set_defaults(func=cmd_train)
