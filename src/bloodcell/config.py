"""Typed, frozen configs: one per concern. CLI flags map 1:1 to fields; YAML may supply them.

Unknown keys are an error (nanoGPT's rule), and every run folder keeps its resolved config.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from bloodcell.errors import ConfigError

# The allowed values of TrainConfig's string fields that take one of a few: the one list, which the
# modules that act on them (data.cache, data.layouts, transforms) read too.
CHOICES = {
    "optimizer": ("adamw", "sgd"), "schedule": ("cosine", "onecycle", "constant"),
    "precision": ("auto", "fp32", "bf16"), "device": ("auto", "cpu", "cuda"),
    "norm": ("batch", "group", "none"), "stem": ("auto", "small", "imagenet"), "stain_norm": ("none", "image", "gray", "lab"), "augment": ("none", "light", "strong"),
    "mix": ("none", "mixup", "cutmix"),
    "resize": ("squash", "crop", "pad", "cell", "cellfit"),
    "group_by": ("auto", "similar", "name", "file"),
    "monitor": ("val_macro_f1", "val_accuracy", "val_loss", "last"),
}

# Choices and defaults of the commands around training, which their CLI flags show too.
DEFAULT_MODELS = ("cnn2x32", "cnn4x64", "cnn4x32", "vgg3", "resnet18")  # compare's default list
# The registered models --pretrained has weights for (torchvision's); any timm/<name> may have them too.
PRETRAINED_BASELINES = ("resnet18", "efficientnet_b0", "mobilenet_v3_small", "mobilenet_v2")
BACKENDS = ("auto", "onnx", "torchscript", "torch")  # predict and serve: the inference engine
EXPORT_FORMATS = ("onnx", "torchscript")
MAX_UPLOAD_MB = 10.0  # serve: the largest image file accepted
MAX_BATCH = 64  # serve: the most files in one /predict/batch
# serve: the most pixels an upload may decode to (after JPEG's draft reduction): a 24-megapixel camera
# frame passes; a 12,000 x 12,000 PNG (0.4 MB on the wire, 430 MB decoded) gets 413 before decoding
SERVE_MAX_PIXELS = 25_000_000
# serve: the most concurrent /predict images in one forward pass. cnn4x32 at 64 px costs the same CPU
# per image from 1 to 16 a batch and 15 % more at 32 (activations outgrow the cache): batching's gain
# is that one pass serves the queue while the other cores decode
MICRO_BATCH = 16
API_KEY_ENV = "BLOODCELL_API_KEY"  # serve: where the API key may come from instead of --api-key
SHUTDOWN_TIMEOUT_S = 10.0  # serve: how long a SIGTERM waits for the requests in flight

# The groups of TrainConfig's fields, in the order `--help` shows them.
FIELD_GROUPS = ("data", "model", "optimisation", "augmentation", "evaluation", "runtime")


@dataclass(frozen=True)
class Range:
    """The values a number may take: ``lo`` to ``hi``, each end included unless ``open`` names it
    ("lo", "hi" or "both"). NaN is in no range; infinity only in one without that end."""

    lo: float | None = None
    hi: float | None = None
    open: str = ""

    def __contains__(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
            return False
        lo_ok = self.lo is None or (v > self.lo if self.open in ("lo", "both") else v >= self.lo)
        hi_ok = self.hi is None or (v < self.hi if self.open in ("hi", "both") else v <= self.hi)
        return lo_ok and hi_ok

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.open in ('lo', 'both') else '>='} {self.lo:g}"
        return (f"{'(' if self.open in ('lo', 'both') else '['}{self.lo:g}, {self.hi:g}"
                f"{')' if self.open in ('hi', 'both') else ']'}")

    def check(self, name: str, value) -> None:
        """Raise ConfigError naming ``name`` (its flag too) and the range where ``value`` is outside."""
        if value not in self:
            raise ConfigError(f"{name} (--{name.replace('_', '-')}) must be in {self}; got {value!r}")


def opt(default, group: str, help: str, range: Range | tuple | None = None):
    """A config field with its --help text, its group and, for a number, its range beside it
    (``field(metadata=...)``); ``range=(lo, hi)`` is both ends included."""
    if group not in FIELD_GROUPS:
        raise ValueError(f"unknown field group {group!r}")
    if isinstance(range, tuple):
        range = Range(*range)
    return field(default=default, metadata={"group": group, "help": help, "range": range})


def field_range(name: str, cls=None) -> Range | None:
    """The range of a numeric config field (TrainConfig's by default); None for the others."""
    return next(f.metadata.get("range") for f in fields(cls or TrainConfig) if f.name == name)


def field_help(name: str, cls=None) -> str:
    """The --help text of a config field (TrainConfig's by default)."""
    return next(f.metadata["help"] for f in fields(cls or TrainConfig) if f.name == name)



# Experiment trackers --log takes (bloodcell.training.tracking).
TRACKERS = ("tensorboard", "mlflow")
# TrainConfig keys that say where a run is recorded, not what it does: a compare or crosslab
# folder resumed with other values is the same protocol.
RECORD_KEYS = ("log", "mlflow_uri", "nproc")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what one training run does (data, model, optimisation, runtime)."""

    data: str | tuple[str, ...] = opt("synthetic", "data", "")  # its help: cli/flags.py DATA_HELP
    image_size: int = opt(64, "data", "side of the square images the model sees, in pixels", range=(8, 2048))
    resize: str = opt("squash", "data",
        "how a frame becomes a square: squash the whole frame; crop its centre; pad it (letterbox); "
        "cell: a square of 0.8 x the short side centred on the stained white cell; cellfit: that "
        "square sized to the cell, so every cell fills the frame alike at any zoom")
    val_fraction: float = opt(0.15, "data",
        "share of the training images (by group) held out for validation when the data has no val "
        "split", range=Range(0, 1, "both"))
    fractions: tuple[float, float, float] = opt((0.7, 0.15, 0.15), "data",
        "train,val,test shares for a data set with no split folders", range=Range(0, 100, "lo"))
    group_regex: str | None = opt(None, "data",
        "regular expression on file names whose first group names an image's group (its source cell), "
        "for --group-by name")
    group_by: str = opt("auto", "data",
        "what makes images one group, never split apart: similar = look-alike images (augmented "
        "copies of one cell); name = --group-regex (the Kaggle _K_N K without one); file = each file "
        "alone; auto = name with --group-regex, similar for the Kaggle layout, else file. "
        "Byte-identical files always share a group")
    cache_dir: str | None = opt(None, "data",
        "folder of the decoded-image cache; None: $BLOODCELL_CACHE, else ~/.cache/bloodcell")
    extra_train: str | None = opt(None, "data",
        "another data set (another lab's images, say) whose train split joins this one's: its images "
        "of this data's classes, matched by name in any case, at the same size and resize; its val "
        "and test are never used, and validation and test stay this data's")
    classes: tuple[str, ...] = opt((), "data",
        "train on these classes only (names matched in any case, comma-separated; the others' images "
        "are left out after the split); empty: every class of the data")
    labels_per_class: int = opt(0, "data",
        "use only this many labelled cells per class (0: all): drawn, seeded, from the train split's "
        "groups (a group is one cell with its copies), and as many from the val split, so a few-label "
        "fine-tuning (with --init-from) reads no other label; the test split is untouched. With "
        "--monitor last the val labels choose nothing", range=(0, 10**9))
    model: str = opt("cnn4x32", "model",
        "registered model name (bloodcell models lists them), or timm/<name> for any timm model (pip "
        "install 'bloodcell[timm]')")
    norm: str = opt("batch", "model",
        "normalisation layers (the study's four and the torchvision baselines): batch norm; group "
        "norm (each image's own statistics, the same at training and test time, whatever the lab); "
        "none (the study's four only)")
    stem: str = opt("auto", "model",
        "ResNet-18's first layers: small = one 3x3 conv and no max-pool (the CIFAR stem: layer1 at half "
        "the input at 33-64 px, at the input's own size at 32 px and under); imagenet = torchvision's "
        "7x7/2 conv and max-pool (a quarter of the input; 4x fewer operations than small at 48 px); "
        "auto = small at 64 px and under, imagenet above and with --pretrained")
    stain_norm: str = opt("none", "model",
        "stain normalisation, a first layer of the model (so evaluate, predict, serve and export "
        "apply it too): image = each image's colour channels shifted and scaled to mean 0 and spread "
        "1, removing a lab's stain and lighting cast; gray = the same on the grey level, colour "
        "dropped; lab = Reinhard's colour transfer: each image's l-alpha-beta channels (Ruderman's "
        "perceptual space) given fixed reference statistics (Raabin-WBC's cells), colour kept; none = off")
    weights: str | None = opt(None, "model",
        "a local state_dict file to start the model from (never downloaded); with --pretrained, the "
        "pretrained weights themselves, instead of the cache")
    init_from: str | None = opt(None, "model",
        "a bloodcell checkpoint to start from: every weight whose shape fits is taken (a classifier "
        "for other classes is not)")
    pretrained: bool = opt(False, "model",
        "start from the model's ImageNet weights: torchvision's weights API for resnet18, "
        "efficientnet_b0, mobilenet_v3_small (the torch cache, $TORCH_HOME), timm's for timm/<name> "
        "(the Hugging Face cache, $HF_HOME); downloaded once, never with HF_HUB_OFFLINE=1; with "
        "--weights FILE, that file holds them. The images are normalised as the weights were trained, "
        "and the checkpoint keeps that normalisation")
    backbone_lr: float = opt(0.1, "model",
        "with --pretrained: the pretrained layers' learning rate, as a fraction of --lr (the new "
        "classifier gets --lr)", range=(0, 10))
    freeze_epochs: float = opt(0.0, "model",
        "with --pretrained: epochs at the start that train the new classifier only, the pretrained "
        "layers frozen (learning rate 0; their batch-norm statistics still adapt), then they warm up "
        "over --warmup-epochs", range=(0, 100_000))
    epochs: int = opt(12, "optimisation", "passes over the training images", range=(1, 100_000))
    batch_size: int = opt(64, "optimisation", "images per training step", range=(1, 65_536))
    optimizer: str = opt("adamw", "optimisation", "optimiser")
    lr: float = opt(2e-3, "optimisation", "peak learning rate", range=Range(0, 10, "lo"))
    weight_decay: float = opt(0.05, "optimisation",
        "decoupled weight decay (not on biases or normalisation weights)", range=(0, 10))
    momentum: float = opt(0.9, "optimisation", "SGD momentum (Nesterov)", range=Range(0, 1, "hi"))
    schedule: str = opt("cosine", "optimisation", "learning-rate schedule after the linear warm-up")
    warmup_epochs: float = opt(1.0, "optimisation", "epochs of linear learning-rate warm-up", range=(0, 100_000))
    label_smoothing: float = opt(0.1, "optimisation", "label smoothing of the cross-entropy", range=Range(0, 1, "hi"))
    class_weights: bool = opt(False, "optimisation", "weight the loss by inverse class frequency")
    clip_grad: float = opt(5.0, "optimisation", "clip the gradient norm to this (0: off)", range=(0, 1e6))
    augment: str = opt("strong", "augmentation",
        "augmentation preset: none; light = flips and 90-degree rotations; strong = light + affine + "
        "colour and stain jitter")
    blur: float = opt(0.0, "augmentation",
        "also blur each training image by a Gaussian whose standard deviation is drawn from 0 to this "
        "many pixels of the model's input (0: off), as another microscope's focus and resolution "
        "would", range=(0, 8))
    stain_jitter: float = opt(0.0, "augmentation",
        "stain augmentation in the haematoxylin-eosin(-DAB) space of colour deconvolution: each "
        "stain's optical density scaled by 1 +- this and shifted by +- this, drawn per image (0: off; "
        "0.05 light, 0.2 strong)", range=(0, 1))
    gray: float = opt(0.0, "augmentation",
        "share of the training images turned grey, drawn per image (0: off)", range=(0, 1))
    zoom: float = opt(0.0, "augmentation",
        "also magnify each training image by its own factor from 1/(1+this) to 1+this, as another "
        "microscope's objective or camera would (0: off; strong's affine already draws 0.9-1.1)",
        range=(0, 1))
    mix: str = opt("none", "augmentation",
        "blend pairs of training images and their labels: mixup = a weighted average of two images; "
        "cutmix = a box of one pasted into the other; none = off")
    mix_alpha: float = opt(1.0, "augmentation",
        "the mix's Beta(alpha, alpha) draw of how much of each image is kept", range=Range(0, 100, "lo"))
    ema: float = opt(0.0, "optimisation",
        "decay of an exponential moving average of the weights, evaluated instead of them (0: off)", range=Range(0, 1, "hi"))
    patience: int = opt(0, "evaluation",
        "stop after this many epochs without a better validation score (0: never)", range=(0, 100_000))
    monitor: str = opt("val_macro_f1", "evaluation",
        "validation score that chooses the best epoch; last: the last epoch, chosen by nothing")
    tta: bool = opt(False, "evaluation",
        "final evaluation averages 8 flips/rotations of each image (never used to choose anything)")
    seed: int = opt(0, "runtime", "seed of the split, the initialisation, the order and the augmentation", range=(0, 2**32 - 1))
    precision: str = opt("auto", "runtime",
        "auto = fp32 where the hardware has no native bf16; bf16 autocast on a GPU that has it and "
        "on a CPU with AMX; on a CPU with AVX-512 BF16 but no AMX, whichever of the two a timed "
        "training step of the model finds faster (remembered in the user's cache)")
    channels_last: bool = opt(True, "runtime", "channels-last memory format (faster convolutions on CPU)")
    device: str = opt("auto", "runtime", "auto = CUDA if available, else CPU")
    threads: int = opt(0, "runtime",
        "torch threads per process (0: the physical cores, shared among the run's processes on this "
        "machine)", range=(0, 4096))
    folds: int = opt(0, "evaluation",
        "cross-validate: K grouped, stratified folds of the non-test images (train and val pooled), "
        "each trained with one fold as validation, into RUN/folds/<k>/; the test split stays as it is "
        "and chooses nothing; results give the mean and spread over folds (0: one train/val split)", range=(0, 1000))
    fold: int | None = opt(None, "evaluation",
        "with --folds: train only this fold (0 to K-1) into --out, a plain run folder; None: every "
        "fold", range=(0, 999))
    log: tuple[str, ...] = opt((), "runtime",
        "also record the run in these experiment trackers (comma-separated, or --log again): "
        "tensorboard = event files in RUN/tensorboard/ (pip install 'bloodcell[tensorboard]'); mlflow "
        "= an MLflow run (pip install 'bloodcell[mlflow]'); history.csv is always written")
    mlflow_uri: str | None = opt(None, "runtime",
        "MLflow tracking URI for --log mlflow; None: $MLFLOW_TRACKING_URI, else MLflow's local store "
        "(./mlflow.db, artifacts in ./mlruns)")
    nproc: int = opt(1, "runtime",
        "train on this many processes on this machine (torch.distributed: gloo on the CPU, NCCL on "
        "GPUs, one GPU each), as 'torchrun --standalone --nproc-per-node N' would; --batch-size stays "
        "the images per optimiser step, shared among them. Under torchrun (several machines) leave it "
        "at 1: torchrun starts the processes", range=(1, 1024))

    def __post_init__(self) -> None:
        if not isinstance(self.data, str):  # several sources: a tuple; one in a list is just one
            srcs = tuple(str(d) for d in self.data)
            if not srcs:
                raise ConfigError("data: give at least one source")
            if len(set(srcs)) < len(srcs):
                raise ConfigError(f"data: a source is given twice: {', '.join(srcs)}")
            real: dict[str, str] = {}  # one folder under two spellings (small, ./small/, a link)
            for d in srcs:
                other = real.setdefault(os.path.realpath(os.path.expanduser(d)), d)
                if other != d:
                    raise ConfigError(f"data: {other} and {d} are the same data set "
                                      f"({os.path.realpath(os.path.expanduser(d))}); give it once")
            object.__setattr__(self, "data", srcs[0] if len(srcs) == 1 else srcs)
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        for f in fields(self):  # every number within its field's range (a NaN in none)
            rng, value = f.metadata.get("range"), getattr(self, f.name)
            if rng is not None and value is not None:
                for v in value if isinstance(value, tuple) else (value,):
                    rng.check(f.name, v)
        if self.pretrained and not (self.model.startswith("timm/") or self.model in PRETRAINED_BASELINES):
            raise ConfigError(f"--pretrained: {self.model} has no pretrained weights; it is for "
                              f"{', '.join(PRETRAINED_BASELINES)} and timm/<name>")
        if not 0 <= self.freeze_epochs <= self.epochs:
            raise ConfigError(f"freeze_epochs must be in [0, epochs], got {self.freeze_epochs}")
        if len(self.fractions) != 3:
            raise ConfigError(f"fractions must be three positive numbers, got {self.fractions}")
        if self.folds == 1:
            raise ConfigError(f"folds must be 0 (one split) or at least 2, got {self.folds}")
        if self.fold is not None and not (self.folds and 0 <= self.fold < self.folds):
            raise ConfigError(f"fold must be 0 to folds-1 with folds set, got fold {self.fold} of "
                              f"{self.folds} folds" if self.folds else "fold needs folds (--folds K)")
        if self.group_regex:
            try:
                re.compile(self.group_regex)
            except re.error as e:
                raise ConfigError(f"group_regex (--group-regex) {self.group_regex!r} is not a regular "
                                  f"expression: {e}") from None
        bad = [t for t in self.log if t not in TRACKERS]
        if bad:
            raise ConfigError(f"log must name trackers among {', '.join(TRACKERS)}; got {', '.join(bad)}")
        object.__setattr__(self, "log", tuple(dict.fromkeys(self.log)))  # each tracker once

    @property
    def sources(self) -> tuple[str, ...]:
        """The data sources, one or several (``data`` as a tuple)."""
        return (self.data,) if isinstance(self.data, str) else self.data

    def to_dict(self) -> dict:
        """A plain dict (tuples as lists), ready for YAML."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# Every field's default as saved (to_dict): a protocol file written before a field existed holds
# that field's default.
FIELD_DEFAULTS = TrainConfig().to_dict()


def coerce(name: str, tp, value):
    """Convert a YAML or CLI value to the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
            return None
        if isinstance(value, list | tuple):  # a list for a field that may hold one (data: several sources)
            seq = [a for a in args if typing.get_origin(a) is tuple]
            if seq:
                return coerce(name, seq[0], value)
        return coerce(name, next(a for a in args if a is not type(None)), value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        try:
            return tuple(coerce(name, args[0], v) for v in value)
        except TypeError as e:
            raise ConfigError(f"{name} must be a list, got {value!r}") from e
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp in (int, float) and isinstance(value, bool):  # YAML `epochs: true` is not 1
            raise ValueError(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return tp(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"{name} must be {tp.__name__}, got {value!r}") from e


def hints(cls) -> dict:
    """Field name -> resolved type for a config dataclass."""
    return typing.get_type_hints(cls)


def make_config(cls, *sources: dict):
    """Build a frozen config from dicts (later ones win); unknown keys are an error."""
    return cls(**checked(cls, *sources))


def checked(cls, *sources: dict) -> dict:
    """The keys of dicts (later ones win) as a config's fields, each converted to its type and
    within its range; unknown keys are an error. What make_config builds from, and how a command
    that hands a partial config on (compare, tune) refuses a bad flag before any work."""
    known = {f.name: f for f in fields(cls)}
    types_ = hints(cls)
    merged: dict = {}
    for src in sources:
        for key, value in (src or {}).items():
            if not isinstance(key, str):  # YAML allows `1: x`, `null: x`, `[a]: x`
                raise ConfigError(f"config key {key!r} is not a name (a {type(key).__name__})")
            k = key.replace("-", "_")
            if k not in known:
                close = [n for n in known if n.startswith(k[:3])]
                hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
                raise ConfigError(f"unknown config key {key!r} for {cls.__name__}{hint}")
            merged[k] = coerce(k, types_[k], value)
            rng = known[k].metadata.get("range")
            if rng is not None and merged[k] is not None:
                for v in merged[k] if isinstance(merged[k], tuple) else (merged[k],):
                    rng.check(k, v)
    return merged


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file or non-mapping is a ConfigError."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys to values")
    return data


# ---------------------------------------------------------------------------------------------
# tune: what a study is (bloodcell.tune runs it)

# Validation metrics a study may maximise: the config's monitor and the history.csv column.
TUNE_METRICS = {"macro_f1": ("val_macro_f1", "val_macro_f1"), "accuracy": ("val_accuracy", "val_acc")}
PRUNERS = ("median", "hyperband", "none")
# What scores a trial: its validation split ("val"), or each training lab left out in turn ("lab-out":
# one model per lab, trained on the others, scored on that lab's train and val images; DomainBed's
# leave-one-domain-out selection, for a recipe meant for another microscope).
SELECTIONS = ("val", "lab-out")
# The first epoch a pruner may stop a trial after. Epoch 1 runs inside the default one-epoch
# learning-rate warm-up, where a trial's score says little about where it ends: in the 20-trial
# Kaggle study, 9 trials were pruned there when pruning began at epoch 1 (bench/RESULTS.md).
PRUNE_FROM_EPOCH = 2


@dataclass(frozen=True)
class TuneSettings:
    """Everything that defines a study (the space resolved), saved so `--resume` needs only DIR."""

    data: str = "synthetic"
    model: str = "cnn4x32"
    trials: int = 20
    timeout_min: float | None = None
    space: dict = field(default_factory=dict)  # resolved, space-file format
    grid: dict = field(default_factory=dict)
    storage: str | None = None  # None: sqlite in DIR
    study: str | None = None  # None: bloodcell-<model>
    metric: str = "macro_f1"
    pruner: str = "median"
    select: str = "val"
    base: dict = field(default_factory=dict)  # train config keys every trial shares
    sampler_seed: int | None = None

    # Keys that may change between runs of one study (more trials, another time limit), and base
    # keys that belong to one machine rather than to the study.
    MUTABLE = ("trials", "timeout_min", "sampler_seed")
    LOCAL = ("cache_dir", "device", "threads", "log", "mlflow_uri", "nproc")

    def identity(self) -> dict:
        """The settings two workers of one study must agree on."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.MUTABLE}
        # a key given at its default (--seed 0) is the same study as one left out
        d["base"] = {k: v for k, v in self.base.items() if k not in self.LOCAL and (
            k not in FIELD_DEFAULTS or v != FIELD_DEFAULTS[k])}
        return d

    def value_name(self) -> str:
        """What a trial's value is: 'val macro_f1', or 'left-out-lab macro_f1'."""
        return f"{'left-out-lab' if self.select == 'lab-out' else 'val'} {self.metric}"

    def study_name(self) -> str:
        """The study's name in its storage."""
        return self.study or f"bloodcell-{self.model}"

    def storage_url(self, out: Path) -> str:
        """The study's storage: the given URL, else a SQLite file in the study folder."""
        return self.storage or f"sqlite:///{(out / 'study.db').resolve()}"
