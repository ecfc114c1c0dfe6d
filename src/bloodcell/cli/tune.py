"""``bloodcell tune`` and ``bloodcell tune report``: Optuna studies over the training config.

The library is imported inside the handlers (lazy imports, marked): ``bloodcell --help`` and a bad
flag answer at once, without loading optuna or torch.
"""

from __future__ import annotations

import argparse
import sys

from bloodcell.cli.flags import bounded, field_type, threads_type
from bloodcell.config import CHOICES, PRUNE_FROM_EPOCH, PRUNERS, SELECTIONS, TUNE_METRICS, load_yaml


def cmd_tune(args) -> int:
    """bloodcell tune --data PATH --model cnn4x32 --trials 20 [--timeout MIN] [--space FILE] --out DIR

    More workers: run the same command elsewhere with --storage postgresql://USER@HOST/DB.
    The study's hand strategy: --grid image_size=48,64,96 batch_size=32,64,128.
    A recipe for another microscope: --data LAB1 --data LAB2 --data LAB3 --select lab-out.
    Continue an interrupted study: bloodcell tune --resume DIR. Rebuild its report: bloodcell tune report DIR.
    """
    from bloodcell.runtime import exit_code, stopped_by  # lazy: start-up (torch)
    from bloodcell.training.distributed import single_process  # lazy: start-up (torch)
    from bloodcell.tune import tune  # lazy: start-up (optuna, torch)

    single_process("tune")
    base = load_yaml(args.config) if args.config else {}
    for k in ("cache_dir", "seed", "device", "threads", "nproc"):
        if getattr(args, k) is not None:
            base[k] = getattr(args, k)
    try:
        if args.resume:
            out = args.out if args.resume is True else args.resume
            tune(out=out, trials=args.trials, timeout_min=args.timeout, resume=True,
                 report=not args.no_report)
        else:
            data = (args.data[0] if len(args.data) == 1 else args.data) if args.data else "synthetic"
            tune(data, args.model or "cnn4x32", args.trials, args.out,
                 timeout_min=args.timeout, space=args.space, grid=args.grid, storage=args.storage,
                 study_name=args.study, metric=args.metric, pruner=args.pruner, select=args.select, base=base,
                 sampler_seed=args.sampler_seed, report=not args.no_report)
    except KeyboardInterrupt as e:
        out = args.out if args.resume in (None, True) else args.resume
        print(f"bloodcell: {stopped_by(e)}; finished trials are kept: 'bloodcell tune --resume {out}' "
              "continues the study", file=sys.stderr)
        return exit_code(e)
    return 0


def cmd_tune_report(args) -> int:
    """bloodcell tune report DIR"""
    from bloodcell.tune import tune_report  # lazy: start-up (optuna, matplotlib)

    print(tune_report(args.dir))
    return 0


def add_parsers(sub) -> None:
    """Register `bloodcell tune` (and `bloodcell tune report DIR`)."""
    p = sub.add_parser("tune", help="tune the training config with Optuna (resumable, many workers)",
                       description=cmd_tune.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", metavar="DATA",
                   help="a folder of images or 'synthetic[:N]' (default: synthetic); again for several "
                        "sources as one data set")
    p.add_argument("--model", help="model to tune (default: cnn4x32)")
    p.add_argument("--trials", type=bounded(int, 1, 100_000),
                   help="finished trials the study should have, over all workers (default: 20; a grid's "
                        "size with --grid; %(type)s)")
    p.add_argument("--timeout", type=bounded(float, 0, 10**6, "lo"), metavar="MIN",
                   help="stop starting trials after MIN minutes (%(type)s)")
    p.add_argument("--space", metavar="FILE", help="YAML space file; its entries replace the default's "
                                                   "(see bloodcell/presets/tune/space.yaml)")
    p.add_argument("--grid", nargs="+", metavar="KEY=V1,V2", help="a grid instead of the search: "
                   "these keys vary, everything else stays at its fixed value")
    p.add_argument("--out", default="runs/tune", help="study folder (default: runs/tune)")
    p.add_argument("--storage", metavar="URL", help="SQLAlchemy URL shared by all workers "
                   "(default: sqlite file DIR/study.db)")
    p.add_argument("--study", metavar="NAME", help="study name in the storage (default: bloodcell-MODEL)")
    p.add_argument("--metric", default="macro_f1", choices=sorted(TUNE_METRICS),
                   help="validation metric to maximise (default: macro_f1)")
    p.add_argument("--pruner", default="median", choices=PRUNERS, help="stop poor trials early, from "
                   f"epoch {PRUNE_FROM_EPOCH} on, after the learning-rate warm-up (default: median)")
    p.add_argument("--select", default="val", choices=SELECTIONS,
                   help="what scores a trial: its validation split, or each lab of several --data left "
                        "out in turn (one model per lab, trained on the others, scored on that lab's "
                        "train and val images: for a recipe meant for another microscope; no pruning) "
                        "(default: val)")
    p.add_argument("--config", metavar="FILE", help="YAML of train config keys every trial shares")
    p.add_argument("--cache-dir", help="decoded-image cache folder")
    p.add_argument("--seed", type=field_type("seed"),
                   help="split and training seed shared by every trial (default 0; %(type)s)")
    p.add_argument("--device", choices=list(CHOICES["device"]))
    p.add_argument("--threads", type=threads_type(), help="CPU threads per worker (default: physical cores; "
                                                        "%(type)s)")
    p.add_argument("--nproc", type=field_type("nproc"), help="train each trial on N processes of this machine "
                                                           "(torch.distributed; default 1; %(type)s)")
    p.add_argument("--sampler-seed", type=field_type("seed"), help="seed of the sampler (default: random, so "
                   "that workers draw different trials; %(type)s)")
    p.add_argument("--resume", nargs="?", const=True, metavar="DIR",
                   help="continue the study in DIR (default: --out) with its saved settings")
    p.add_argument("--no-report", action="store_true", help="skip report.html at the end (with many "
                   "workers, one 'bloodcell tune report DIR' afterwards is enough)")
    p.set_defaults(func=cmd_tune)
    actions = p.add_subparsers(dest="tune_action", metavar="ACTION")
    r = actions.add_parser("report", help="rebuild a study's report.html", description=cmd_tune_report.__doc__)
    r.add_argument("dir", help="the study folder (--out of bloodcell tune)")
    r.set_defaults(func=cmd_tune_report)
