"""The data layer's plain records: what discovery finds (Item, Problem, Source) and what loading
returns (Split, Dataset)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Item:
    """One image file: where it is, its class index, its source group and its given split."""

    path: str
    label: int
    group: str
    split: str = ""  # "" means: to be assigned by splits.py
    size: int = 0
    mtime_ns: int = 0
    sha1: str = ""


@dataclass
class Problem:
    """Something wrong found in the data; ``fatal`` ones make the data unusable."""

    kind: str
    detail: str
    paths: list[str] = field(default_factory=list)
    fatal: bool = False


@dataclass
class Source:
    """What discover() found: layout, classes, items and problems."""

    root: str
    layout: str
    classes: list[str]
    items: list[Item]
    problems: list[Problem] = field(default_factory=list)
    synthetic_n: int = 0
    excluded: list[str] = field(default_factory=list)
    group_by: str = "file"


@dataclass
class Split:
    """One split's decoded images (uint8 N x H x W x 3, memory-mapped), labels, groups and paths."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    paths: list[str]
    sources: np.ndarray | None = None  # index into Dataset.sources per image; None: one source

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
    sources: list[dict] = field(default_factory=list)  # several sources (data.sources): root, layout, ...
    labelled: dict = field(default_factory=dict)  # few_labels: split -> class -> labelled cells kept

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
