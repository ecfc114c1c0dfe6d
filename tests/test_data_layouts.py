"""data.layouts: discover() finds the layout, classes, duplicates and usability problems."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import write_image

from bloodcell.data.layouts import discover
from bloodcell.data.splits import make_splits


@pytest.mark.realdata
@pytest.mark.parametrize("sub", ["dataset2-master", "dataset2-master/images"])
def test_kaggle_found_from_any_level(kaggle_root, sub):
    assert discover(kaggle_root / sub).layout == "kaggle"


@pytest.mark.realdata
def test_pbc_cross_class_duplicate_reported_and_left_out(pbc_root):
    src = discover(pbc_root)
    assert src.layout == "class-folders" and len(src.classes) == 8
    conflict = [p for p in src.problems if p.kind == "duplicates_across_classes"]
    assert conflict and any("BNE_191112.jpg" in x and "EO_225902.jpg" in x for x in conflict[0].paths)
    kept = {Path(it.path).name for it in src.items}
    assert "BNE_191112.jpg" not in kept and "EO_225902.jpg" not in kept
    # byte-identical files inside a class share one group, so no split separates them
    within = [p for p in src.problems if p.kind == "duplicates_within_class"][0]
    splits = make_splits(src.items, 0)
    where = {src.items[i].path: s for s, idx in splits.items() for i in idx}
    for pair in within.paths:
        a, b = pair.split(" == ")[:2]
        assert where[a] == where[b]


def test_class_folders_any_extension_case(class_folders):
    src = discover(class_folders)
    assert src.layout == "class-folders" and src.classes == ["alpha", "beta", "gamma"]
    assert len(src.items) == 30
    assert {Path(it.path).suffix for it in src.items} >= {".JPEG", ".tif", ".bmp"}


def test_split_folders_and_val_carved_by_group(tmp_path):
    for split in ("train", "test"):
        for c, cls in enumerate(("a", "b")):
            for i in range(12):
                write_image(tmp_path / split / cls / f"s{i // 3}_{i}.png", color=(100 * c, 0, 0),
                            seed=hash((split, cls, i)) % 1000)
    src = discover(tmp_path, group_regex=r"^s(\d+)_")
    assert src.layout == "split-folders"
    splits = make_splits(src.items, seed=0, val_fraction=0.25)
    assert set(splits) == {"train", "val", "test"}
    tr = {src.items[i].group for i in splits["train"]}
    va = {src.items[i].group for i in splits["val"]}
    assert not tr & va and va
    assert all(src.items[i].split == "test" for i in splits["test"])


def test_duplicate_files_across_classes_and_splits(tmp_path):
    a = write_image(tmp_path / "train" / "a" / "x.png", seed=1)
    shutil.copy(a, tmp_path / "test" / "a" / "x_copy.png") if (tmp_path / "test" / "a").mkdir(
        parents=True) is None else None
    write_image(tmp_path / "train" / "b" / "y.png", seed=2)
    shutil.copy(tmp_path / "train" / "b" / "y.png", tmp_path / "train" / "a" / "y_as_a.png")
    for i in range(4):
        write_image(tmp_path / "train" / "a" / f"a{i}.png", seed=10 + i)
        write_image(tmp_path / "train" / "b" / f"b{i}.png", seed=20 + i)
        write_image(tmp_path / "test" / "b" / f"tb{i}.png", seed=30 + i)
    src = discover(tmp_path)
    kinds = {p.kind for p in src.problems}
    assert {"duplicates_across_classes", "duplicates_across_splits"} <= kinds
    names = {Path(it.path).name for it in src.items}
    assert "y.png" not in names and "y_as_a.png" not in names  # label conflict: both out
    assert "x_copy.png" in names and "x.png" not in names  # leak: the test copy stays


def test_symlink_loop_does_not_hang(class_folders):
    os.symlink(class_folders / "alpha", class_folders / "alpha" / "loop")
    src = discover(class_folders)
    assert len(src.items) == 30
