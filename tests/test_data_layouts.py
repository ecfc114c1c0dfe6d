"""data.layouts: discover() finds the layout, classes, duplicates and usability problems."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import write_image
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from bloodcell.cli import main
from bloodcell.data import discover_grouped, load_dataset
from bloodcell.data.check import check_data
from bloodcell.data.layouts import discover
from bloodcell.data.splits import make_splits
from bloodcell.errors import DataError
from bloodcell.runfiles import read_csv


@pytest.mark.slow
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


# --- the Kaggle breast histopathology (IDC) layout ----------------------------------------------


def idc_tree(root: Path, patients: dict[str, tuple[int, int]], size=(50, 50)) -> Path:
    """root/<patient>/{0,1}/<patient>_idx5_x<X>_y<Y>_class<C>.png: (class 0, class 1) patches per patient."""
    for p, counts in patients.items():
        for c, n in enumerate(counts):
            for i in range(n):
                write_image(root / p / str(c) / f"{p}_idx5_x{50 * i}_y{c * 50}_class{c}.png", size=size,
                            color=(200, 90 + 80 * c, 160), seed=int(p) * 100 + c * 50 + i)
    return root


MIXED = {f"{10 + k}": (4, 3) if k < 6 else (0, 5) for k in range(10)}


def test_idc_found_from_either_level_with_patients_as_groups(tmp_path):
    idc_tree(tmp_path / "top", MIXED)
    idc_tree(tmp_path / "release" / "IDC_regular_ps50_idx5", MIXED)
    for root in (tmp_path / "top", tmp_path / "release"):
        src = discover(root)
        assert src.layout == "idc" and src.classes == ["no IDC", "IDC"] and src.group_by == "patient"
        assert len(src.items) == 6 * 7 + 4 * 5 and {it.group for it in src.items} == {f"patient/{p}" for p in MIXED}
        assert all((it.label == 1) == it.path.endswith("class1.png") for it in src.items)
    # the release: patient folders and the nested copy side by side: the copy is not read twice
    idc_tree(tmp_path / "both", MIXED)
    shutil.copytree(tmp_path / "both", tmp_path / "both-copy")
    shutil.move(tmp_path / "both-copy", tmp_path / "both" / "IDC_regular_ps50_idx5")
    src = discover(tmp_path / "both")
    assert len(src.items) == 62 and any(p.kind == "idc_nested_copy" for p in src.problems)


def test_idc_patient_never_on_two_sides_whatever_the_seed(tmp_path):
    src = discover(idc_tree(tmp_path, MIXED))
    for seed in range(10):
        splits = make_splits(src.items, seed)
        patients = [{src.items[i].group for i in idx} for idx in splits.values()]
        assert sum(len(p) for p in patients) == len(MIXED)  # each patient in exactly one split
        assert all({src.items[i].label for i in idx} == {0, 1} for idx in splits.values())


def test_idc_confounded_split_is_refused_in_one_line(tmp_path, capsys):
    root = idc_tree(tmp_path / "idc", {"1": (6, 0), "2": (5, 1), **{f"{3 + k}": (0, 4) for k in range(6)}})
    src = discover_grouped(root)
    note = next(p for p in src.problems if p.kind == "class_confounded_with_group")
    assert "only 1 of 8 patients hold more than one class (2)" in note.detail and "no IDC from 2" in note.detail
    with pytest.raises(DataError, match="patient-grouped split leaves (val|test) without class no IDC: only 2"):
        load_dataset(root, image_size=16, cache_dir=tmp_path / "cache")
    assert main(["data", "check", str(root)]) == 1
    out, err = capsys.readouterr()
    assert "FATAL split_lacks_class" in out and "class_confounded_with_group" in out
    assert err.strip().count("\n") == 0 and "without class no IDC" in err


def test_idc_edge_patches_are_decoded_to_the_size_asked(tmp_path):
    root = idc_tree(tmp_path / "idc", MIXED)
    idc_tree(root, {"10": (1, 0)}, size=(31, 50))  # a slide-edge patch, as in the real set
    ds = load_dataset(root, image_size=50, cache_dir=tmp_path / "cache")
    assert {s.images.shape[1:] for s in ds.splits.values()} == {(50, 50, 3)} and not ds.problems


@pytest.mark.slow
@pytest.mark.realdata
def test_idc_real_subset(idc_root):
    src = discover_grouped(idc_root)
    assert src.layout == "idc" and len(src.items) == 4026 and len({it.group for it in src.items}) == 19
    assert sum(it.label == 0 for it in src.items) == 1000
    note = next(p for p in src.problems if p.kind == "class_confounded_with_group")
    assert "only 4 of 19 patients" in note.detail and note.paths == ["8863", "8864", "8865", "8867"]
    report = check_data(idc_root, seed=1)
    assert report["usable"] and report["sizes"]["50x50"] == 4012 and sum(report["sizes"].values()) == 4026
    assert all(min(s["images"].values()) > 0 for s in report["splits"].values())  # both classes in each


@pytest.mark.slow
@pytest.mark.realdata
def test_idc_real_train_and_evaluate_binary_figures(idc_subset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(idc_subset), "--model", "cnn2x32", "--image-size", "50", "--epochs", "1",
                 "--threads", "1", "--out", str(run), "--quiet"]) == 0
    assert "F1 (IDC)" in capsys.readouterr().out
    splits = json.loads((run / "splits.json").read_text())
    patients = [{Path(p).parts[-3] for p in paths} for paths in splits.values()]
    assert not (patients[0] & patients[1]) and not (patients[0] & patients[2]) and not (patients[1] & patients[2])
    m = json.loads((run / "metrics.json").read_text())["test"]
    rows = read_csv(run / "predictions_test.csv")
    y = [int(r["label"] == "IDC") for r in rows]
    p = [float(r["p_IDC"]) for r in rows]
    assert m["positive_class"] == "IDC"
    assert m["f1_positive"] == pytest.approx(f1_score(y, [int(r["pred"] == "IDC") for r in rows]), abs=1e-9)
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p), abs=1e-4)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-4)
    assert main(["evaluate", str(run), "--data", str(idc_subset)]) == 0
    out = capsys.readouterr().out
    assert f"F1 (IDC) {m['f1_positive']:.4f}" in out and f"PR AUC {m['pr_auc']:.4f}" in out


def test_unlabelled_folder_points_to_predict(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"cell{i}.png", seed=i)
    problem = next(p for p in discover(tmp_path).problems if p.fatal)
    assert problem.kind == "unlabelled_images" and "bloodcell predict RUN FOLDER" in problem.detail
