"""data.check: `bloodcell data check` on real data and on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_image
from PIL import Image

from bloodcell.cli import main
from bloodcell.data import load_dataset
from bloodcell.errors import DataError


@pytest.mark.slow
@pytest.mark.realdata
def test_data_check_cli_real(pbc_root, capsys):
    assert main(["data", "check", str(pbc_root), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["usable"] and set(rep["splits"]) == {"train", "val", "test"}
    assert sum(sum(s["images"].values()) for s in rep["splits"].values()) == 5128
    assert "360x363" in rep["sizes"]


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


@pytest.mark.slow
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
