"""data.sources: several data sets as one (classes by name, each source split on its own, sources kept)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import other_lab

from bloodcell.data import load_dataset, load_sources, problem_lines, source_rows
from bloodcell.errors import DataError


def test_several_sources_join_with_classes_matched_by_name(tmp_path, class_folders) -> None:
    lab2 = other_lab(tmp_path / "lab2")  # ALPHA, Beta (alpha, beta in another case) and delta
    a = load_dataset(str(class_folders), image_size=16)
    b = load_dataset(str(lab2), image_size=16)
    ds = load_sources([str(class_folders), str(lab2)], image_size=16)
    assert ds.classes == ["alpha", "beta", "delta", "gamma"]  # one list, the first source's spelling
    assert [s["root"] for s in ds.sources] == [a.root, b.root]
    for name in ("train", "val", "test"):
        s = ds.splits[name]
        # each source keeps its own split: the same files, pixels and classes as when loaded alone
        for k, alone in enumerate((a, b)):
            rows = np.flatnonzero(s.sources == k)
            assert [s.paths[i] for i in rows] == alone.splits[name].paths
            np.testing.assert_array_equal(s.images[rows], np.asarray(alone.splits[name].images))
            assert [ds.classes[i].lower() for i in s.labels[rows]] == \
                [alone.classes[i].lower() for i in alone.splits[name].labels]
        assert source_rows(ds, name)[1][0] == b.root
    # no group is shared by two sources or by two splits
    seen: dict[int, str] = {}
    for name, s in ds.splits.items():
        for g, k in zip(s.groups.tolist(), s.sources.tolist(), strict=True):
            assert seen.setdefault(g, f"{name}/{k}") == f"{name}/{k}"


def test_one_source_is_load_dataset_itself(class_folders) -> None:
    one = load_sources([str(class_folders)], image_size=16)
    alone = load_dataset(str(class_folders), image_size=16)
    assert one.sources == [] and one.splits["train"].sources is None
    assert one.split_files() == alone.split_files()


def test_a_bad_source_is_named(tmp_path, class_folders) -> None:
    with pytest.raises(DataError, match=f"^--data {tmp_path / 'nowhere'}: data path does not exist"):
        load_sources([str(class_folders), str(tmp_path / "nowhere")], image_size=16)


def test_a_sources_problem_names_its_data_check(tmp_path, class_folders) -> None:
    lab2 = other_lab(tmp_path / "lab2")
    (lab2 / "ALPHA" / "broken.png").write_bytes(b"not a png")
    ds = load_sources([str(class_folders), str(lab2)], image_size=16)
    lines = problem_lines(ds, [str(class_folders), str(lab2)])
    assert lines and all(f"(bloodcell data check {lab2} lists them)" in line for line in lines)


def test_few_labels_draws_k_cells_per_class_one_image_each(tmp_path, class_folders) -> None:
    """few_labels: k groups per class from train and val (one image of each, a class with fewer keeps
    all), seeded; test untouched."""
    from bloodcell.data import few_labels

    ds = load_dataset(str(class_folders), image_size=16)
    s = ds.splits["train"]
    # make every two images of a class one group (copies of one cell)
    s.groups[:] = np.arange(len(s)) // 2 + 1000 * s.labels
    few = few_labels(ds, 2, seed=0)
    t = few.splits["train"]
    for i, c in enumerate(ds.classes):
        rows = t.labels == i
        want = min(2, len(np.unique(s.groups[s.labels == i])))
        assert rows.sum() == want == few.labelled["train"][c]
        assert len(np.unique(t.groups[rows])) == want  # distinct cells, one image each
    assert set(t.paths) <= set(s.paths)
    assert few.splits["test"].paths == ds.splits["test"].paths
    assert few_labels(ds, 2, seed=0).splits["train"].paths == t.paths
    assert few_labels(ds, 99, seed=0).labelled["val"] == \
        {c: len(np.unique(ds.splits["val"].groups[ds.splits["val"].labels == i])) for i, c in enumerate(ds.classes)}
