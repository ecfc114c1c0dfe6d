"""``bloodcell compare``: several models under one protocol, and their report.

The library is imported inside the handlers (lazy imports, marked): ``bloodcell --help`` and a bad
flag answer at once, without loading torch.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bloodcell.cli.flags import CONFIG_USAGE, add_config_flags, check_given, given
from bloodcell.config import DEFAULT_MODELS, TrainConfig

PROTOCOL = """\
Every model gets the same split, seed, image size, augmentation and epoch budget (per-model
overrides come only from a YAML file, and are recorded). An interrupted comparison continues where it
stopped: finished models are not trained again, an unfinished one resumes from its last checkpoint."""


def cmd_compare(args) -> int:
    """bloodcell compare --data PATH --models cnn2x32,cnn4x64,cnn4x32,vgg3,resnet18 --out DIR [--folds K]

    With --folds K each model is cross-validated (runs/<model>/folds/<k>/); results and report give
    the mean and spread over the folds, the other tables the fold chosen on validation."""
    from bloodcell.studies.compare import compare, load_protocol, model_list  # lazy: start-up
    from bloodcell.training.distributed import single_process  # lazy: start-up

    single_process("compare")

    preset = args.preset
    if preset is None and args.config is None and args.data is None:
        preset = "demo"  # no data given: the synthetic demo, sized to finish in minutes
        print("no --data given: running the built-in synthetic demo (preset 'demo'); "
              "see 'bloodcell compare --help' to use your images", file=sys.stderr)
    shared, models, overrides = load_protocol(args.config, preset)
    ensemble = bool(shared.pop("ensemble", False))
    check_given(args)  # a flag out of its range: one line before any work
    shared.update(given(args, TrainConfig))
    if args.models:
        # --models narrows the file's list: its overrides of the models left out go with them (an
        # override of a model the file does not list is still a mistake, said by compare)
        listed = set(models or ())
        models = model_list(args.models)
        overrides = {m: o for m, o in overrides.items() if m in models or m not in listed}
    compare(models, shared, args.out, overrides, overwrite=args.overwrite, progress=not args.quiet,
            report=not args.no_report, command="bloodcell " + shlex.join(sys.argv[1:]),
            ensemble=args.ensemble or ensemble)
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def add_parsers(sub) -> None:
    """Register `bloodcell compare`."""
    p = sub.add_parser("compare", usage=CONFIG_USAGE, help="train several models under one protocol and write a report",
                       description=cmd_compare.__doc__ + "\n\n" + PROTOCOL,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help=f"comma-separated model names (default: {','.join(DEFAULT_MODELS)}; "
                                    "see 'bloodcell models'); NAME@LABEL trains an architecture again under "
                                    "a label, which a --config file's overrides can give other settings")
    p.add_argument("--out", default="runs/compare", help="compare folder (default: runs/compare)")
    p.add_argument("--config", help="YAML: shared config keys, 'models' and per-model 'overrides'")
    p.add_argument("--preset", help="a protocol shipped with bloodcell: demo (the built-in data, minutes), "
                                    "best (Kaggle blood cells), pbc (PBC), crosslab (a model for another lab's "
                                    "images), anylab (a model for any lab, trained on every --data lab "
                                    "given); src/bloodcell/presets/compare holds them")
    p.add_argument("--overwrite", action="store_true", help="start again, replacing DIR's runs and results")
    p.add_argument("--ensemble", action="store_true",
                   help="add a row for the mean of all models' probabilities (uniform weights)")
    p.add_argument("--no-report", action="store_true", help="skip report.html/report.md")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(p, TrainConfig, skip=("model",))
    p.set_defaults(func=cmd_compare)
