"""The data layer's Python API: ``load_dataset(path, image_size=64)`` and what it returns.

>>> from bloodcell.data import load_dataset
>>> ds = load_dataset("synthetic", image_size=64)      # or a folder of images
>>> ds.classes, {k: len(s) for k, s in ds.splits.items()}
"""

from __future__ import annotations

import dataclasses
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

__all__ = ["BatchLoader", "Dataset", "Split", "discover", "join_train", "load_dataset", "problem_lines",
           "take_rows"]


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
    extra_train: dict = field(default_factory=dict)  # what join_train added: root, images per class

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


def join_train(ds: Dataset, extra: Dataset) -> Dataset:
    """``ds`` with the train images of ``extra`` (another data set, loaded at the same size and
    resize) added to its train split: those of ``ds``'s classes, matched by name in any case; the
    rest are left out. Only ``extra``'s own train split is taken, so its val and test stay unseen;
    ``ds``'s val and test are untouched. The train images become a lazy concatenation of the two
    splits' images: a memory-mapped one is read only as batches ask for its rows."""
    index = {c.lower(): i for i, c in enumerate(ds.classes)}
    lut = np.array([index.get(c.lower(), -1) for c in extra.classes], dtype=np.int64)
    x = extra.splits.get("train")
    keep = np.flatnonzero(lut[x.labels] >= 0) if x is not None else np.zeros(0, np.int64)
    if len(keep) == 0:
        raise DataError(f"no train image of {extra.root} is of a class of {ds.root}: its classes are "
                        f"{', '.join(extra.classes)}, this data's {', '.join(ds.classes)} (matched by name)")
    a = ds.splits.get("train")
    if a is None:
        raise DataError(f"{ds.root} has no train split to add {extra.root}'s images to")
    labels = lut[x.labels[keep]]
    train = Split(_Joined([a.images, take_rows(x.images, keep)]), np.concatenate([a.labels, labels]),
                  np.concatenate([a.groups, x.groups[keep] + int(a.groups.max(initial=-1)) + 1]),
                  list(a.paths) + [x.paths[k] for k in keep])
    added = {ds.classes[i]: int((labels == i).sum()) for i in range(len(ds.classes)) if (labels == i).any()}
    problems = [Problem(p.kind, f"{_EXTRA}{extra.root}: {p.detail}", p.paths, p.fatal) for p in extra.problems]
    info = {"root": extra.root, "images": added, "left_out": [c for c, i in zip(extra.classes, lut, strict=True) if i < 0]}
    return dataclasses.replace(ds, splits={**ds.splits, "train": train}, problems=ds.problems + problems,
                               extra_train=info)


_EXTRA = "--extra-train "  # how join_train marks the problems it brings in from the other set


def problem_lines(ds: Dataset, data: str) -> list[str]:
    """One console line per problem the data load found (files skipped, say), naming the ``bloodcell
    data check`` that lists it: ``data``'s, or the --extra-train set's for one join_train brought in."""
    return [f"data: {p.detail} (bloodcell data check "
            f"{ds.extra_train['root'] if p.detail.startswith(_EXTRA) else data} lists them)" for p in ds.problems]


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


class _Joined:
    """A lazy concatenation of row arrays (memory maps or their row views): a read touches only the
    rows it asks for."""

    def __init__(self, parts: list):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            rows = np.arange(*key.indices(n))
        else:
            rows = np.asarray(key, dtype=np.int64)
            if rows.ndim == 0:
                row = int(rows) + n if rows < 0 else int(rows)
                if not 0 <= row < n:
                    raise IndexError(f"row {int(rows)} out of range for {n} rows")
                p = int(np.searchsorted(self.starts, row, side="right")) - 1
                return self.parts[p][row - self.starts[p]]
            rows = np.where(rows < 0, rows + n, rows)
            if rows.size and (rows.min() < 0 or rows.max() >= n):
                raise IndexError(f"row out of range for {n} rows")
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.parts[p][rows[sel] - self.starts[p]]
        return out

    def __array__(self, dtype=None, copy=None):
        a = self[:]
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
