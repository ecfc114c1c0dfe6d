"""Several data sets as one: images of several sources (labs, microscopes) under one class list.

>>> from bloodcell.data.sources import load_sources
>>> ds = load_sources(["cells/lab_a", "cells/lab_b"], image_size=64)
>>> ds.sources[0]["root"], ds.splits["val"].sources       # every image keeps its source's index

Each source is loaded as alone (``load_dataset``: its own layout, groups and seeded, stratified,
grouped splits), so no group straddles two splits and each lab is split as it would be by itself.
Classes are matched by name in any case (the first source's spelling is kept); a class a source
lacks is fine. The splits of the same name are then joined: validation is pooled over the sources,
and ``Split.sources`` says which source each image came from, for figures per source. The pixels
stay where they are (a lazy concatenation of the sources' arrays, memory maps included).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from bloodcell.data.dataset import JoinedRows, load_dataset, take_rows
from bloodcell.data.records import Dataset, Problem, Split
from bloodcell.errors import DataError

SPLIT_ORDER = ("train", "val", "test", "test_simple")


def load_sources(sources: str | os.PathLike | Sequence[str | os.PathLike], **kwargs) -> Dataset:
    """One source: exactly ``load_dataset``. Several: each loaded with the same arguments, then
    joined (``join_sources``); an error in one of them names it."""
    if isinstance(sources, str | os.PathLike):
        return load_dataset(sources, **kwargs)
    sources = [str(s) for s in sources]
    if len(sources) == 1:
        return load_dataset(sources[0], **kwargs)
    loaded = []
    for s in sources:
        try:
            loaded.append(load_dataset(s, **kwargs))
        except DataError as e:  # say which of the sources it is about
            raise DataError(f"--data {s}: {e}") from e
    ds = join_sources(loaded)
    for info, given in zip(ds.sources, sources, strict=True):
        info["data"] = given  # as the user named it (a layout's root may be a folder below it)
    return ds


def source_names(ds: Dataset) -> list[str]:
    """Each source as the user named it (``--data``), else its root; in ``Split.sources`` order."""
    return [s.get("data", s["root"]) for s in ds.sources]


def join_sources(datasets: list[Dataset]) -> Dataset:
    """The data sets (loaded at one image size and resize) as one: classes matched by name in any
    case, splits of one name joined, every image's source kept in ``Split.sources``."""
    first = datasets[0]
    if any((d.image_size, d.resize) != (first.image_size, first.resize) for d in datasets):
        raise DataError("sources to join must be loaded at the same image size and resize")
    names: dict[str, str] = {}
    for d in datasets:
        for c in d.classes:
            names.setdefault(c.lower(), c)
            if names[c.lower()] != c:  # the labs spell it in two ways: one spelling, as a person reads it
                names[c.lower()] = c.lower()
    classes = sorted(names.values(), key=str.lower)
    index = {c.lower(): i for i, c in enumerate(classes)}
    luts = [np.array([index[c.lower()] for c in d.classes], dtype=np.int64) for d in datasets]
    # group ids are per source: offset each source's past the ones before it
    offsets = np.cumsum([0] + [1 + max((int(s.groups.max(initial=-1)) for s in d.splits.values()), default=-1)
                               for d in datasets[:-1]])
    present = [n for n in SPLIT_ORDER if any(n in d.splits for d in datasets)]
    present += sorted({n for d in datasets for n in d.splits} - set(present))
    splits = {}
    for name in present:
        parts = [(k, d.splits[name]) for k, d in enumerate(datasets) if name in d.splits]
        splits[name] = Split(
            images=JoinedRows([s.images for _, s in parts]),
            labels=np.concatenate([luts[k][s.labels] for k, s in parts]),
            groups=np.concatenate([s.groups + offsets[k] for k, s in parts]),
            paths=[p for _, s in parts for p in s.paths],
            sources=np.concatenate([np.full(len(s), k, dtype=np.int64) for k, s in parts]),
        )
    problems = [Problem(p.kind, f"{d.root}: {p.detail}", p.paths, p.fatal) for d in datasets for p in d.problems]
    info = [{"root": d.root, "layout": d.layout, "group_by": d.group_by, "classes": list(d.classes)}
            for d in datasets]
    return Dataset(" + ".join(d.root for d in datasets), "+".join(sorted({d.layout for d in datasets})),
                   classes, splits, first.image_size, first.resize, problems, all(d.cached for d in datasets),
                   ",".join(sorted({d.group_by for d in datasets})), sources=info)


