"""Cross-validation folds of a loaded data set: its train and val images pooled and dealt into K
grouped, stratified folds; one fold becomes val, the others train, and every other split (test,
test_simple) is left exactly as it was, so the test split is the same in every fold.

>>> from bloodcell.data.folds import fold_dataset
>>> ds3 = fold_dataset(ds, folds=5, fold=3, seed=0)     # fold 3 of 5 as val

The folds come from the same dealer as the train/val/test split (``splits.grouped_split``, K equal
shares): whole groups per class, so a cell's augmented copies or a patient's images never straddle
two folds, and each fold gets a group of every class that has K groups or more.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bloodcell.data.dataset import JoinedRows, take_rows
from bloodcell.data.layouts import SOURCE_GROUPS
from bloodcell.data.records import Dataset, Item, Split
from bloodcell.data.splits import grouped_split
from bloodcell.errors import DataError

POOLED = ("train", "val")  # the splits cross-validation deals into folds; the rest stay put


def fold_ids(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0..K-1) of each image: whole groups, stratified by class (a group's majority)."""
    items = [Item("", int(y), str(g)) for y, g in zip(labels, groups, strict=True)]
    parts = grouped_split(items, {str(k): 1.0 for k in range(folds)}, seed)
    out = np.full(len(items), -1, dtype=np.int64)
    for k in range(folds):
        out[parts[str(k)]] = k
    return out


def _pool(ds: Dataset) -> tuple[list[Split], np.ndarray, np.ndarray]:
    parts = [ds.splits[n] for n in POOLED if n in ds.splits]
    return parts, np.concatenate([s.labels for s in parts]), np.concatenate([s.groups for s in parts])


def fold_table(ds: Dataset, folds: int, seed: int) -> np.ndarray:
    """The fold of each pooled (train, then val) image; a DataError where the data cannot give K folds."""
    parts, labels, groups = _pool(ds)
    n_groups = len(np.unique(groups))
    if n_groups < folds:
        raise DataError(f"--folds {folds}: the train and val images hold only {n_groups} groups; "
                        "give fewer folds")
    ids = fold_ids(labels, groups, folds, seed)
    empty = [k for k in range(folds) if not (ids == k).any()]
    if empty:
        raise DataError(f"--folds {folds}: fold {empty[0]} would be empty; give fewer folds")
    mixed = len(np.unique(np.stack([groups, labels], 1), axis=0)) > n_groups  # a group of several classes
    if ds.group_by in SOURCE_GROUPS or mixed:  # as unusable_split: a fold whose val lacks a class is refused
        for k in range(folds):
            lacking = sorted(set(labels.tolist()) - set(labels[ids == k].tolist()))
            if lacking:
                raise DataError(f"--folds {folds}: fold {k}'s validation has no image of "
                                f"{ds.classes[lacking[0]]} (each group stays in one fold); give fewer folds")
    return ids


def _select(parts: list[Split], keep: np.ndarray) -> Split:
    """The pooled rows in ``keep`` (a mask over the pooled images) as one split, lazily: a
    memory-mapped part stays mapped."""
    pieces, start = [], 0
    for s in parts:
        rows = np.flatnonzero(keep[start:start + len(s)])
        start += len(s)
        if len(rows):
            pieces.append((s, rows))
    images = [take_rows(s.images, rows) for s, rows in pieces]
    sources = None if parts[0].sources is None else np.concatenate([s.sources[r] for s, r in pieces])
    return Split(images[0] if len(images) == 1 else JoinedRows(images),
                 np.concatenate([s.labels[r] for s, r in pieces]),
                 np.concatenate([s.groups[r] for s, r in pieces]),
                 [s.paths[i] for s, r in pieces for i in r], sources)


def fold_dataset(ds: Dataset, folds: int, fold: int, seed: int) -> Dataset:
    """``ds`` with fold ``fold`` of ``folds`` as val and the other folds as train; other splits kept."""
    if not 0 <= fold < folds:
        raise DataError(f"fold {fold} is not one of 0..{folds - 1}")
    ids = fold_table(ds, folds, seed)
    parts, _, _ = _pool(ds)
    rest = {n: s for n, s in ds.splits.items() if n not in POOLED}
    return dataclasses.replace(ds, splits={"train": _select(parts, ids != fold), "val": _select(parts, ids == fold),
                                           **rest})
