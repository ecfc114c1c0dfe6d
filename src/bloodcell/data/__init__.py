"""The data layer's Python API: ``load_dataset(path, image_size=64)`` and what it returns.

>>> from bloodcell.data import load_dataset
>>> ds = load_dataset("synthetic", image_size=64)      # or a folder of images
>>> ds.classes, {k: len(s) for k, s in ds.splits.items()}
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bloodcell.data.cache import build_cache, default_cache_dir
from bloodcell.data.layouts import Problem, Source, discover, is_synthetic, raise_if_fatal
from bloodcell.data.loader import BatchLoader
from bloodcell.data.splits import make_splits
from bloodcell.errors import DataError

__all__ = ["BatchLoader", "Dataset", "Split", "discover", "load_dataset", "take_rows"]


@dataclass
class Split:
    """One split's decoded images (uint8 N x H x W x 3, memory-mapped), labels, groups and paths."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    paths: list[str]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    """A loaded data set: classes, layout, splits and the problems found on the way."""

    root: str
    layout: str
    classes: list[str]
    splits: dict[str, Split]
    image_size: int
    resize: str
    problems: list[Problem] = field(default_factory=list)
    cached: bool = False
    group_by: str = "file"

    def split_files(self) -> dict[str, list[str]]:
        """Split name -> the list of its files, as saved in every run's splits.json."""
        return {k: list(s.paths) for k, s in self.splits.items()}

    def summary(self) -> dict:
        """Classes x splits counts of images and groups, JSON-ready."""
        out = {}
        for name, s in self.splits.items():
            out[name] = {
                "images": {c: int((s.labels == i).sum()) for i, c in enumerate(self.classes)},
                "groups": {c: int(len(np.unique(s.groups[s.labels == i]))) for i, c in enumerate(self.classes)},
            }
        return out


def load_dataset(path: str | os.PathLike | None = "synthetic", image_size: int = 64, seed: int = 0,
                 resize: str = "squash", cache_dir: str | os.PathLike | None = None,
                 fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), val_fraction: float = 0.15,
                 group_regex: str | None = None, workers: int | None = None, progress=None,
                 source: Source | None = None, group_by: str = "auto") -> Dataset:
    """Discover, split and decode a data set into cached arrays; raise DataError if unusable."""
    if image_size < 8:
        raise DataError(f"image size must be at least 8 px, got {image_size}")
    if is_synthetic(path):
        return _load_synthetic(path, image_size, seed, cache_dir, fractions)
    src = source or discover(path, group_regex=group_regex, group_by=group_by, cache_dir=cache_dir)
    raise_if_fatal(src)
    images, errors, cached = build_cache(src.items, image_size, resize, cache_dir, workers, progress)
    bad = [(it.path, e) for it, e in zip(src.items, errors, strict=True) if e]
    problems = list(src.problems)
    if bad:
        problems.append(Problem("unreadable_images", f"{len(bad)} file(s) could not be decoded and were skipped",
                                [f"{p}: {e}" for p, e in bad]))
    ok = np.array([e is None for e in errors], dtype=bool)
    good_items = [it for it, k in zip(src.items, ok, strict=True) if k]
    if len({it.label for it in good_items}) < 2:
        raise DataError(f"fewer than two classes have readable images under {src.root}")
    index = np.flatnonzero(ok)
    groups_all = {g: i for i, g in enumerate(sorted({it.group for it in good_items}))}
    splits = {}
    for name, idx in make_splits(good_items, seed, fractions, val_fraction).items():
        if not idx:
            continue
        rows = index[idx]
        splits[name] = Split(
            images=images[rows] if len(rows) < len(images) // 2 else _Rows(images, rows),
            labels=np.array([good_items[i].label for i in idx], dtype=np.int64),
            groups=np.array([groups_all[good_items[i].group] for i in idx], dtype=np.int64),
            paths=[good_items[i].path for i in idx],
        )
    return Dataset(src.root, src.layout, list(src.classes), splits, image_size, resize, problems, cached,
                   src.group_by)


def take_rows(images, rows: np.ndarray):
    """Some rows of a split's images. Where the split is a lazy view of the memory map (as
    ``load_dataset`` gives a big split), a view of those rows: nothing is read until a batch asks,
    and nothing is copied into RAM. Where it is already in RAM (a small split), a copy, so the rows
    left out can be freed."""
    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(images, _Rows):
        return _Rows(images.base, images.rows[rows])
    return images[rows]


class _Rows:
    """A lazy row view of a memory-mapped array, so a big split is not copied into RAM."""

    def __init__(self, base: np.ndarray, rows: np.ndarray):
        self.base, self.rows = base, rows
        self.shape = (len(rows), *base.shape[1:])
        self.dtype = base.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        return self.base[self.rows[key]]

    def __array__(self, dtype=None, copy=None):
        a = self.base[self.rows]
        return a.astype(dtype) if dtype is not None else a


def _load_synthetic(path, image_size: int, seed: int, cache_dir, fractions) -> Dataset:
    from bloodcell.data import synthetic
    from bloodcell.data.layouts import Item

    src = discover(path)
    n = src.synthetic_n
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    # The generator's own source is part of the key: a changed generator never reads an old cache.
    version = hashlib.sha1(Path(synthetic.__file__).read_bytes()).hexdigest()[:10]
    f = cache_dir / f"synthetic-{version}-{seed}-{n}-{image_size}.npy"
    f_labels = f.with_suffix(".labels.npy")
    if f.exists() and f_labels.exists():
        images, labels, cached = np.load(f, mmap_mode="r"), np.load(f_labels), True
    else:
        images, labels = synthetic.generate(n, image_size, seed)
        for target, arr in ((f_labels, labels), (f, images)):  # images last: their presence means complete
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp.npy")
            np.save(tmp, arr)
            os.replace(tmp, target)
        cached = False
    items = [Item(f"synthetic://{seed}/{i}", int(labels[i]), f"synthetic://{seed}/{i}") for i in range(n)]
    splits = {}
    for name, idx in make_splits(items, seed, fractions).items():
        idx = np.asarray(idx)
        splits[name] = Split(np.asarray(images[idx]), np.asarray(labels)[idx].astype(np.int64), idx.copy(),
                             [items[i].path for i in idx])
    return Dataset("synthetic", "synthetic", list(src.classes), splits, image_size, "squash", [], cached)


def save_splits(ds: Dataset, path: str | os.PathLike) -> None:
    """Write splits.json: split name -> list of files."""
    Path(path).write_text(json.dumps(ds.split_files(), indent=1))
