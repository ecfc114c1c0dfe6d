"""Flags made from config fields: one flag per field (``--image-size`` for ``image_size``)."""

from __future__ import annotations

import argparse
import typing
from dataclasses import fields

from bloodcell.config import (
    CHOICES,
    FIELD_GROUPS,
    TRACKERS,
    TrainConfig,
    hints,
    load_yaml,
    make_config,
)

DATA_HELP = ("data: a folder of images (Kaggle blood-cells layout, Kaggle breast histopathology (IDC) "
             "<patient>/{0,1}/ folders, <class>/ folders, or {train,val,test}/<class>/ folders), a label "
             "table (.csv or .tsv: path,label[,group][,split]), a MedMNIST .npz file or name "
             "(bloodmnist, bloodmnist_128), or 'synthetic[:N]' for the built-in generated set "
             "(default); give --data again for several sources (labs) as one data set: classes matched "
             "by name, each source split on its own, validation pooled and reported per source")

def bounded(kind, lo, hi):
    """An argparse type: ``kind`` (int or float) within [lo, hi], finite; anything else is refused
    with the range, before any work."""
    import math

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if (kind is float and not math.isfinite(v)) or not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{text} is outside [{lo:g}, {hi:g}]")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


# The usage line of a command with the config's flags: the flags are listed by group below it.
CONFIG_USAGE = "%(prog)s [-h] [--out DIR] [--config YAML] [options by group, below]"


def add_config_flags(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per config field (--image-size for image_size), default None = 'not given'; shown in
    `--help` under the field's group (data, model, optimisation, ...)."""
    types_ = hints(cls)
    groups = {g: p.add_argument_group(f"{g} options") for g in FIELD_GROUPS}
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = types_[f.name]
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_ = (DATA_HELP if f.name == "data" else f.metadata["help"]) + f" (default: {shown})"
        g = groups[f.metadata["group"]]
        if f.name == "data":
            g.add_argument(flag, action="append", default=None, metavar="DATA", help=help_)
        elif f.name == "log":  # --log tensorboard --log mlflow, or --log tensorboard,mlflow
            g.add_argument(flag, action="append", default=None, metavar="{" + ",".join(TRACKERS) + "}",
                           help=help_)
        elif tp is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            metavar = "LIST" if typing.get_origin(tp) is tuple else f.name.upper()
            if f.name in CHOICES:
                metavar = "{" + ",".join(CHOICES[f.name]) + "}"
            g.add_argument(flag, default=None, metavar=metavar, help=help_.strip())


def given(args: argparse.Namespace, cls) -> dict:
    """The config fields given on the command line."""
    out = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    if isinstance(out.get("log"), list):
        out["log"] = ",".join(out["log"])
    return out


def train_config(args: argparse.Namespace) -> TrainConfig:
    """YAML file (--config) first, then flags on top; unknown keys are an error."""
    base = load_yaml(args.config) if getattr(args, "config", None) else {}
    return make_config(TrainConfig, base, given(args, TrainConfig))
