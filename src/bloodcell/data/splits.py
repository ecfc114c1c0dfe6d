"""Seeded, stratified, grouped splits: images that share a source never straddle two splits."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from bloodcell.data.records import Item


def grouped_split(items: list[Item], fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Assign item indices to splits by whole groups, per class, so each split gets its fraction.

    Groups are shuffled with ``seed`` within each class (a group's class is its images' majority
    label) and dealt out so that the image counts come closest to the fractions; every split gets
    at least one group of a class that has enough groups.
    """
    names = list(fractions)
    total = sum(fractions.values())
    frac = np.array([fractions[n] / total for n in names])
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_group[it.group].append(i)
    by_class: dict[int, list[str]] = defaultdict(list)
    for g, idx in by_group.items():
        label = Counter(items[i].label for i in idx).most_common(1)[0][0]
        by_class[label].append(g)
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {n: [] for n in names}
    for label in sorted(by_class):
        groups = sorted(by_class[label])
        rng.shuffle(groups)
        sizes = np.array([len(by_group[g]) for g in groups])
        # Reserve one group for each later split first when there are enough groups.
        assign = np.empty(len(groups), dtype=int)
        cum = np.cumsum(sizes) - sizes / 2  # midpoint of each group along the class's images
        bounds = np.cumsum(frac)[:-1] * sizes.sum()
        assign[:] = np.searchsorted(bounds, cum, side="right")
        if len(groups) >= len(names):
            for k in range(len(names)):
                if not (assign == k).any():
                    # take a group from the largest split
                    donor = np.bincount(assign, minlength=len(names)).argmax()
                    j = np.flatnonzero(assign == donor)[-1 if k > donor else 0]
                    assign[j] = k
        for g, k in zip(groups, assign, strict=True):
            out[names[k]].extend(by_group[g])
    for n in names:
        out[n].sort()
    return out


def make_splits(items: list[Item], seed: int, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                val_fraction: float = 0.15) -> dict[str, list[int]]:
    """Split items: keep given split folders, carve val out of train by group, or split by fractions."""
    given = {it.split for it in items}
    if given == {""}:
        return grouped_split(items, dict(zip(("train", "val", "test"), fractions, strict=True)), seed)
    out: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        out[it.split].append(i)
    if "val" not in out and "train" in out:
        train = out.pop("train")
        sub = grouped_split([items[i] for i in train],
                            {"train": 1 - val_fraction, "val": val_fraction}, seed)
        out["train"] = [train[j] for j in sub["train"]]
        out["val"] = [train[j] for j in sub["val"]]
    order = ["train", "val", "test", "test_simple"]
    return {k: sorted(out[k]) for k in sorted(out, key=lambda s: order.index(s) if s in order else 9)}
