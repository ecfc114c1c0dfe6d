"""Loading a data set: discover -> group -> split -> decode (``load_dataset``), adding another set's
train images (``join_train``), and the lazy row views that keep a big split in its memory map."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from bloodcell.data.cache import build_cache, default_cache_dir, synthetic_arrays
from bloodcell.data.groups import similar_groups
from bloodcell.data.layouts import discover, is_synthetic, raise_if_fatal
from bloodcell.data.medmnist import is_medmnist, load_medmnist
from bloodcell.data.records import Dataset, Item, Problem, Source, Split
from bloodcell.data.splits import confounding, lacking_classes, make_splits, unusable_split
from bloodcell.errors import DataError

# A split is copied into RAM only where it is under half of the images and this small; a bigger one
# stays a lazy view of the memory map (bench/large_idc.py: the IDC release's val and test splits
# took 720 MB of RAM as copies).
IN_RAM_BYTES = 256 * 2**20


def discover_grouped(path: str | os.PathLike | None, group_regex: str | None = None, group_by: str = "auto",
                     cache_dir: str | os.PathLike | None = None) -> Source:
    """discover(), then the look-alike groups (groups.similar_groups, cached in ``cache_dir``, by
    default the decoded-image cache folder) where ``group_by`` resolves to ``similar`` and the data
    is usable: every item's group as load_dataset splits by it; and the note where class and
    source (patient) are confounded (splits.confounding)."""
    src = discover(path, group_regex=group_regex, group_by=group_by)
    note = None if any(p.fatal for p in src.problems) else confounding(src)
    if note:
        src.problems.append(note)
    if src.group_by == "similar" and not any(p.fatal for p in src.problems):
        similar_groups(src.items, default_cache_dir() if cache_dir is None else cache_dir)
    return src


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
    if source is None and is_medmnist(path):  # a MedMNIST .npz: its official splits, no files
        return load_medmnist(path, image_size, resize, cache_dir)
    src = source or discover_grouped(path, group_regex=group_regex, group_by=group_by, cache_dir=cache_dir)
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
    made = make_splits(good_items, seed, fractions, val_fraction)
    refused = unusable_split(good_items, made, src.classes, src.group_by)
    if refused:
        raise DataError(refused.detail)
    lacking = lacking_classes(good_items, made, src.classes)
    if lacking:
        problems.append(lacking)
    for name, idx in made.items():
        if not idx:
            continue
        rows = index[idx]
        splits[name] = Split(
            images=images[rows] if len(rows) < len(images) // 2 and len(rows) * images[0].nbytes <= IN_RAM_BYTES
            else _Rows(images, rows),
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
    train = Split(JoinedRows([a.images, take_rows(x.images, keep)]), np.concatenate([a.labels, labels]),
                  np.concatenate([a.groups, x.groups[keep] + int(a.groups.max(initial=-1)) + 1]),
                  list(a.paths) + [x.paths[k] for k in keep])
    added = {ds.classes[i]: int((labels == i).sum()) for i in range(len(ds.classes)) if (labels == i).any()}
    problems = [Problem(p.kind, f"{_EXTRA}{extra.root}: {p.detail}", p.paths, p.fatal) for p in extra.problems]
    info = {"root": extra.root, "images": added, "left_out": [c for c, i in zip(extra.classes, lut, strict=True) if i < 0]}
    return dataclasses.replace(ds, splits={**ds.splits, "train": train}, problems=ds.problems + problems,
                               extra_train=info)


_EXTRA = "--extra-train "  # how join_train marks the problems it brings in from the other set


def problem_lines(ds: Dataset, data) -> list[str]:
    """One console line per problem the data load found (files skipped, say), naming the ``bloodcell
    data check`` that lists it: ``data``'s, the --extra-train set's for one join_train brought in, or
    the source's of several (data.sources: its problems start with its root)."""
    def where(p: Problem) -> str:
        if p.detail.startswith(_EXTRA):
            return ds.extra_train["root"]
        own = [s["root"] for s in ds.sources if p.detail.startswith(f"{s['root']}: ")]
        return own[0] if own else str(data)

    return [f"data: {p.detail} (bloodcell data check {where(p)} lists them)" for p in ds.problems]


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


class JoinedRows:
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
    src = discover(path)
    n = src.synthetic_n
    images, labels, cached = synthetic_arrays(n, image_size, seed, cache_dir)
    items = [Item(f"synthetic://{seed}/{i}", int(labels[i]), f"synthetic://{seed}/{i}") for i in range(n)]
    splits = {}
    for name, idx in make_splits(items, seed, fractions).items():
        idx = np.asarray(idx)
        splits[name] = Split(np.asarray(images[idx]), np.asarray(labels)[idx].astype(np.int64), idx.copy(),
                             [items[i].path for i in idx])
    return Dataset("synthetic", "synthetic", list(src.classes), splits, image_size, "squash", [], cached)
