"""Label tables (data/tables.py): path,label rows with optional group and split, and every bad row."""

from __future__ import annotations

import pytest
from conftest import write_image

from bloodcell.cli import main
from bloodcell.data import discover, load_dataset
from bloodcell.data.check import check_data
from bloodcell.data.tables import class_order
from bloodcell.errors import DataError


def lab(root, n=12, classes=("benign", "malignant"), patients=4):
    """root/img/<i>.png for n images per class; returns (rows, files): rows of path,label,group."""
    rows = []
    for c, cls in enumerate(classes):
        for i in range(n):
            name = f"img/{cls}_{i}.png"
            write_image(root / name, color=(200 - 120 * c, 60, 60 + 120 * c), seed=c * 100 + i)
            rows.append((name, cls, f"p{(i + c) % patients}"))
    return rows


def write_table(path, header, rows, sep=","):
    path.write_text(sep.join(header) + "\n" + "".join(sep.join(r) + "\n" for r in rows))
    return path


def test_csv_paths_relative_to_the_table_and_unknown_columns_noted(tmp_path):
    rows = lab(tmp_path)
    t = write_table(tmp_path / "labels.csv", ["Path", "Label", "scanner"], [(p, c, "s1") for p, c, _ in rows])
    src = discover(t)
    assert src.layout == "table" and src.classes == ["benign", "malignant"]
    assert len(src.items) == 24 and all(it.path.startswith(str(tmp_path / "img")) for it in src.items)
    assert src.group_by == "file" and len({it.group for it in src.items}) == 24
    notes = {p.kind: p for p in src.problems}
    assert "scanner" in notes["table_columns_ignored"].detail and not notes["table_columns_ignored"].fatal


def test_tsv_with_groups_splits_by_group(tmp_path):
    rows = lab(tmp_path, n=15, patients=5)
    t = write_table(tmp_path / "labels.tsv", ["path", "label", "group"], rows, sep="\t")
    for seed in range(4):
        ds = load_dataset(t, image_size=16, seed=seed, cache_dir=tmp_path / "cache")
        assert ds.layout == "table" and ds.group_by == "column"
        group_of = {str(tmp_path / p): g for p, _, g in rows}
        seen = [{group_of[p] for p in s.paths} for s in ds.splits.values()]
        for a in range(len(seen)):  # no group on two sides
            for b in range(a + 1, len(seen)):
                assert not seen[a] & seen[b]


def test_split_column_is_taken_as_given(tmp_path):
    rows = lab(tmp_path, n=10)
    split = ["train"] * 6 + ["validation"] * 2 + ["test"] * 2
    t = write_table(tmp_path / "labels.csv", ["path", "label", "split"],
                    [(p, c, split[i % 10]) for i, (p, c, _) in enumerate(rows)])
    ds = load_dataset(t, image_size=16, cache_dir=tmp_path / "cache")
    assert {k: len(s) for k, s in ds.splits.items()} == {"train": 12, "val": 4, "test": 4}
    assert all("_6." in p or "_7." in p for p in ds.splits["val"].paths)


@pytest.mark.parametrize("bad_row, kind", [
    (("img/nowhere.png", "benign"), "table_rows_missing"),
    (("img/benign_0.png", ""), "table_rows_label"),
    (("img/benign_0.png", "malignant"), "table_label_conflicts"),
])
def test_a_bad_row_is_a_fatal_problem_and_one_line(tmp_path, capsys, bad_row, kind):
    rows = [(p, c) for p, c, _ in lab(tmp_path)]
    t = write_table(tmp_path / "labels.csv", ["path", "label"], rows + [bad_row])
    report = check_data(t, cache_dir=tmp_path / "cache")
    problem = next(p for p in report["problems"] if p["kind"] == kind)
    assert problem["fatal"] and not report["usable"]
    assert f"line {len(rows) + 2}" in " ".join(problem["paths"])  # the header is line 1
    with pytest.raises(DataError, match="row|listed twice"):
        load_dataset(t, image_size=16, cache_dir=tmp_path / "cache")
    assert main(["data", "check", str(t)]) == 1
    assert main(["train", "--data", str(t), "--epochs", "1", "--image-size", "16", "--threads", "1",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bloodcell: error:") and "Traceback" not in "".join(err)


def test_a_repeated_row_is_kept_once(tmp_path):
    rows = [(p, c) for p, c, _ in lab(tmp_path)]
    t = write_table(tmp_path / "labels.csv", ["path", "label"], rows + [rows[0]])
    src = discover(t)
    assert len(src.items) == 24 and any(p.kind == "table_duplicate_rows" and not p.fatal for p in src.problems)


def test_missing_table_bad_header_and_empty_table_are_one_line(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "none.csv")
    t = write_table(tmp_path / "a.csv", ["file", "class"], [("x.png", "a")])
    with pytest.raises(DataError, match="needs the columns path and label; its header has: file, class"):
        discover(t)
    t.write_text("path,label\n")
    with pytest.raises(DataError, match="no rows"):
        discover(t)


def test_unknown_split_and_group_across_splits_are_fatal(tmp_path):
    rows = lab(tmp_path, n=6, patients=2)
    t = write_table(tmp_path / "s.csv", ["path", "label", "split"],
                    [(p, c, "holdout" if i == 0 else "train") for i, (p, c, _) in enumerate(rows)])
    assert any(p.kind == "table_rows_split" and p.fatal for p in discover(t).problems)
    t = write_table(tmp_path / "g.csv", ["path", "label", "group", "split"],
                    [(p, c, g, "train" if i % 2 else "test") for i, (p, c, g) in enumerate(rows)])
    problem = next(p for p in discover(t).problems if p.kind == "table_group_across_splits")
    assert problem.fatal and "p0" in problem.paths


def test_class_order_numeric_where_every_label_is_a_number():
    assert class_order({"10", "2", "1"}) == ["1", "2", "10"]
    assert class_order({"b", "A", "c"}) == ["A", "b", "c"]
