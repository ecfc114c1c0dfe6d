"""data.dataset: load_dataset and join_train."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import KAGGLE_CLASSES, other_lab, write_image

from bloodcell.data import join_train, load_dataset, problem_lines
from bloodcell.errors import DataError


@pytest.mark.slow
@pytest.mark.realdata
def test_join_train_kaggle_with_pbc_cells(kaggle_subset, pbc_root, tmp_path):
    """What it was built for: PBC's cells of Kaggle's four classes (named in lower case there) join
    Kaggle's train split; PBC's other four classes and its val and test stay out."""
    ds = load_dataset(kaggle_subset, image_size=16, cache_dir=tmp_path / "c")
    pbc = load_dataset(pbc_root, image_size=16, cache_dir=tmp_path / "c")
    joined = join_train(ds, pbc)
    x = pbc.splits["train"]
    want = {c: int((x.labels == pbc.classes.index(c.lower())).sum()) for c in KAGGLE_CLASSES}
    assert joined.extra_train["images"] == want and min(want.values()) > 200
    assert sorted(joined.extra_train["left_out"]) == ["basophil", "erythroblast", "ig", "platelet"]
    assert len(joined.splits["train"]) == len(ds.splits["train"]) + sum(want.values())
    assert all(joined.splits[k].paths == ds.splits[k].paths for k in ds.splits if k != "train")


def test_join_train_adds_only_the_other_sets_train_images_of_shared_classes(class_folders, tmp_path):
    ds = load_dataset(class_folders, image_size=16, cache_dir=tmp_path / "c")
    (other_lab(tmp_path / "lab2") / "ALPHA" / "broken.png").write_bytes(b"not an image")
    extra = load_dataset(tmp_path / "lab2", image_size=16, cache_dir=tmp_path / "c")
    joined = join_train(ds, extra)
    # its problems come along, and the console line names the set that holds them
    assert problem_lines(joined, "cells") == [f"data: --extra-train {extra.root}: 1 file(s) could not be decoded "
                                              f"and were skipped (bloodcell data check {extra.root} lists them)"]
    a, x, j = ds.splits["train"], extra.splits["train"], joined.splits["train"]
    shared = np.flatnonzero(x.labels < 2)  # ALPHA, Beta
    assert len(j) == len(a) + len(shared) and j.images.shape == (len(j), 16, 16, 3)
    assert j.paths == a.paths + [x.paths[k] for k in shared]
    assert list(j.labels[len(a):]) == list(x.labels[shared])  # ALPHA -> alpha (0), Beta -> beta (1)
    assert not set(j.groups[:len(a)]) & set(j.groups[len(a):])  # no group spans the two sets
    # the pixels are the sources' rows, whichever way they are read
    whole = np.concatenate([np.asarray(a.images), np.asarray(x.images)[shared]])
    assert np.array_equal(np.asarray(j.images), whole)
    rows = np.array([len(j) - 1, 0, len(a), 3, len(a) - 1])
    assert np.array_equal(j.images[rows], whole[rows]) and np.array_equal(j.images[-1], whole[-1])
    assert np.array_equal(j.images[2:len(a) + 2], whole[2:len(a) + 2])
    with pytest.raises(IndexError):
        j.images[len(j)]
    # val and test are this data's alone; the other set's val and test are not used
    assert {k: s.paths for k, s in joined.splits.items() if k != "train"} == {
        k: s.paths for k, s in ds.splits.items() if k != "train"}
    assert not {p for k in ("val", "test") for p in extra.splits[k].paths} & set(j.paths)
    assert joined.extra_train == {"root": extra.root, "images": {"alpha": int((x.labels == 0).sum()),
                                                                  "beta": int((x.labels == 1).sum())},
                                  "left_out": ["delta"]}
    # a set with no class in common is an error that names both sides' classes
    lone = tmp_path / "lab3"
    for i in range(10):
        write_image(lone / "delta" / f"d{i}.png", seed=i)
        write_image(lone / "epsilon" / f"e{i}.png", seed=50 + i)
    with pytest.raises(DataError, match="delta, epsilon.*alpha, beta, gamma"):
        join_train(ds, load_dataset(lone, image_size=16, cache_dir=tmp_path / "c"))


def test_synthetic_same_seed_same_data_other_seed_other_data():
    a = load_dataset("synthetic:80", image_size=32, seed=1)
    b = load_dataset("synthetic:80", image_size=32, seed=1)
    c = load_dataset("synthetic:80", image_size=32, seed=2)
    assert b.cached
    assert np.array_equal(a.splits["train"].images, b.splits["train"].images)
    assert not np.array_equal(a.splits["train"].images, c.splits["train"].images)
