"""Seeded, stratified, grouped splits: images that share a source never straddle two splits."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from bloodcell.data.layouts import SOURCE_GROUPS
from bloodcell.data.records import Item, Problem, Source


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


def groups_are_sources(items: list[Item], group_by: str) -> bool:
    """Whether a group may hold several classes (a patient, a table's group column, a smear named by
    --group-regex that holds cells of several classes): a grouped split then keeps the whole source
    on one side, and may leave a split without a class."""
    if group_by in SOURCE_GROUPS:
        return True
    if group_by != "name":
        return False
    labels: dict[str, int] = {}
    return any(labels.setdefault(it.group, it.label) != it.label for it in items)


def unusable_split(items: list[Item], splits: dict[str, list[int]], classes: list[str],
                   group_by: str) -> Problem | None:
    """A fatal problem where groups are sources of any class (patients) and a split bloodcell made
    lacks a class: class and source are too confounded for a grouped split (None where all is well)."""
    if not groups_are_sources(items, group_by):
        return None
    made = [n for n in splits if n not in {it.split for it in items}]
    for name in made:
        have = {items[i].label for i in splits[name]}
        lacking = [k for k in sorted({it.label for it in items}) if k not in have]
        if lacking:
            k = lacking[0]
            holders = len({it.group for it in items if it.label == k})
            what = "patient" if group_by == "patient" else "group"
            return Problem("split_lacks_class",
                           f"a {what}-grouped split leaves {name} without class {classes[k]}: only {holders} "
                           f"{what}(s) hold it and each {what} stays on one side; add {what}s of that class, "
                           "or give the splits yourself (a label table's split column)", [classes[k]], fatal=True)
    return None


def lacking_classes(items: list[Item], splits: dict[str, list[int]], classes: list[str]) -> Problem | None:
    """A note (not fatal) where a split bloodcell made holds no image of a class (one with too few
    groups to go round): that split's figures then leave the class out, its macro-F1 is over the
    classes it holds, and the class's F1 is not measured there."""
    made = [n for n in splits if n not in {it.split for it in items}]
    counts = Counter(it.label for it in items)
    lacking = {n: [k for k in sorted(counts) if k not in {items[i].label for i in splits[n]}] for n in made}
    lacking = {n: ks for n, ks in lacking.items() if ks}
    if not lacking:
        return None
    names = sorted({k for ks in lacking.values() for k in ks})
    return Problem("split_lacks_class", "; ".join(
        f"{classes[k]} ({counts[k]} image(s)) is in no {' or '.join(n for n, ks in lacking.items() if k in ks)} "
        "image" for k in names) + ": those splits' figures leave it out (macro-F1 over the classes they hold); "
        "add images of it", [classes[k] for k in names])


def confounding(src: Source) -> Problem | None:
    """A note (not fatal) where groups are sources of any class (patients) and fewer than half of them
    hold more than one class: a split's figures then rest on few sources, and a model may learn them."""
    if not groups_are_sources(src.items, src.group_by):
        return None
    labels: dict[str, set[int]] = {}
    for it in src.items:
        labels.setdefault(it.group, set()).add(it.label)
    mixed = sorted(g for g, s in labels.items() if len(s) > 1)
    if len(mixed) * 2 >= len(labels):
        return None
    what = "patient" if src.group_by == "patient" else "group"
    per_class = ", ".join(f"{c} from {sum(1 for s in labels.values() if k in s)}"
                          for k, c in enumerate(src.classes))
    shown = ", ".join(g.split("/", 1)[-1] for g in mixed[:8]) + (", ..." if len(mixed) > 8 else "")
    return Problem(
        "class_confounded_with_group",
        f"class and {what} are confounded: only {len(mixed)} of {len(labels)} {what}s hold more than one "
        f"class{f' ({shown})' if mixed else ''}; {what}s per class: {per_class}. Splits keep each {what} "
        f"on one side, so a split's figures rest on few {what}s, and a model may learn the {what} "
        "(slide, stain) rather than the class", [g.split("/", 1)[-1] for g in mixed])