def source_rows(ds: Dataset, split: str) -> list[tuple[str, np.ndarray]]:
    """(source name, the split's row indices from it) for each source with images in the split;
    one source: all rows under its root."""
    s = ds.splits[split]
    if s.sources is None or not ds.sources:
        return [(ds.root, np.arange(len(s)))]
    return [(name, np.flatnonzero(s.sources == k)) for k, name in enumerate(source_names(ds))
            if (s.sources == k).any()]


def parse_class_map(text: str | None) -> dict[str, str]:
    """'data_class=model_class,...' -> {data_class_lower: model_class_lower}."""
    out = {}
    for pair in filter(None, (text or "").split(",")):
        if "=" not in pair:
            raise DataError(f"--class-map entries look like DATA=MODEL, got {pair!r}")
        a, b = pair.split("=", 1)
        out[a.strip().lower()] = b.strip().lower()
    return out


def select_classes(ds: Dataset, model_classes: list[str], class_map: dict[str, str] | None = None,
                   whose: str = "the model's") -> tuple[Dataset, list[str]]:
    """Keep the data's images of the classes given (``model_classes``, matched case-insensitively or
    through ``class_map``), relabelled in that list's order; returns it and the classes left out."""
    class_map = class_map or {}
    index = {c.lower(): i for i, c in enumerate(model_classes)}
    remap, dropped = {}, []
    for i, c in enumerate(ds.classes):
        name = class_map.get(c.lower(), c.lower())
        if name in index:
            remap[i] = index[name]
        else:
            dropped.append(c)
    if not remap:
        raise DataError(f"no class of the data ({', '.join(ds.classes)}) matches {whose} "
                        f"({', '.join(model_classes)}); use --class-map DATA=MODEL,...")
    splits = {}
    for name, s in ds.splits.items():
        keep = np.flatnonzero(np.isin(s.labels, list(remap)))
        if len(keep) == 0:
            continue
        lut = np.array([remap.get(i, -1) for i in range(len(ds.classes))])
        if len(keep) == len(s):  # every image stays: keep the memory map, copy no pixels
            splits[name] = dataclasses.replace(s, labels=lut[s.labels])
            continue
        # a memory-mapped split stays mapped (a batch reads the kept images); one in RAM is copied
        splits[name] = dataclasses.replace(take(s, keep), labels=lut[s.labels[keep]])
    return dataclasses.replace(ds, classes=list(model_classes), splits=splits), dropped


def take(s: Split, keep: np.ndarray) -> Split:
    """The rows ``keep`` of a split (a memory-mapped one stays mapped)."""
    return Split(take_rows(s.images, keep), s.labels[keep], s.groups[keep], [s.paths[k] for k in keep],
                 None if s.sources is None else s.sources[keep])


def few_labels(ds: Dataset, k: int, seed: int, splits: tuple[str, ...] = ("train", "val")) -> Dataset:
    """Keep ``k`` labelled cells per class in each of ``splits``: k groups (a group is one cell and its
    copies) drawn per class, seeded, and one image of each (a lab labels a cell once; the copies an
    augmented data set holds are not more cells); a class with fewer groups keeps all it has. The
    other splits (test) are untouched. ``Dataset.labelled`` says, per split and class, how many cells
    were kept."""
    rng = np.random.default_rng([seed, k, 7919])
    out, drawn = dict(ds.splits), {}
    for name in splits:
        if name not in ds.splits:
            continue
        s = ds.splits[name]
        chosen, counts = [], {}
        for i, c in enumerate(ds.classes):
            rows = np.flatnonzero(s.labels == i)
            groups, first = np.unique(s.groups[rows], return_index=True)  # one image per group
            pick = rng.permutation(len(groups))[:k]
            chosen.append(rows[first[pick]])
            counts[c] = len(pick)
        out[name] = take(s, np.sort(np.concatenate(chosen)))
        drawn[name] = counts
    return dataclasses.replace(ds, splits=out, labelled=drawn)
