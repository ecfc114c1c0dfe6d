"""data.groups: look-alike images (copies of one cell) as one group."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import KAGGLE_CLASSES

from bloodcell.catalog import INFO
from bloodcell.data.dataset import discover_grouped
from bloodcell.data.layouts import discover
from bloodcell.data.splits import make_splits


@pytest.mark.slow
@pytest.mark.realdata
def test_kaggle_counts_groups_and_no_leak(kaggle_root):
    src = discover_grouped(kaggle_root)
    assert src.layout == "kaggle" and src.group_by == "similar"
    assert src.classes == list(KAGGLE_CLASSES)
    given = Counter(it.split for it in src.items)
    assert (given["train"], given["test"], given["test_simple"]) == (9957, 2487, 71)
    # the K of the _K_N names: 75 / 27 / 16 / 159 values in TRAIN (group_by name)
    names = discover(kaggle_root, group_by="name")
    k_values = {c: len({it.group for it in names.items if it.split == "train" and it.label == i})
                for i, c in enumerate(names.classes)}
    assert k_values == INFO["blood-cells"]["train_k_values"] == {
        "EOSINOPHIL": 75, "LYMPHOCYTE": 27, "MONOCYTE": 16, "NEUTROPHIL": 159}
    similar = {c: len({it.group for it in src.items if it.split == "train" and it.label == i})
               for i, c in enumerate(src.classes)}
    assert similar == INFO["blood-cells"]["train_similar_groups"]
    splits = make_splits(src.items, seed=0)
    tr = {src.items[i].group for i in splits["train"]}
    va = {src.items[i].group for i in splits["val"]}
    assert tr and va and not tr & va
    assert len(splits["train"]) + len(splits["val"]) == 9957
    assert len(splits["test"]) == 2487 and len(splits["test_simple"]) == 71
    # every class is in val, and the same seed gives the same split, another seed another one
    assert {src.items[i].label for i in splits["val"]} == {0, 1, 2, 3}
    assert make_splits(src.items, seed=0) == splits
    assert make_splits(src.items, seed=1)["val"] != splits["val"]


@pytest.mark.slow
@pytest.mark.realdata
def test_kaggle_groups_are_cells_not_names(kaggle_root):
    """The _K_N names do not say which cell an image copies; look-alike groups do (data.groups)."""
    from bloodcell.data.groups import SIMILAR_THRESHOLD, histogram
    from bloodcell.data.layouts import KAGGLE_NAME

    src = discover_grouped(kaggle_root)
    mono = src.classes.index("MONOCYTE")
    test = [it for it in src.items if it.split == "test" and it.label == mono]
    simple = [it for it in src.items if it.split == "test_simple" and it.label == mono]
    cells = {it.group for it in test}
    # TEST's monocytes are 4 cells, as TEST_SIMPLE's 4 originals say ...
    assert len(cells) == 4 and len(simple) == 4
    for g in cells:  # ... and the copies of every one of them carry all four K values
        ks = {KAGGLE_NAME.match(Path(it.path).name).group(1) for it in test if it.group == g}
        assert ks == {"0", "1", "2", "3"}, (g, ks)
    # Split by K, most validation monocytes have a near-twin in train; split by look-alike, none.
    for how in ("name", "similar"):
        s = discover_grouped(kaggle_root, group_by=how)
        sp = make_splits(s.items, seed=0)
        feats = {k: np.stack([histogram(s.items[i].path) for i in sp[k] if s.items[i].label == mono])
                 for k in ("train", "val")}
        a, b = feats["val"], feats["train"]
        d = ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T).min(1)
        twins = float((d < SIMILAR_THRESHOLD).mean())
        assert twins > 0.9 if how == "name" else twins == 0.0, (how, twins)
