"""What a training config builds: its data set (``config_dataset``) and its model (``build_model``).

>>> from bloodcell.build import build_model, config_dataset
>>> ds = config_dataset(cfg)                     # decoded, split, folded, classes chosen as cfg says
>>> model, kwargs = build_model(cfg, ds.classes)   # kwargs rebuild it (saved in every checkpoint)

``train`` runs what these build; ``compare``, ``crossval``, ``crosslab`` and ``tune`` load a data
set once through them and hand it to each training that shares it (``dataset_key``).
"""

from __future__ import annotations

import torch

from bloodcell.checkpoint import model_kwargs_of, read_checkpoint
from bloodcell.config import TrainConfig
from bloodcell.data import (
    Dataset,
    few_labels,
    join_train,
    load_dataset,
    load_sources,
    select_classes,
)
from bloodcell.data.folds import fold_dataset
from bloodcell.errors import BloodcellError, DataError
from bloodcell.models import get_model, model_info
from bloodcell.pretrained import weights_info


def model_kwargs(cfg: TrainConfig, num_classes: int) -> dict:
    """The arguments that rebuild the model (saved in every checkpoint)."""
    kw = {"num_classes": num_classes, "image_size": cfg.image_size}
    options = model_info(cfg.model)["options"]
    if "norm" in options:
        kw["norm"] = cfg.norm
    if "pool_first" in options:
        kw["pool_first"] = True  # saved, so a checkpoint names its layer order (load_model)
    if "small_stem" in options and cfg.pretrained:
        kw["small_stem"] = False  # the ImageNet stem the weights were trained with, at any size
    if cfg.stain_norm != "none":
        kw["stain_norm"] = cfg.stain_norm
    return kw


def pretrained_recipe(cfg: TrainConfig) -> dict | None:
    """What a --pretrained run starts from and how it fine-tunes (resolved.yaml, metrics.json), or
    None: the weights' source and file, the normalisation and input size they were trained at, and
    the learning rates of the new classifier and of the pretrained backbone."""
    if not cfg.pretrained:
        return None
    info = weights_info(cfg.model)
    if cfg.weights:
        info["file"] = str(cfg.weights)
    return {**info, "image_size": cfg.image_size, "head_lr": cfg.lr, "backbone_lr": cfg.lr * cfg.backbone_lr,
            "freeze_epochs": cfg.freeze_epochs}


# The config keys that decide the data set (what is read, how it is decoded, split and grouped).
DATASET_KEYS = ("data", "image_size", "resize", "seed", "cache_dir", "fractions", "val_fraction",
                "group_regex", "group_by", "extra_train", "classes", "labels_per_class", "folds", "fold")


def dataset_key(cfg: TrainConfig) -> tuple:
    """Configs with equal keys load the same data set (one load serves them all)."""
    return tuple(getattr(cfg, k) for k in DATASET_KEYS)


def source_dataset(cfg: TrainConfig) -> Dataset:
    """The config's data as loaded and split (train, val, test), before any fold, --extra-train or
    --classes: what every fold of a cross-validation starts from."""
    return load_sources(cfg.data if isinstance(cfg.data, str) else list(cfg.data), image_size=cfg.image_size,
                        seed=cfg.seed, resize=cfg.resize, cache_dir=cfg.cache_dir, fractions=cfg.fractions,
                        val_fraction=cfg.val_fraction, group_regex=cfg.group_regex, group_by=cfg.group_by)


def config_dataset(cfg: TrainConfig, loaded: Dataset | None = None):
    """The data set a training config describes: its data, image size, resize, split and groups;
    with --folds and --fold, that fold of the pooled train and val images as val (data.folds);
    and the train images of --extra-train (split by its own defaults and the same seed) joined.
    ``loaded`` is ``source_dataset(cfg)`` already loaded (a cross-validation loads it once)."""
    ds = loaded or source_dataset(cfg)
    if cfg.folds and cfg.fold is not None:  # before --extra-train: its images train every fold, never validate
        ds = fold_dataset(ds, cfg.folds, cfg.fold, cfg.seed)
    if cfg.extra_train:
        try:
            extra = load_dataset(cfg.extra_train, image_size=cfg.image_size, seed=cfg.seed, resize=cfg.resize,
                                 cache_dir=cfg.cache_dir)
        except DataError as e:  # say which of the two data sets it is about
            raise DataError(f"--extra-train: {e}") from e
        ds = join_train(ds, extra)
    if cfg.classes:  # chosen after the split, so each kept image is in the split it would be in anyway
        ds, _ = select_classes(ds, list(cfg.classes), whose="--classes")
        missing = [c for c in cfg.classes if not any((s.labels == cfg.classes.index(c)).any()
                                                     for s in ds.splits.values())]
        if missing:
            raise DataError(f"--classes: no image of {', '.join(missing)} in {ds.root} (its classes: "
                            f"{', '.join(sorted({c for s in ds.sources for c in s['classes']}) or ds.classes)})")
    if cfg.labels_per_class:  # a few labelled cells: drawn from train and val, test untouched
        ds = few_labels(ds, cfg.labels_per_class, cfg.seed)
    return ds


def build_model(cfg: TrainConfig, classes: list[str]) -> tuple[torch.nn.Module, dict]:
    """The model for a config, with local pretrained weights or another run's weights if asked."""
    kw = model_kwargs(cfg, len(classes))
    model = get_model(cfg.model, weights=cfg.weights, pretrained=cfg.pretrained, **kw)
    if cfg.init_from:
        src = read_checkpoint(cfg.init_from)
        layout = model_kwargs_of(src).get("pool_first"), kw.get("pool_first")
        if None not in layout and layout[0] != layout[1]:
            raise BloodcellError(f"--init-from {cfg.init_from}: its model pools after the ReLU (an "
                                 "older bloodcell's layer order), so its weights do not map onto "
                                 "today's: train it again")
        own = model.state_dict()
        # A stain-normalised model keeps its weights under "net.": match names without it.
        bare = {k.removeprefix("net."): k for k in own}
        take = {bare[k]: v for k, v in ((k.removeprefix("net."), v) for k, v in src["state_dict"].items())
                if k in bare and own[bare[k]].shape == v.shape}
        if not take:
            raise BloodcellError(f"--init-from {cfg.init_from}: no weights fit model {cfg.model}")
        model.load_state_dict(take, strict=False)
    return model, kw
