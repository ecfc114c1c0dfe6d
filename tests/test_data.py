"""Data layer: layouts, groups, splits, checks, bad input, cache and batches."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import KAGGLE_CLASSES, other_lab, write_image
from PIL import Image

from bloodcell.cli import main
from bloodcell.data import BatchLoader, join_train, load_dataset, problem_lines
from bloodcell.data.cache import CELL_FIT, CELL_FIT_MIN, build_cache, cell_box, load_image
from bloodcell.data.layouts import discover
from bloodcell.data.splits import grouped_split, make_splits
from bloodcell.errors import DataError
from bloodcell.info import INFO

# --------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_kaggle_counts_groups_and_no_leak(kaggle_root):
    src = discover(kaggle_root)
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


@pytest.mark.realdata
def test_kaggle_groups_are_cells_not_names(kaggle_root):
    """The _K_N names do not say which cell an image copies; look-alike groups do (data.groups)."""
    from bloodcell.data.groups import SIMILAR_THRESHOLD, histogram
    from bloodcell.data.layouts import KAGGLE_NAME

    src = discover(kaggle_root)
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
        s = discover(kaggle_root, group_by=how)
        sp = make_splits(s.items, seed=0)
        feats = {k: np.stack([histogram(s.items[i].path) for i in sp[k] if s.items[i].label == mono])
                 for k in ("train", "val")}
        a, b = feats["val"], feats["train"]
        d = ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T).min(1)
        twins = float((d < SIMILAR_THRESHOLD).mean())
        assert twins > 0.9 if how == "name" else twins == 0.0, (how, twins)


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


@pytest.mark.realdata
def test_data_check_cli_real(pbc_root, capsys):
    assert main(["data", "check", str(pbc_root), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["usable"] and set(rep["splits"]) == {"train", "val", "test"}
    assert sum(sum(s["images"].values()) for s in rep["splits"].values()) == 5128
    assert "360x363" in rep["sizes"]


# --------------------------------------------------------------------------------------- layouts


def test_class_folders_any_extension_case(class_folders):
    src = discover(class_folders)
    assert src.layout == "class-folders" and src.classes == ["alpha", "beta", "gamma"]
    assert len(src.items) == 30
    assert {Path(it.path).suffix for it in src.items} >= {".JPEG", ".tif", ".bmp"}


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


def test_grouped_split_fractions_stratified_deterministic():
    from bloodcell.data.layouts import Item

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


# --------------------------------------------------------------------------------------- bad input


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_missing_path_is_one_line_error(tmp_path, capsys):
    code, err = run_cli(["data", "check", str(tmp_path / "nope")], capsys)
    assert code != 0 and len(err) == 1 and "does not exist" in err[0]


def test_file_instead_of_folder(tmp_path, capsys):
    f = write_image(tmp_path / "one.png")
    code, err = run_cli(["data", "check", str(f)], capsys)
    assert code != 0 and len(err) == 1 and "is a file" in err[0]


def test_folder_without_images(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("hello")
    code, err = run_cli(["data", "check", str(tmp_path)], capsys)
    assert code != 0 and len(err) == 1 and "no images" in err[0]
    with pytest.raises(DataError, match="no images"):
        load_dataset(tmp_path, image_size=16)


def test_one_class_only(tmp_path, capsys):
    for i in range(3):
        write_image(tmp_path / "only" / f"{i}.png", seed=i)
    code, err = run_cli(["data", "check", str(tmp_path)], capsys)
    assert code != 0 and "only one class" in err[0]
    with pytest.raises(DataError, match="one class"):
        load_dataset(tmp_path, image_size=16)


def test_symlink_loop_does_not_hang(class_folders):
    os.symlink(class_folders / "alpha", class_folders / "alpha" / "loop")
    src = discover(class_folders)
    assert len(src.items) == 30


def test_bad_files_are_listed_and_skipped_odd_modes_converted(class_folders, capsys):
    a = class_folders / "alpha"
    (a / "empty.jpg").write_bytes(b"")
    (a / "text.jpg").write_text("this is not a picture")
    good = (a / "alpha_1.jpg").read_bytes()
    (a / "truncated.jpg").write_bytes(good[: len(good) // 3])
    write_image(a / "gray.png", mode="L", seed=91)
    write_image(a / "rgba.png", mode="RGBA", seed=92)
    write_image(a / "palette.png", mode="P", seed=93)
    write_image(a / "deep.png", mode="I;16", seed=94)
    Image.new("RGB", (10_000, 10_000), (200, 100, 150)).save(a / "huge.png")
    (class_folders / "beta" / "readme.txt").write_text("not an image")
    assert main(["data", "check", str(class_folders), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    kinds = {p["kind"]: p for p in rep["problems"]}
    assert "empty_files" in kinds and "non_image_files" in kinds
    unreadable = "\n".join(kinds["unreadable_images"]["paths"])
    assert "text.jpg" in unreadable and "truncated.jpg" in unreadable and "gray.png" not in unreadable
    assert {"L", "RGBA", "P"} <= set(rep["modes"])
    ds = load_dataset(class_folders, image_size=16)
    paths = [p for s in ds.splits.values() for p in s.paths]
    assert not any(p.endswith(("text.jpg", "truncated.jpg", "empty.jpg")) for p in paths)
    assert any(p.endswith("huge.png") for p in paths) and any(p.endswith("deep.png") for p in paths)
    for s in ds.splits.values():
        assert s.images.shape[1:] == (16, 16, 3) and s.images.dtype == np.uint8


@pytest.mark.parametrize("resize", ["squash", "crop", "pad", "cell", "cellfit"])
def test_load_image_modes_sizes(tmp_path, resize):
    p = write_image(tmp_path / "wide.jpg", size=(320, 240))
    arr = load_image(str(p), 48, resize)
    assert arr.shape == (48, 48, 3) and arr.dtype == np.uint8


def smear(radius: int, centre=(180, 120), size=(320, 240)) -> np.ndarray:
    """A pink frame with one violet 'nucleus' disc: what cell_box looks for."""
    w, h = size
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = (230, 180, 190)
    ys, xs = np.ogrid[:h, :w]
    rgb[(ys - centre[1]) ** 2 + (xs - centre[0]) ** 2 <= radius ** 2] = (120, 60, 190)
    return rgb


def test_cell_box_centres_on_the_stain_and_cellfit_sizes_to_it():
    for fit in (False, True):
        left, top, right, bottom = cell_box(smear(30), fit=fit)
        assert right - left == bottom - top  # square
        assert abs((left + right) / 2 - 180) <= 3 and abs((top + bottom) / 2 - 120) <= 3  # centred
    assert cell_box(smear(30))[2] - cell_box(smear(30))[0] == round(0.8 * 240)  # cell: fixed side
    sides = [(lambda b: b[2] - b[0])(cell_box(smear(r), fit=True)) for r in (20, 30, 40)]
    # cellfit: side ~ CELL_FIT x sqrt(stained area) = CELL_FIT x r sqrt(pi): twice the cell, twice the side
    for r, side in zip((20, 30, 40), sides, strict=True):
        assert abs(side - CELL_FIT * r * np.pi ** 0.5) <= 0.06 * side, (r, side)
    assert sides[0] < sides[1] < sides[2]
    assert cell_box(smear(4), fit=True)[2] - cell_box(smear(4), fit=True)[0] == round(CELL_FIT_MIN * 240)
    big = cell_box(smear(200, centre=(160, 120)), fit=True)
    assert big == (40, 0, 280, 240)  # never larger than the frame's short side, always inside it
    blank = np.full((240, 320, 3), 200, np.uint8)  # no stain: the centre square, at the fixed side
    assert cell_box(blank, fit=True) == (64, 24, 256, 216)


# --------------------------------------------------------------------------------------- cache


def test_cache_hit_miss_and_invalidation(class_folders, tmp_path):
    cache = tmp_path / "c"
    items = discover(class_folders).items
    _, errors, cached = build_cache(items, 16, cache_dir=cache)
    assert not cached and not any(errors)
    _, _, cached = build_cache(discover(class_folders).items, 16, cache_dir=cache)
    assert cached  # second run decodes nothing
    _, _, cached = build_cache(discover(class_folders).items, 24, cache_dir=cache)
    assert not cached  # another size is another cache
    target = class_folders / "alpha" / "alpha_0.png"
    write_image(target, seed=777)
    os.utime(target, ns=(1, 1))
    _, _, cached = build_cache(discover(class_folders).items, 16, cache_dir=cache)
    assert not cached  # a changed file
    write_image(class_folders / "beta" / "new.png", seed=778)
    _, _, cached = build_cache(discover(class_folders).items, 16, cache_dir=cache)
    assert not cached  # an added file
    (class_folders / "beta" / "new.png").unlink()
    (class_folders / "gamma" / "gamma_3.bmp").unlink()
    _, _, cached = build_cache(discover(class_folders).items, 16, cache_dir=cache)
    assert not cached  # a removed file


def test_interrupted_cache_build_leaves_no_cache(class_folders, tmp_path, monkeypatch):
    from bloodcell.data import cache as cache_mod

    cache = tmp_path / "c"
    items = discover(class_folders).items

    def boom(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "_decode_chunk", boom)
    with pytest.raises(KeyboardInterrupt):
        build_cache(items, 16, cache_dir=cache)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    _, errors, cached = build_cache(items, 16, cache_dir=cache)
    assert not cached and not any(errors)


def test_cached_images_equal_fresh_decode(class_folders, tmp_path):
    items = discover(class_folders).items
    arr, _, _ = build_cache(items, 20, cache_dir=tmp_path / "c", workers=2)
    for k in (0, 7, 29):
        assert np.array_equal(arr[k], load_image(items[k].path, 20))


# --------------------------------------------------------------------------------------- batches


def test_loader_shapes_dtypes_and_determinism():
    ds = load_dataset("synthetic:120", image_size=32, seed=0)
    assert set(ds.splits) == {"train", "val", "test"}
    tr = ds.splits["train"]
    loader = BatchLoader(tr, 16, shuffle=True, augment="strong", seed=5)
    loader.set_epoch(1)
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.isfinite(x).all() and -3 < x.mean() < 3
    loader.set_epoch(1)
    x2, y2 = next(iter(loader))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    loader.set_epoch(2)
    x3, _ = next(iter(loader))
    assert not torch.equal(x, x3)
    plain = BatchLoader(tr, 16)
    total = sum(len(yb) for _, yb in plain)
    assert total == len(tr) and len(plain) == -(-len(tr) // 16)


def test_synthetic_same_seed_same_data_other_seed_other_data():
    a = load_dataset("synthetic:80", image_size=32, seed=1)
    b = load_dataset("synthetic:80", image_size=32, seed=1)
    c = load_dataset("synthetic:80", image_size=32, seed=2)
    assert b.cached
    assert np.array_equal(a.splits["train"].images, b.splits["train"].images)
    assert not np.array_equal(a.splits["train"].images, c.splits["train"].images)
