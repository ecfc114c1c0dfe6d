"""data.folds: K grouped, stratified folds of the pooled train and val images; test untouched."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_image

from bloodcell.data import load_dataset
from bloodcell.data.folds import fold_dataset, fold_ids
from bloodcell.errors import DataError


@pytest.fixture
def grouped(tmp_path):
    """<root>/<class>/<class>_g<N>_<i>.png: 3 classes x 10 groups x 3 images (a group: one cell)."""
    root = tmp_path / "grouped"
    for c, cls in enumerate(("alpha", "beta", "gamma")):
        for g in range(10):
            for i in range(3):
                write_image(root / cls / f"{cls}_g{c * 10 + g}_{i}.png", size=(12, 12),
                            color=(80 * c, 60, 200 - 60 * c), seed=c * 1000 + g * 10 + i)
    return root


def test_fold_ids_whole_groups_every_class_in_every_fold():
    labels = np.repeat(np.arange(4), 30)
    groups = np.arange(120) // 3  # three images a group, each group one class
    ids = fold_ids(labels, groups, 5, seed=1)
    assert set(ids.tolist()) == set(range(5))
    for g in np.unique(groups):
        assert len(set(ids[groups == g].tolist())) == 1  # a group never straddles two folds
    for k in range(5):
        assert set(labels[ids == k].tolist()) == {0, 1, 2, 3}  # stratified
        assert 18 <= (ids == k).sum() <= 30
    assert (ids == fold_ids(labels, groups, 5, seed=1)).all()
    assert not (ids == fold_ids(labels, groups, 5, seed=2)).all()


def test_folds_partition_the_pooled_images_and_keep_test(grouped):
    ds = load_dataset(grouped, image_size=16, group_regex=r"_(g\d+)_", group_by="name")
    pooled = sorted(ds.splits["train"].paths + ds.splits["val"].paths)
    folds = [fold_dataset(ds, 3, k, seed=0) for k in range(3)]
    vals = [set(f.splits["val"].paths) for f in folds]
    assert sorted(p for v in vals for p in v) == pooled  # disjoint, and together every non-test image
    for f in folds:
        assert sorted(f.splits["train"].paths + f.splits["val"].paths) == pooled
        assert f.splits["test"].paths == ds.splits["test"].paths  # the same test split in every fold
        assert (f.splits["test"].images == ds.splits["test"].images).all()
        tr, va = f.splits["train"], f.splits["val"]
        assert not set(tr.groups.tolist()) & set(va.groups.tolist())  # no cell on both sides
        assert set(va.labels.tolist()) == {0, 1, 2}
        # images, labels and paths still line up row by row
        index = {p: i for s in (ds.splits["train"], ds.splits["val"]) for i, p in enumerate(s.paths)}
        for split in (tr, va):
            for j in (0, len(split) - 1):
                src = ds.splits["train"] if split.paths[j] in ds.splits["train"].paths else ds.splits["val"]
                i = index[split.paths[j]]
                assert (np.asarray(split.images[j]) == np.asarray(src.images[i])).all()
                assert split.labels[j] == src.labels[i]


def test_too_many_folds_is_one_clear_error(grouped):
    ds = load_dataset(grouped, image_size=16, group_regex=r"_(g\d+)_", group_by="name")
    n_groups = len(np.unique(np.concatenate([ds.splits["train"].groups, ds.splits["val"].groups])))
    with pytest.raises(DataError, match=f"only {n_groups} groups"):
        fold_dataset(ds, n_groups + 1, 0, seed=0)
    with pytest.raises(DataError, match="not one of"):
        fold_dataset(ds, 3, 3, seed=0)


@pytest.mark.realdata
def test_real_kaggle_look_alike_groups_never_straddle_folds(kaggle_subset):
    ds = load_dataset(kaggle_subset, image_size=16)  # Kaggle layout: look-alike images are one group
    assert ds.group_by == "similar"
    folds = [fold_dataset(ds, 3, k, seed=0) for k in range(3)]
    vals = [f.splits["val"] for f in folds]
    groups = [set(v.groups.tolist()) for v in vals]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    pooled = sorted(ds.splits["train"].paths + ds.splits["val"].paths)
    assert sorted(p for v in vals for p in v.paths) == pooled
    assert all(f.splits["test"].paths == ds.splits["test"].paths for f in folds)
    assert all(len(set(v.labels.tolist())) == 4 for v in vals)  # every class validates in every fold
