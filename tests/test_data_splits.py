"""data.splits: seeded, stratified, grouped splits."""

from __future__ import annotations

from collections import Counter

from bloodcell.data.splits import grouped_split


def test_grouped_split_fractions_stratified_deterministic():
    from bloodcell.data.records import Item

    items = [Item(f"f{i}", i % 3, f"g{i // 2}") for i in range(600)]  # groups are pure in class
    items = [Item(f"f{i}", (i // 2) % 3, f"g{i // 2}") for i in range(600)]
    s = grouped_split(items, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=3)
    assert s == grouped_split(items, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=3)
    sizes = {k: len(v) for k, v in s.items()}
    assert abs(sizes["train"] - 420) <= 6 and abs(sizes["val"] - 90) <= 6
    for k, idx in s.items():
        counts = Counter(items[i].label for i in idx)
        assert max(counts.values()) - min(counts.values()) <= 4, (k, counts)
    groups = {k: {items[i].group for i in v} for k, v in s.items()}
    assert not groups["train"] & groups["val"] and not groups["val"] & groups["test"]
