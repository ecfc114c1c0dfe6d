"""``bloodcell models``: the registered models.

The library is imported inside the handlers (lazy imports, marked): ``bloodcell --help`` and a bad
flag answer at once, without loading torch.
"""

from __future__ import annotations

import sys

from bloodcell.cli.flags import field_type


def cmd_models(args) -> int:
    """bloodcell models [--card]"""
    from bloodcell.models import (  # lazy: start-up
        count_parameters,
        get_model,
        list_models,
        model_info,
    )
    from bloodcell.models.builtin import builtin_dir, manifest

    if args.card:
        card = builtin_dir() / "CARD.md"
        if not card.is_file():
            print("bloodcell: error: this install ships no built-in model card", file=sys.stderr)
            return 2
        print(card.read_text(encoding="utf-8"))
        return 0

    print(f"{'name':20s} {'params':>12s}  description (parameters at {args.image_size} px, 4 classes)")
    for name in list_models():
        n = count_parameters(get_model(name, num_classes=4, image_size=args.image_size))
        print(f"{name:20s} {n:>12,}  {model_info(name)['description']}")
    for kind, entry in manifest().items():
        print(f"{'builtin':20s} {entry.get('params', 0):>12,}  the shipped {kind}: {entry.get('summary', '')} "
              "(bloodcell models --card)")
    print(f"{'timm/<name>':20s} {'':>12s}  any timm model (pip install 'bloodcell[timm]'); --pretrained for "
          "its weights, and for resnet18, efficientnet_b0, mobilenet_v3_small")
    return 0


def add_parsers(sub) -> None:
    """Register `bloodcell models`."""
    p = sub.add_parser("models", help="list the registered models and the built-in ones",
                       description=cmd_models.__doc__)
    p.add_argument("--image-size", type=field_type("image_size"), default=64,
                   help="the side the parameter counts are for (default: 64; %(type)s)")
    p.add_argument("--card", action="store_true", help="print the built-in models' card: what they were trained "
                   "on, how they score on each lab, where they fail, and the command that rebuilds them")
    p.set_defaults(func=cmd_models)
