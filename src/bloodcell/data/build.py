"""What data set a training config reads: ``config_dataset`` (decoded, split, folded, classes
chosen as the config says), ``source_dataset`` (before any fold) and ``dataset_key`` (configs with
equal keys share one load: compare, kfold, lab_out and tune hand one data set to every training).

>>> from bloodcell.data.build import config_dataset
>>> ds = config_dataset(cfg)
"""

from __future__ import annotations

from bloodcell.config import TrainConfig
from bloodcell.data.dataset import join_train, load_dataset
from bloodcell.data.folds import fold_dataset
from bloodcell.data.records import Dataset
from bloodcell.data.sources import few_labels, load_sources, select_classes
from bloodcell.errors import DataError

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
