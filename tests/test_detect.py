"""The cell detector and `count`: training on fields with boxes, finding white cells, typing and
counting them into a differential, resuming, bad fields, and POST /count."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quiet, tiny
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from bloodcell.cli import main
from bloodcell.data.boxes import discover_boxes
from bloodcell.errors import BloodcellError
from bloodcell.inference.count import crop_box, find_slides
from bloodcell.inference.detect import Detector, evaluate_boxes
from bloodcell.models.detector import CellDetector, decode, field_batch
from bloodcell.training.detect import DetectConfig, colour_jitter, targets, train_detector
from bloodcell.training.train import train


def synthetic_fields(root: Path, n: int, seed: int = 0, size=(160, 120)) -> Path:
    """A YOLO set of fake fields: pink background, red-cell rings, and 0-2 violet white cells."""
    rng = np.random.default_rng(seed)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "classes.txt").write_text("WBC\nRBC\n")
    w, h = size
    for i in range(n):
        split = "train" if i < n * 0.7 else "val" if i < n * 0.85 else "test"
        im = Image.new("RGB", size, (236, 200, 200))
        d = ImageDraw.Draw(im)
        rows = []
        for _ in range(int(rng.integers(4, 8))):
            x, y, r = rng.uniform(10, w - 10), rng.uniform(10, h - 10), rng.uniform(8, 11)
            d.ellipse([x - r, y - r, x + r, y + r], fill=(225, 160, 165), outline=(200, 120, 130), width=2)
            rows.append(f"1 {x / w:.5f} {y / h:.5f} {2 * r / w:.5f} {2 * r / h:.5f}")
        for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):
            x, y, r = rng.uniform(25, w - 25), rng.uniform(25, h - 25), rng.uniform(15, 20)
            d.ellipse([x - r, y - r, x + r, y + r], fill=(200, 170, 215))
            d.ellipse([x - r * 0.6, y - r * 0.6, x + r * 0.6, y + r * 0.6], fill=(90, 40, 140))
            rows.append(f"0 {x / w:.5f} {y / h:.5f} {2 * r / w:.5f} {2 * r / h:.5f}")
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        im.save(root / "images" / split / f"f{i:03d}.jpg", quality=95)
        (root / "labels" / split / f"f{i:03d}.txt").write_text("\n".join(rows) + "\n")
    return root


FAST = DetectConfig(input_size=128, epochs=30, batch_size=8, width=16, lr=4e-3, threads=1)


@pytest.fixture(scope="module")
def fields(tmp_path_factory) -> Path:
    return synthetic_fields(tmp_path_factory.mktemp("fields") / "set", 60)


@pytest.fixture(scope="module")
def detector_run(fields, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("det") / "run"
    train_detector([str(fields)], out, FAST, log=quiet, progress=False)
    return out


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cls") / "run"
    train(tiny(), out, log=quiet, progress=False)
    return out


# -- the network and its targets ------------------------------------------------------------------


def test_detector_maps_are_a_quarter_of_the_input_and_decode_to_boxes():
    m = CellDetector(3, width=8).eval()
    heat, sizes = m(torch.zeros(2, 3, 96, 128))
    assert heat.shape == (2, 3, 24, 32) and sizes.shape == (2, 6, 24, 32)
    heat = torch.full((1, 1, 24, 32), -10.0)
    heat[0, 0, 10, 20] = 5.0
    sizes = torch.zeros(1, 2, 24, 32)
    sizes[0, :, 10, 20] = float(np.log(40))
    (rows,) = decode(heat, sizes, threshold=0.5, scale=0.5)
    assert len(rows) == 1
    k, score, x0, y0, x1, y1 = rows[0]
    # centre (20.5, 10.5) x stride 4 = (82, 42) input pixels, 40 wide; / 0.5 -> original pixels
    assert k == 0 and score > 0.99 and (x0, y0, x1, y1) == pytest.approx((124, 44, 204, 124))


def test_targets_peak_at_each_box_centre_with_its_log_size():
    heat, wh, mask = targets(np.array([[40, 40, 72, 56]], np.float32), np.array([1]), 2, 128)
    assert heat.shape == (2, 32, 32) and heat[1].max() == 1.0 and heat[0].max() == 0.0
    iy, ix = np.unravel_index(heat[1].argmax(), heat[1].shape)
    assert (iy, ix) == (12, 14) and mask[1, iy, ix] == 1
    assert wh[2, iy, ix] == pytest.approx(np.log(32)) and wh[3, iy, ix] == pytest.approx(np.log(16))


def test_field_batch_pads_to_a_multiple_of_32_with_the_background():
    a = np.full((50, 70, 3), 200, np.uint8)
    x = field_batch([a])
    assert x.shape == (1, 3, 64, 96)
    assert torch.allclose(x[0, :, 60, 90], x[0, :, 10, 10])  # padding = the field's background


def test_colour_jitter_keeps_values_in_range_and_changes_them():
    x = torch.rand(4, 3, 16, 16)
    y = colour_jitter(x, torch.Generator().manual_seed(0))
    assert y.min() >= 0 and y.max() <= 1 and not torch.allclose(x, y)


def test_crop_box_is_square_around_the_cell_and_inside_the_field():
    assert crop_box([90, 40, 110, 60], 200, 100) == (80, 30, 120, 70)
    x0, y0, x1, y1 = crop_box([0, 0, 30, 20], 200, 100)
    assert (x0, y0) == (0, 0) and x1 - x0 == y1 - y0 == 60
    x0, y0, x1, y1 = crop_box([0, 0, 200, 100], 200, 100)  # at most the field's short side
    assert x1 - x0 == 100 and 0 <= x0 and x1 <= 200


def test_detector_settings_are_checked_before_any_work(tmp_path, capsys):
    with pytest.raises(BloodcellError, match="multiple of 32"):
        DetectConfig(input_size=100).check()
    with pytest.raises(SystemExit) as e:
        main(["detector", "train", str(tmp_path), "--out", str(tmp_path / "o"), "--lr", "nan"])
    assert e.value.code == 2 and "--lr: nan is outside" in capsys.readouterr().err


# -- training and finding (slow: a real, if small, training) ----------------------------------------


@pytest.mark.slow
def test_a_trained_detector_finds_the_white_cells_of_unseen_fields(fields, detector_run):
    metrics = json.loads((detector_run / "metrics.json").read_text())
    assert metrics["classes"] == ["wbc", "rbc"] and 0 < metrics["thresholds"]["wbc"] < 1
    det = Detector(detector_run)
    bs = discover_boxes(fields)
    scores = evaluate_boxes(det, bs.split("test"), bs.classes)
    assert scores["wbc"]["recall"] >= 0.8 and scores["wbc"]["precision"] >= 0.8, scores["wbc"]


def test_a_file_that_is_not_a_detector_is_one_line(tmp_path):
    (tmp_path / "detector.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BloodcellError, match="not a bloodcell detector"):
        Detector(tmp_path)
    with pytest.raises(BloodcellError, match="no detector"):
        Detector(tmp_path / "nowhere")


# -- count -----------------------------------------------------------------------------------------


def test_find_slides_reads_a_field_a_folder_and_a_folder_of_folders(tmp_path):
    for p in ("a/x.jpg", "a/y.jpg", "b/s1/z.jpg", "b/s2/w.png", "c.jpg"):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / p)
    slides = dict(find_slides([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c.jpg")]))
    assert sorted(slides) == ["a", "s1", "s2", tmp_path.name]
    assert len(slides["a"]) == 2
    with pytest.raises(BloodcellError, match="no such file"):
        find_slides([str(tmp_path / "nope")])


@pytest.mark.slow
def test_count_writes_cells_fields_differential_and_report(fields, detector_run, classifier_run, tmp_path, capsys):
    slide = tmp_path / "slide"
    slide.mkdir()
    for f in sorted((fields / "images" / "test").glob("*.jpg")):
        (slide / f.name).write_bytes(f.read_bytes())
    Image.new("RGB", (160, 120), (236, 200, 200)).save(slide / "empty.jpg")  # a field with no white cell
    (slide / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"
    code = main(["count", str(slide), "--out", str(out), "--model", str(classifier_run), "--detector",
                 str(detector_run), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1  # one field could not be read: said, and the exit says so, after every good field
    assert "broken.jpg" in captured.err
    cells = list(csv.DictReader(open(out / "cells.csv")))
    fields_rows = {Path(r["image"]).name: r for r in csv.DictReader(open(out / "fields.csv"))}
    assert fields_rows["empty.jpg"]["wbc"] == "0" and fields_rows["empty.jpg"]["error"] == ""
    assert fields_rows["broken.jpg"]["error"]
    truth = sum(f.count("wbc") for f in discover_boxes(fields).split("test"))
    assert abs(len(cells) - truth) <= 1
    assert {"image", "x0", "y0", "x1", "y1", "score", "label", "prob", "second"} <= set(cells[0])
    assert all((out / c["crop"]).is_file() for c in cells)
    diff = json.loads((out / "differential.json").read_text())
    (s,) = diff["slides"]
    assert s["cells"] == len(cells) and sum(r["count"] for r in s["classes"]) == len(cells)
    assert all(r["ci95"][0] <= r["percent"] <= r["ci95"][1] for r in s["classes"])
    assert (out / "differential.csv").is_file() and (out / "report.html").stat().st_size > 1000

    # a killed count continues: the journal's last field torn, the tables gone
    journal = out / ".count" / "fields.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    (out / "cells.csv").unlink()
    assert main(["count", str(slide), "--out", str(out), "--model", str(classifier_run), "--detector",
                 str(detector_run), "--no-progress"]) == 1
    assert "continuing" in capsys.readouterr().err
    assert len(list(csv.DictReader(open(out / "cells.csv")))) == len(cells)


@pytest.mark.slow
def test_count_on_boxed_fields_writes_detection_json(fields, detector_run, classifier_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["count", "--data", str(fields), "--out", str(out), "--model", str(classifier_run),
                 "--detector", str(detector_run), "--no-progress", "--no-report"]) == 0
    det = json.loads((out / "detection.json").read_text())
    assert det["split"] == "test" and det["per_class"]["wbc"]["recall"] >= 0.8
    assert "AP50" in capsys.readouterr().out


def test_count_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert main(["count", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--detector",
                 str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["count", "--out", str(tmp_path / "o")]) == 2
    assert "give field images" in capsys.readouterr().err


@pytest.mark.slow
def test_post_count_answers_cells_and_counts(detector_run, classifier_run, fields):
    from bloodcell.serve.app import create_app

    app = create_app(str(classifier_run), detector=str(detector_run), threads=1)
    client = TestClient(app)
    f = sorted((fields / "images" / "test").glob("*.jpg"))[0]
    r = client.post("/count", files={"file": (f.name, f.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert {"cells", "counts", "differential", "width", "height"} <= set(body)
    assert body["counts"]["wbc"] == len(body["cells"])
    assert client.post("/count", files={"file": ("x.jpg", b"nope", "image/jpeg")}).status_code == 415
    assert client.post("/count", files={"file": ("x.jpg", b"", "image/jpeg")}).status_code == 422
    no_detector = TestClient(create_app(str(classifier_run), threads=1))
    assert no_detector.post("/count", files={"file": (f.name, f.read_bytes(), "image/jpeg")}).status_code == 404
