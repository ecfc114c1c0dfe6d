"""The compare report: built from a fake compare folder, self-contained, complete, ranked by test."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodcell.catalog import STUDY
from bloodcell.cli import main
from bloodcell.metrics import compute_metrics
from bloodcell.report import build_report, pct_ci

CLASSES = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_split(rng: np.random.Generator, n: int, acc: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, probabilities right about `acc` of the time (image 0 wrong), groups of 2 images."""
    y = rng.integers(0, len(CLASSES), n)
    right = rng.random(n) < acc
    right[0] = False  # image 0 is the most confident error (its file is the missing one)
    pred = np.where(right, y, (y + rng.integers(1, len(CLASSES), n)) % len(CLASSES))
    z = rng.normal(0, 0.6, (n, len(CLASSES))) + 2.5 * np.eye(len(CLASSES))[pred]
    z[0, pred[0]] += 5
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return y, p, np.arange(n) // 2


def write_run(d: Path, name: str, acc: float, val_acc: float, paths: list[str], rng,
              simple: bool = False) -> dict:
    """runs/<name>/{history,predictions_test,metrics}.csv|json and the results.json row."""
    run = d / "runs" / name
    run.mkdir(parents=True)
    metrics = {}
    for split, n in (("val", 40), ("test", len(paths))) + ((("test_simple", 12),) if simple else ()):
        y, p, g = fake_split(rng, n, val_acc if split == "val" else acc)
        metrics[split] = compute_metrics(y, p, CLASSES, groups=g, n_boot=50)
        if split == "test":
            with open(run / "predictions_test.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["path", "label", "pred", "confidence", *[f"p_{c}" for c in CLASSES]])
                for path, yi, pi in zip(paths, y, p, strict=True):
                    k = int(pi.argmax())
                    w.writerow([path, CLASSES[yi], CLASSES[k], f"{pi[k]:.6f}", *[f"{v:.6f}" for v in pi]])
    epochs = 6
    with open(run / "history.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1", "lr",
                    "seconds", "images_per_s"])
        for e in range(1, epochs + 1):
            t = e / epochs
            w.writerow([e, 1.4 - acc * t, 0.3 + (acc - 0.25) * t, 1.45 - 0.9 * acc * t,
                        0.25 + (acc - 0.28) * t, 0.2 + (acc - 0.3) * t, 1e-3, 2.0, 500])
    metrics["run"] = {"best_epoch": epochs - 1, "epochs_run": epochs}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return {"model": name, "description": f"{name} test model", "params": int(2e4 / (1.1 - acc) ** 2),
            "image_size": 64, "batch_size": 32, "epochs": epochs, "epochs_run": epochs,
            "best_epoch": epochs - 1, "train_minutes": 3 * acc, "train_images_per_s": 800 * (1 - acc) + 100,
            "norm": "batch", "run_dir": f"runs/{name}", "study": STUDY.get(name),
            **metrics}


