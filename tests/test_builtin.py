"""The models bloodcell ships: they load, match their checksums, work wherever a run does, right after
install and offline, and read real cells and fields near their card's figures."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import real_folder
from PIL import Image

from bloodcell.cli import main
from bloodcell.data.images import decode_image
from bloodcell.errors import BloodcellError
from bloodcell.models import builtin
from bloodcell.models.checkpoint import load_model
from bloodcell.models.gate import ColourGate

pytestmark = pytest.mark.skipif(not (builtin.builtin_dir() / "manifest.json").is_file(),
                                reason="this install ships no built-in models")


def test_shipped_files_match_their_checksums_and_are_small():
    m = builtin.manifest()
    assert set(m) == {"classifier", "detector"}
    for kind, entry in m.items():
        path = builtin.builtin_path(kind)
        assert builtin.sha256(path) == entry["sha256"]
        assert path.stat().st_size < 5e6  # a few MB at most, inside the package


def test_a_changed_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "classifier.pt").write_bytes(b"tampered")
    (tmp_path / "manifest.json").write_text(json.dumps({"classifier": {"sha256": "0" * 64}}))
    monkeypatch.setattr(builtin, "builtin_dir", lambda: tmp_path)
    with pytest.raises(BloodcellError, match="checksum"):
        builtin.builtin_path("classifier")


def test_class_names_are_one_lower_case_spelling():
    _, meta = load_model("builtin")
    assert meta["classes"] == [c.lower() for c in meta["classes"]]
    assert {"eosinophil", "lymphocyte", "monocyte", "neutrophil"} <= set(meta["classes"])


def _cell(tmp_path):
    rng = np.random.default_rng(0)
    a = np.full((120, 120, 3), (230, 200, 205), np.uint8)
    yy, xx = np.mgrid[:120, :120]
    a[(yy - 60) ** 2 + (xx - 60) ** 2 < 900] = (100, 50, 150)
    a = (a + rng.integers(0, 10, a.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "cell.png")
    return tmp_path / "cell.png"


def test_predict_with_no_run_uses_the_builtin(tmp_path, capsys):
    cell = _cell(tmp_path)
    assert main(["predict", str(cell), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    _, meta = load_model("builtin")
    assert rows[0]["class"] in meta["classes"]


def test_builtin_stands_wherever_a_run_does(tmp_path, capsys):
    assert main(["export", "builtin", "--out", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 1000
    assert main(["models"]) == 0
    assert "builtin" in capsys.readouterr().out
    assert main(["models", "--card"]) == 0
    card = capsys.readouterr().out
    assert "python scripts/build_builtin.py" in card and "licence" in card.lower()
    from fastapi.testclient import TestClient

    from bloodcell.serve.app import create_app

    client = TestClient(create_app("builtin", detector=str(builtin.builtin_path("detector")), threads=1))
    assert client.get("/model").json()["classes"] == load_model("builtin")[1]["classes"]


def test_the_builtin_reads_its_own_labs_in_colour_and_a_lab_never_seen_in_grey_levels():
    """The card's gate: Kaggle's and PBC's cells go to the colour branch, Tecom's (yellow ground, a
    rapid stain) to the grey-level one."""
    model, meta = load_model("builtin")
    assert isinstance(model, ColourGate)
    mean, std = (torch.tensor(meta[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    labs = {"Kaggle": (real_folder("blood-cells", "dataset2-master", "images", "TEST"), 0.9, 1.0),
            "PBC": (real_folder("pbc", "PBC_dataset_normal_DIB"), 0.9, 1.0),
            "Tecom": (real_folder("other-labs", "tecom"), 0.0, 0.1)}
    for name, (folder, lo, hi) in labs.items():
        files = [p for c in meta["classes"] for d in folder.iterdir() if d.name.lower() == c
                 for p in sorted(d.iterdir())[:10]]
        x = torch.from_numpy(np.stack([decode_image(str(f), meta["image_size"], meta["resize"]) for f in files]))
        x = (x.permute(0, 3, 1, 2).float() / 255 - mean) / std
        share = float(model.routes(x).float().mean())
        assert lo <= share <= hi, (name, share)


@pytest.mark.slow
def test_builtin_reads_real_cells_of_each_lab_near_the_card(capsys):
    """The card's per-lab figures are on each lab's test split; a sample of real cells per lab here
    must read within 15 points of them (100 cells: the 95 % interval is about +- 10)."""
    card = (builtin.builtin_dir() / "CARD.md").read_text()
    labs = {"blood-cells": ("Kaggle", real_folder("blood-cells", "dataset2-master", "images", "TEST")),
            "pbc": ("PBC", real_folder("pbc", "PBC_dataset_normal_DIB")),
            "tecom": ("Tecom", real_folder("other-labs", "tecom"))}
    _, meta = load_model("builtin")
    for name, (label, folder) in labs.items():
        m = re.search(rf"\| {label} \| [^|]*\| ([0-9.]+) %", card)
        assert m, f"the card gives no test figure for {label}"
        figure = float(m.group(1))
        files = [p for c in meta["classes"] for d in folder.iterdir() if d.name.lower() == c
                 for p in sorted(d.iterdir())[:20]]
        assert main(["predict", *map(str, files), "--format", "json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        right = sum(r["class"] == p.parent.name.lower() for r, p in zip(rows, files, strict=True))
        assert 100 * right / len(files) >= figure - 15, (name, right, len(files), figure)


@pytest.mark.slow
def test_builtin_detector_finds_the_white_cells_of_real_fields():
    from bloodcell.data.boxes import discover_boxes
    from bloodcell.inference.detect import Detector, evaluate_boxes

    det = Detector("builtin", threads=1)
    for lab in ("raabin", "pbc"):
        bs = discover_boxes(real_folder("smears", lab))
        s = evaluate_boxes(det, bs.split("test"), bs.classes)["wbc"]
        # every miss of the card's figures is a cell cut by the field's edge
        assert s["whole_recall"] >= 0.97 and s["found_precision"] >= 0.9, (lab, s)


@pytest.mark.slow
def test_count_with_the_builtin_models_on_a_real_slide(tmp_path, capsys):
    from pathlib import Path

    from bloodcell.data.boxes import discover_boxes

    bs = discover_boxes(real_folder("smears", "pbc"))
    fields = [Path(f.path) for f in bs.split("test") if f.count("wbc")][:5]
    assert len(fields) == 5, "the PBC smears' test split holds fewer than 5 fields with a white cell"
    slide = tmp_path / "slide"
    slide.mkdir()
    for f in fields:
        (slide / f.name).symlink_to(f.resolve())
    assert main(["count", str(slide), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    diff = json.loads((tmp_path / "out" / "differential.json").read_text())
    assert diff["slides"][0]["cells"] >= 4  # each of these fields holds a boxed white cell


def test_detector_evaluate_takes_builtin_and_an_empty_split_is_one_line(tmp_path, capsys):
    (tmp_path / "images" / "test").mkdir(parents=True)
    (tmp_path / "labels" / "test").mkdir(parents=True)
    (tmp_path / "labels" / "classes.txt").write_text("WBC\n")
    Image.new("RGB", (160, 120), (230, 200, 205)).save(tmp_path / "images" / "test" / "f.jpg")
    (tmp_path / "labels" / "test" / "f.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    assert main(["detector", "evaluate", "builtin", "--data", str(tmp_path)]) == 0
    assert "wbc" in capsys.readouterr().out
    assert main(["detector", "evaluate", "builtin", "--data", str(tmp_path), "--split", "train"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no train fields" in err


def test_the_shipped_examples_read_and_count_with_no_training(tmp_path, capsys):
    """The README's first examples: one PBC cell per class, and a slide of three PBC fields."""
    examples = builtin.builtin_dir() / "examples"
    cells = sorted((examples / "cells").glob("*.jpg"))
    _, meta = load_model("builtin")
    assert [c.stem for c in cells] == meta["classes"]
    assert main(["predict", *map(str, cells), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(cells) and all(r["class"] in meta["classes"] for r in rows)
    assert main(["count", str(examples / "slide"), "--out", str(tmp_path / "count"), "--no-progress"]) == 0
    diff = json.loads((tmp_path / "count" / "differential.json").read_text())
    assert diff["slides"][0]["cells"] >= 3  # each field holds a boxed white cell
