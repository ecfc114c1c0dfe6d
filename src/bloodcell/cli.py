"""bloodcell: train, compare, tune and serve CNNs for blood-cell image classification.

Usage:
    bloodcell compare --out runs/compare            # the main job (built-in synthetic data)
    bloodcell compare --data PATH --out runs/mine   # ... on your images
    bloodcell train --data PATH --model cnn4x32 --epochs 10 --out runs/cnn4x32
    bloodcell evaluate runs/cnn4x32 --data PATH
    bloodcell data check PATH
    bloodcell models
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import fields

from bloodcell.config import CHOICES, FIELD_HELP, TrainConfig, hints, load_yaml, make_config
from bloodcell.errors import BloodcellError

DATA_HELP = ("data: a folder of images (Kaggle blood-cells layout, <class>/ folders, or "
             "{train,val,test}/<class>/ folders) or 'synthetic[:N]' for the built-in generated set "
             "(default)")


def add_config_flags(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per config field (--image-size for image_size), default None = 'not given'."""
    types_ = hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = types_[f.name]
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_ = (DATA_HELP if f.name == "data" else FIELD_HELP.get(f.name, "")) + f" (default: {shown})"
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            metavar = "LIST" if typing.get_origin(tp) is tuple else f.name.upper()
            if f.name in CHOICES:
                metavar = "{" + ",".join(CHOICES[f.name]) + "}"
            p.add_argument(flag, default=None, metavar=metavar, help=help_.strip())


def given(args: argparse.Namespace, cls) -> dict:
    """The config fields given on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


def train_config(args: argparse.Namespace) -> TrainConfig:
    """YAML file (--config) first, then flags on top; unknown keys are an error."""
    base = load_yaml(args.config) if getattr(args, "config", None) else {}
    return make_config(TrainConfig, base, given(args, TrainConfig))


# ---------------------------------------------------------------------------------------------


def cmd_train(args) -> int:
    """bloodcell train --data PATH --model NAME --epochs E --out RUN_DIR"""
    from bloodcell.train import train

    if args.resume:
        train(TrainConfig(), args.resume, resume=True, progress=not args.quiet)
        return 0
    cfg = train_config(args)
    train(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"run folder: {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    """bloodcell evaluate RUN_DIR|CHECKPOINT --data PATH [--split NAME[,NAME...]]"""
    from bloodcell.evaluate import evaluate_checkpoint

    res = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, class_map=args.class_map,
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
    return 0


def cmd_data_check(args) -> int:
    """bloodcell data check PATH [--json]"""
    from bloodcell.data.check import check_data, format_check

    report = check_data(args.path, seed=args.seed, group_regex=args.group_regex, group_by=args.group_by)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_check(report))
    if not report["usable"]:
        fatal = [p["detail"] for p in report["problems"] if p["fatal"]]
        print(f"bloodcell: error: data not usable: {fatal[0] if fatal else 'see problems above'}",
              file=sys.stderr)
        return 1
    return 0


def cmd_models(args) -> int:
    """bloodcell models"""
    from bloodcell.models import count_parameters, get_model, list_models, model_info

    print(f"{'name':20s} {'params':>12s}  description (parameters at {args.image_size} px, 4 classes)")
    for name in list_models():
        n = count_parameters(get_model(name, num_classes=4, image_size=args.image_size))
        print(f"{name:20s} {n:>12,}  {model_info(name)['description']}")
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    ap = argparse.ArgumentParser(prog="bloodcell", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Run 'bloodcell COMMAND --help' for a command's options.")
    from bloodcell import __version__

    ap.add_argument("--version", action="version", version=f"bloodcell {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train one model into a run folder",
                       description=cmd_train.__doc__)
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
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--split", help="split(s) to evaluate, comma-separated, 'all' for every image (default: "
                                   "test and test_simple of the training data; all images of another data set)")
    p.add_argument("--class-map", help="DATA=MODEL,... where class names differ beyond case")
    p.add_argument("--tta", action="store_true", help="average over the 8 flips and rotations")
    p.add_argument("--restrict", action="store_true",
                   help="score only the classes the data has (renormalised): e.g. an 8-class model on a "
                        "4-class set")
    p.add_argument("--cache-dir", help="decoded-image cache folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", help="folder for metrics.json and predictions CSVs")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("data", help="data set tools", description="bloodcell data check PATH")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    q = dsub.add_parser("check", help="tables of classes x splits, sizes, modes and problems",
                        description=cmd_data_check.__doc__)
    q.add_argument("path", nargs="?", default="synthetic", help=DATA_HELP)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    q.add_argument("--group-regex", help=FIELD_HELP["group_regex"])
    q.add_argument("--group-by", default="auto", choices=CHOICES["group_by"], help=FIELD_HELP["group_by"]
                   + " (default: auto)")
    q.set_defaults(func=cmd_data_check)

    p = sub.add_parser("models", help="list the registered models", description=cmd_models.__doc__)
    p.add_argument("--image-size", type=int, default=64)
    p.set_defaults(func=cmd_models)

    for register in _EXTRA:
        register(sub)
    return ap


_EXTRA: list = []  # other modules' subcommands register here (see extra_commands())


def extra_commands() -> None:
    """Import the optional command modules that add subcommands (compare, report, tune, ...)."""
    import importlib

    for mod in ("compare", "report", "tune", "predict", "export", "serve"):
        try:
            m = importlib.import_module(f"bloodcell.{mod}")
        except ModuleNotFoundError as e:
            if e.name == f"bloodcell.{mod}":
                continue
            raise
        if hasattr(m, "add_cli") and m.add_cli not in _EXTRA:
            _EXTRA.append(m.add_cli)


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and turn a BloodcellError into one line and exit code 2."""
    extra_commands()
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 0 if args.command is None else 2
    try:
        return args.func(args) or 0
    except BloodcellError as e:
        print(f"bloodcell: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a library function's argument check, e.g. an unknown model name
        print(f"bloodcell: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bloodcell: interrupted; finished epochs are saved: 'train --resume RUN_DIR', the same "
              "'compare' command, or 'tune --resume DIR' continues", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