def make_compare(d: Path, models: dict[str, tuple[float, float]], synthetic: bool, seed: int = 0) -> Path:
    """A compare folder as `bloodcell compare` writes it; test images are PNG files (one missing) or
    synthetic:// paths."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    n_test = 30
    if synthetic:
        paths = [f"synthetic://{seed}/{i}" for i in range(n_test)]
    else:
        (d / "images").mkdir()
        paths = []
        for i in range(n_test):
            path = d / "images" / f"cell_{i}.png"
            Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(path)
            paths.append(str(path))
        paths[0] = str(d / "images" / "deleted_since.png")  # a file that is gone
    rows = [write_run(d, name, acc, val, paths, rng, simple=not synthetic)
            for name, (acc, val) in models.items()]
    res = {
        "bloodcell_version": "0.1.0", "created": "2025-01-02T03:04:05",
        "command": "bloodcell compare --out X",
        "protocol": {"data": "synthetic" if synthetic else "/data/blood", "image_size": 64, "batch_size": 32,
                     "epochs": 6, "lr": 0.001, "optimizer": "adamw", "augment": "light", "seed": 0,
                     "models": list(models), "overrides": {list(models)[0]: {"lr": 0.003}}},
        "dataset": {"root": "synthetic" if synthetic else "/data/blood", "layout": "kaggle",
                    "synthetic": synthetic, "classes": CLASSES,
                    "splits": {s: {"images": dict.fromkeys(CLASSES, 10), "groups": dict.fromkeys(CLASSES, 5)}
                               for s in ("train", "val", "test")},
                    "problems": [{"kind": "duplicates", "detail": "3 identical files", "n": 3}]},
        "environment": {"python": "3.12", "torch": "2.x", "cores": 2, "device": "cpu"},
        "models": rows,
    }
    (d / "results.json").write_text(json.dumps(res))
    return d


class Attrs(HTMLParser):
    """Every attribute of every tag, and the <img> sources."""

    def __init__(self):
        super().__init__()
        self.attrs, self.imgs, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        if tag == "img":
            self.imgs.append(dict(attrs).get("src", ""))


def summary_order(text: str, names: list[str]) -> list[str]:
    table = text[text.index('<table id="summary"'):]
    table = table[:table.index("</table>")]
    return sorted(names, key=lambda n: table.index(f"<strong>{n}</strong>"))


# (test, val) accuracy, out of list order, and val ranks differently: the table must follow test
REAL = {"cnn2x32": (0.45, 0.5), "cnn4x32": (0.92, 0.75), "resnet18": (0.7, 0.95)}


@pytest.fixture(scope="module")
def real_report(tmp_path_factory):
    d = make_compare(tmp_path_factory.mktemp("cmp") / "compare", REAL, synthetic=False)
    html_path, md_path = build_report(d)
    return d, html_path, md_path


@pytest.mark.slow
def test_files_are_written(real_report):
    d, html_path, md_path = real_report
    assert html_path == d / "report.html" and html_path.stat().st_size > 10_000
    assert md_path == d / "report.md"
    md = md_path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) >= 5 + len(REAL)  # curves, overlay, confusion, recall, cost + a gallery each
    for link in links:
        assert not link.startswith(("/", "http")) and (d / link).read_bytes().startswith(PNG_MAGIC)
    assert html_path.stat().st_size < 3_000_000


def test_html_is_self_contained(real_report):
    text = real_report[1].read_text()
    p = Attrs()
    p.feed(text)
    for tag, k, v in p.attrs:
        assert not v.strip().lower().startswith(("http:", "https:", "//", "file:")), (tag, k, v[:80])
    assert "script" not in p.tags and "link" not in p.tags and "iframe" not in p.tags
    assert "@import" not in text and "url(" not in text
    assert len(p.imgs) >= 5 + len(REAL)
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data.startswith(PNG_MAGIC)
        Image.open(io.BytesIO(data)).verify()


def test_tables_rank_by_test_accuracy(real_report):
    _, html_path, md_path = real_report
    text, md = html_path.read_text(), md_path.read_text()
    assert summary_order(text, list(REAL)) == ["cnn4x32", "resnet18", "cnn2x32"]
    res = json.loads((html_path.parent / "results.json").read_text())
    best = max(res["models"], key=lambda r: r["test"]["accuracy"])
    assert best["model"] == "cnn4x32"
    assert pct_ci(best["test"]["accuracy"], best["test"]["accuracy_ci"]) in text
    assert "TEST_SIMPLE acc" in text  # Kaggle-like data: the column is there
    md_rows = [line for line in md.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert "cnn4x32" in md_rows[0] and "resnet18" in md_rows[1]
    assert "nothing (model, epoch, threshold) was selected on the test split" in text
    assert "The best model on validation (resnet18) is not the best on test (cnn4x32)" in text


def test_study_figures_and_no_banner(real_report):
    _, html_path, md_path = real_report
    text = html_path.read_text()
    study = text[text.index('<table id="study"'):]
    study = study[:study.index("</table>")]
    for fig in ("Model 1", "25.0 %", "1.38", "Model 2", "67.0 %", "0.70", "Model 3", "68.0 %", "0.67",
                "Model 4", "vgg3 (not run)"):
        assert fig in study
    assert "Model 3: 68.0 %, 0.67" in md_path.read_text()  # beside ours in the summary
    assert 'Model 3<span class="sub2">68.0 %, loss 0.67</span>' in text
    assert "synthetic-banner" not in text and "SYNTHETIC" not in md_path.read_text()
    assert "1 image(s) could not be read" in text and "deleted_since.png" in text
    assert "3 identical files" in text and "adamw" in text and "bloodcell compare --out X" in text


@pytest.mark.slow
def test_synthetic_with_missing_results_via_cli(tmp_path, capsys):
    d = make_compare(tmp_path / "syn", {"cnn4x32": (0.8, 0.8), "tiny": (0.6, 0.6)}, synthetic=True)
    res = json.loads((d / "results.json").read_text())
    res["models"].append({"model": "crashed", "params": None, "val": None, "test": None,
                          "run_dir": "runs/crashed", "study": None})  # no files, no metrics
    (d / "results.json").write_text(json.dumps(res))
    assert main(["report", str(d)]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(d / "report.html"), str(d / "report.md")]
    text = (d / "report.html").read_text()
    assert 'id="synthetic-banner"' in text and "not real blood cells" in text
    assert "SYNTHETIC DATA" in (d / "report.md").read_text()
    assert summary_order(text, ["cnn4x32", "tiny", "crashed"]) == ["cnn4x32", "tiny", "crashed"]
    assert "crashed</strong>: no test predictions saved" in text
    assert "could not be read" not in text  # synthetic images are regenerated, not read


@pytest.mark.slow
def test_report_says_what_the_train_split_took_from_another_set(tmp_path, capsys):
    d = make_compare(tmp_path / "x", {"cnn4x32": (0.8, 0.8)}, synthetic=True)
    res = json.loads((d / "results.json").read_text())
    res["dataset"]["extra_train"] = {"root": "/data/lab2", "images": {"eosinophil": 1234, "monocyte": 56},
                                     "left_out": ["platelet"]}
    (d / "results.json").write_text(json.dumps(res))
    assert main(["report", str(d)]) == 0
    md = " ".join((d / "report.md").read_text().split())
    assert ("The train split also holds images of another data set, `/data/lab2` (its own train split, of "
            "the classes above: eosinophil 1,234, monocyte 56); validation and test are this data's alone.") in md


def test_report_without_results_is_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bloodcell: error:") and "results.json" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "report.html").exists()


@pytest.mark.slow
def test_grad_cam_gallery_of_right_and_wrong_cells_from_the_saved_model(tmp_path):
    from test_predict import make_checkpoint  # the untrained checkpoint the predict tests use

    from bloodcell.report.figures import THUMB

    d = make_compare(tmp_path / "cmp", {"cnn4x32": (0.7, 0.7)}, synthetic=True)
    make_checkpoint(d / "runs" / "cnn4x32" / "best.pt")
    build_report(d)
    text = (d / "report.html").read_text()
    assert "cnn4x32, where it looks" in text and "No Grad-CAM" not in text
    with Image.open(d / "figures" / "cams_cnn4x32.png") as im:
        grid = np.asarray(im.convert("RGB"), dtype=np.int16)
    # Each class's row: 4 pairs of (thumbnail, overlay); the overlay is the thumbnail with a map on it.
    left, pad, cap = 110, 10, 18
    assert grid.shape[1] == left + 4 * (2 * THUMB + pad) and grid.shape[0] == 4 * (THUMB + cap + pad) + pad
    y = pad + cap
    image, over = grid[y:y + THUMB, left:left + THUMB], grid[y:y + THUMB, left + THUMB:left + 2 * THUMB]
    assert image.std() > 10 and np.abs(image - over).mean() > 3

    (d / "runs" / "cnn4x32" / "best.pt").unlink()  # a folder copied without its checkpoints
    assert main(["report", str(d)]) == 0
    assert "No Grad-CAM: `cnn4x32/best.pt` is not in this folder" in (d / "report.md").read_text()
    with Image.open(d / "figures" / "cams_cnn4x32.png") as im:
        assert im.width == left + 4 * (THUMB + pad)  # the same cells, thumbnails alone
