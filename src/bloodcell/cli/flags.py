"""Flags made from config fields: one flag per field (``--image-size`` for ``image_size``)."""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import fields

from bloodcell.config import (
    CHOICES,
    FIELD_GROUPS,
    TRACKERS,
    Range,
    TrainConfig,
    checked,
    field_range,
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
        rng = f.metadata.get("range")
        help_ = (DATA_HELP if f.name == "data" else f.metadata["help"]) + f" (default: {shown}" + (
            f"; in {rng})" if rng is not None else ")")
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
            number = tp in (int, float, int | None, float | None)
            g.add_argument(flag, default=None, metavar=metavar, help=help_.strip(),
                           **({"type": not_empty(rng)} if number else {}))


def not_empty(rng: Range | None):
    """The argparse type of a numeric config flag: any text but an empty one (``--fold=`` is a slip,
    not "every fold"); the value and its range (``.range``) are checked with the config
    (check_given), where a YAML file's values are too."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError("an empty value: give a number")
        return text

    parse.range = rng
    return parse


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


def bounded(tp: type, lo: float | None = None, hi: float | None = None, open: str = "", *,
            rng: Range | None = None, why: str = ""):
    """An argparse type: a number of type ``tp`` (int or float) within ``lo`` to ``hi`` (Range's
    ends), else argparse's one error line naming the flag and the range. NaN and infinities are
    outside every bounded range; ``--help`` shows the range where the flag's help uses ``%(type)s``."""
    rng = rng or Range(lo, hi, open)
    what = "a whole number" if tp is int else "a number"

    def parse(text: str):
        try:
            value = tp(text)
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} in {rng}") from None
        if value not in rng:
            raise argparse.ArgumentTypeError(f"{text} is outside {rng}{why}")
        return value

    parse.__name__ = f"{what} in {rng}"  # what argparse's messages and %(type)s say
    parse.range = rng
    return parse


def field_type(name: str):
    """The argparse type of a flag that sets a TrainConfig field outside add_config_flags (tune's
    --seed): the field's own range."""
    tp = hints(TrainConfig)[name]
    tp = int if tp in (int, int | None) else float
    return bounded(tp, rng=field_range(name))


def check_given(args: argparse.Namespace, cls=TrainConfig) -> dict:
    """The config flags given, each converted and within its range (a bad one is one line before
    any work): for commands that hand a partial config on (compare, crosslab)."""
    return checked(cls, given(args, cls))


def threads_type():
    """The argparse type of a --threads flag: 0 (the physical cores) up to the threads this machine
    runs at once; more is refused, saying what the machine has."""
    from bloodcell.cpu import physical_cores, usable_cpus

    n = usable_cpus()
    return bounded(int, 0, n, why=f" (this machine runs {n} threads at once; 0: its {physical_cores()} "
                   "physical cores)")


def _bytes_escaped(err: UnicodeError):
    """A codec error handler: a byte of a non-UTF-8 file name (a lone surrogate, as os.fsdecode reads
    it) as \\xNN, any other unprintable character as \\uNNNN."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    bad = err.object[err.start:err.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}"
                   for c in bad), err.end


def names_as_bytes() -> None:
    """Print a file or class name that is not UTF-8 by its bytes (\\xff) instead of failing with a
    codec error: stdout and stderr of a command that prints paths get that error handler."""
    import codecs  # lazy: only commands that print names need it

    try:
        codecs.lookup_error("bloodcell.bytes")
    except LookupError:
        codecs.register_error("bloodcell.bytes", _bytes_escaped)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="bloodcell.bytes")
        except (AttributeError, ValueError, OSError):  # not a text stream of its own (a test's capture)
            pass
