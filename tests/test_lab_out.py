"""crosslab: leave one lab out; the held-out lab chooses nothing; the matrix is what the folds measure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, quiet, write_image

from bloodcell.cli import main
from bloodcell.errors import BloodcellError, ConfigError
from bloodcell.report.format import pct
from bloodcell.studies.lab_out import crosslab, format_matrix, shared_classes
from bloodcell.training.evaluate import evaluate_checkpoint


def lab(root: Path, classes: tuple[str, ...], shift: int, n: int = 8) -> Path:
    for c, cls in enumerate(classes):
        for i in range(n):
            write_image(root / cls / f"{cls}_{i}.png", color=(70 * c + shift, 60, 210 - 50 * c),
                        seed=shift * 1000 + c * 100 + i)
    return root


@pytest.fixture
def labs(tmp_path) -> list[str]:
    return [str(lab(tmp_path / "lab_a", ("alpha", "beta", "gamma"), 0)),
            str(lab(tmp_path / "lab_b", ("ALPHA", "Beta", "delta"), 15)),
            str(lab(tmp_path / "lab_c", ("alpha", "beta", "gamma", "delta"), 30))]


def shared(labs: list[str]) -> dict:
    return {**{k: v for k, v in TINY.items() if k != "data"}, "data": labs}


def test_each_lab_is_held_out_once_and_chooses_nothing(tmp_path, labs) -> None:
    assert shared_classes(tuple(labs)) == ["alpha", "beta"]
    out = tmp_path / "xl"
    res = crosslab(shared(labs), out, log=quiet, progress=False, report=False)
    assert [f["name"] for f in res["folds"]] == ["lab_a", "lab_b", "lab_c"]
    for f in res["folds"]:
        run = out / f["run_dir"]
        files = [p for split in json.loads((run / "splits.json").read_text()).values() for p in split]
        assert files and not any(p.startswith(f["held_out"]) for p in files)  # never trained, validated on
        assert sorted(f["trained_on"]) == sorted(s for s in labs if s != f["held_out"])
        again = evaluate_checkpoint(run, f["held_out"], split="all", log=quiet)["all"]
        assert again["accuracy"] == f["held_out_metrics"]["accuracy"] == res["matrix"][f["name"]][f["name"]]
        assert again["n"] == 16  # every image of the held-out lab in the shared classes (2 x 8)
        for other in f["trained_on"]:
            assert res["matrix"][f["name"]][Path(other).name] == f["in_lab"][other]["accuracy"]
    assert "[" in format_matrix(res).splitlines()[1]  # the diagonal is marked

    logs: list[str] = []  # the same command again: every fold kept, nothing trained
    crosslab(shared(labs), out, log=logs.append, progress=False, report=False)
    assert sum("already finished, kept" in m for m in logs) == 3
    with pytest.raises(BloodcellError, match="another protocol"):
        crosslab({**shared(labs), "epochs": 3}, out, log=quiet, progress=False, report=False)


def test_crosslab_needs_two_labs_that_share_two_classes(tmp_path, labs) -> None:
    with pytest.raises(ConfigError, match="two or more labs"):
        crosslab(shared(labs[:1]), tmp_path / "one", log=quiet, progress=False)
    odd = str(lab(tmp_path / "odd", ("zeta", "eta"), 5))
    with pytest.raises(BloodcellError, match="share fewer than two classes"):
        crosslab(shared([labs[0], odd]), tmp_path / "odd_out", log=quiet, progress=False)


def test_cli_crosslab_report_shows_the_matrix(tmp_path, labs, capsys) -> None:
    out = tmp_path / "xl"
    args = ["crosslab", *[a for s in labs[:2] for a in ("--data", s)], "--model", "cnn2x32", "--image-size", "32",
            "--epochs", "1", "--threads", "1", "--precision", "fp32", "--quiet", "--out", str(out)]
    assert main(args) == 0
    res = json.loads((out / "crosslab.json").read_text())
    page = (out / "report.html").read_text()
    for f in res["folds"]:  # each held-out accuracy as the page shows it
        assert f"<strong>{pct(f['held_out_metrics']['accuracy'])}</strong>" in page
    assert 'src="data:image/png;base64,' in page
    assert main(["crosslab", "--data", labs[0], "--out", str(tmp_path / "x1")]) == 2
    assert "two or more labs" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.realdata
def test_crosslab_on_two_real_labs(other_labs, tmp_path) -> None:
    res = crosslab({"data": [str(other_labs / "tecom"), str(other_labs / "cellavision")], "model": "cnn2x32",
                    "image_size": 32, "epochs": 1, "threads": 1, "resize": "cellfit"}, tmp_path / "xl", log=quiet,
                   progress=False, report=False, label_curve=(5,))
    assert res["classes"] == ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    n = {f["name"]: f["held_out_metrics"]["n"] for f in res["folds"]}
    assert n["cellavision"] >= 95 and n["tecom"] >= 290  # every image of the held-out lab (100 and 300 cells)
    for name, c in res["label_curve"].items():  # the lab's own test split: 15 % of its cells
        assert 0.1 * n[name] < c["n_test"] < 0.25 * n[name]
        assert c["k"]["5"]["cells"]["neutrophil"] == 5 and 0 <= c["adapted"]["accuracy"] <= 1


@pytest.mark.slow
def test_label_curve_adapts_and_fine_tunes_on_the_held_out_labs_own_splits(tmp_path, labs) -> None:
    """--label-curve: per fold, the held-out lab's test split scored as trained, adapted (no label)
    and fine-tuned on K cells per class of its train split; the report shows it and the crops."""
    out = tmp_path / "xl"
    res = crosslab(shared(labs[:2]), out, log=quiet, progress=False, report=True, label_curve=(1, 3))
    for f in res["folds"]:
        c = res["label_curve"][f["name"]]
        run = out / f["run_dir"]
        test = json.loads((run / "k3" / "splits.json").read_text())["test"]
        assert c["n_test"] == len(test) and all(p.startswith(f["held_out"]) for p in test)
        train = json.loads((run / "k3" / "splits.json").read_text())["train"]
        assert len(train) == 2 * 3 and not set(train) & set(test)  # 3 cells of each shared class
        assert c["k"]["3"]["cells"] == {"alpha": 3, "beta": 3}
        assert c["k"]["3"]["accuracy"] == json.loads((run / "k3" / "metrics.json").read_text())["test"]["accuracy"]
        assert c["adapted"]["accuracy"] == json.loads((run / "adapted" / "metrics.json").read_text())["test"]["accuracy"]
        assert json.loads((run / "adapted" / "adapt.json").read_text())["split"] == "train"
    with np.load(out / "crops.npz") as z:
        assert sorted(z.files) == ["lab_a", "lab_b"] and z["lab_a"].shape[1:] == (32, 32, 3)
    html = (out / "report.html").read_text()
    assert 'id="label-curve"' in html and "as the model sees them" in html
    logs: list[str] = []  # again: the curve's runs are kept
    crosslab(shared(labs[:2]), out, log=logs.append, progress=False, report=False, label_curve=(1, 3))
    assert not any("entropy" in m or "re-estimated" in m for m in logs)


def test_label_curve_flag_is_checked(capsys, labs, tmp_path) -> None:
    for bad in ("5,x", "0"):
        assert main(["crosslab", "--data", labs[0], "--data", labs[1], "--out", str(tmp_path / "x"),
                     "--label-curve", bad]) == 2
        assert "--label-curve" in capsys.readouterr().err
