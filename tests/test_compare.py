"""The main job end to end: compare on real images, results files, report, resume."""

from __future__ import annotations

import json
import math
import re

import pytest

from bloodcell.cli import main
from bloodcell.config import load_yaml
from bloodcell.studies.compare import compare, load_protocol

FAST = {"image_size": 32, "epochs": 2, "batch_size": 16, "threads": 1}


def finite_numbers(obj, path="results"):
    """Yield (path, value) for every number in a JSON tree that is not finite."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from finite_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        yield path, obj


@pytest.mark.realdata
@pytest.mark.slow
def test_compare_end_to_end_on_real_subset(kaggle_subset, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--data", str(kaggle_subset), "--models", "cnn2x32,cnn4x32", "--out", str(out),
                 "--image-size", "32", "--epochs", "2", "--batch-size", "16", "--quiet"])
    assert code == 0
    for name in ("results.json", "results.csv", "report.html", "report.md", "compare.yaml"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in res["models"]] == ["cnn2x32", "cnn4x32"]
    assert not list(finite_numbers(res)), list(finite_numbers(res))
    row = res["models"][0]
    assert {"val", "test", "test_simple"} <= set(row)
    from bloodcell.data import discover_grouped

    cells = {it.group for it in discover_grouped(kaggle_subset).items if it.split == "test"}  # look-alike groups
    assert row["test"]["n_groups"] == len(cells) >= 4 and row["study"]["label"] == "Model 1"
    assert res["dataset"]["layout"] == "kaggle" and not res["dataset"]["synthetic"]
    html = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", html)
    assert "<script src" not in html and "url(http" not in html
    assert "SYNTHETIC DATA" not in html
    # Interrupted or rerun: finished models are kept, not trained again.
    mtime = (out / "runs" / "cnn2x32" / "best.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["compare", "--data", str(kaggle_subset), "--models", "cnn2x32,cnn4x32", "--out", str(out),
                 "--image-size", "32", "--epochs", "2", "--batch-size", "16", "--quiet"]) == 0
    assert "already finished, kept" in capsys.readouterr().out
    assert (out / "runs" / "cnn2x32" / "best.pt").stat().st_mtime_ns == mtime


def test_compare_resumes_an_interrupted_model(tmp_path):
    out = tmp_path / "cmp"
    shared = {"data": "synthetic:96", **FAST}
    compare(["cnn2x32"], shared, out, log=lambda m: None, progress=False, report=False)
    (out / "runs" / "cnn2x32" / "DONE").unlink()  # as if killed after its last checkpoint
    logs = []
    compare(["cnn2x32"], shared, out, log=logs.append, progress=False, report=False)
    assert any("resuming" in m for m in logs)


def test_compare_refuses_another_protocol_in_same_folder(tmp_path, capsys):
    out = tmp_path / "cmp"
    compare(["cnn2x32"], {"data": "synthetic:80", **FAST}, out, log=lambda m: None, progress=False,
            report=False)
    code = main(["compare", "--data", "synthetic:80", "--models", "cnn2x32", "--out", str(out),
                 "--image-size", "48", "--epochs", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "another protocol" in err[-1] and "image_size" in err[-1]


def test_a_wrong_data_path_writes_nothing_and_deletes_nothing(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--data", str(tmp_path / "no-such-dir"), "--models", "cnn2x32", "--out", str(out)])
    assert code == 2 and "does not exist" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()  # so the corrected command is not refused as "another protocol"
    compare(["cnn2x32"], {"data": "synthetic:80", **FAST}, out, log=lambda m: None, progress=False,
            report=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code = main(["compare", "--data", str(tmp_path / "no-such-dir"), "--models", "cnn2x32", "--out", str(out),
                 "--overwrite"])
    assert code == 2
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # --overwrite deleted nothing


def test_compare_adds_a_model_to_a_finished_comparison(tmp_path):
    out = tmp_path / "cmp"
    shared = {"data": "synthetic:80", **FAST}
    compare(["cnn2x32"], shared, out, log=lambda m: None, progress=False, report=False)
    mtime = (out / "runs" / "cnn2x32" / "best.pt").stat().st_mtime_ns
    logs = []
    res = compare(["cnn2x32", "cnn4x32"], shared, out, log=logs.append, progress=False, report=False)
    assert [r["model"] for r in res["models"]] == ["cnn2x32", "cnn4x32"]
    assert any("cnn2x32: already finished, kept" in m for m in logs)
    assert (out / "runs" / "cnn2x32" / "best.pt").stat().st_mtime_ns == mtime
    # a changed override of a model already in the folder is another protocol
    with pytest.raises(Exception, match="overrides of cnn2x32"):
        compare(["cnn2x32"], shared, out, {"cnn2x32": {"lr": 0.01}}, log=lambda m: None, progress=False,
                report=False)


def test_protocol_yaml_models_overrides_and_errors(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("epochs: 3\nmodels: [cnn2x32, vgg3]\noverrides:\n  vgg3: {lr: 0.001}\n")
    shared, models, overrides = load_protocol(str(f))
    assert shared == {"epochs": 3} and models == ["cnn2x32", "vgg3"] and overrides == {"vgg3": {"lr": 0.001}}
    f.write_text("models: [cnn2x32, nope]\n")
    with pytest.raises(Exception, match="unknown model"):
        load_protocol(str(f))
    with pytest.raises(Exception, match="unknown preset"):
        load_protocol(None, "no-such-preset")


def test_every_shipped_preset_is_a_valid_protocol(capsys):
    from bloodcell.config import TrainConfig, make_config
    from bloodcell.studies.compare import list_presets

    names = list_presets()
    assert {"demo", "best", "pbc"} <= set(names)
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in names:
        shared, models, overrides = load_protocol(None, name)
        shared.pop("ensemble", None)  # compare's own switch, not a training key
        make_config(TrainConfig, shared)  # raises on an unknown key or a bad value
        assert models, name
        for m, ov in overrides.items():
            assert m in models, f"preset {name}: overrides name {m}, which it does not compare"
            make_config(TrainConfig, shared, ov)
        assert f"{name} (" in help_text, f"compare --help does not name preset {name}"


@pytest.mark.slow
def test_ensemble_row_averages_saved_probabilities(tmp_path):
    import numpy as np

    from bloodcell.runfiles import read_predictions

    out = tmp_path / "cmp"
    res = compare(["cnn2x32", "cnn4x32"], {"data": "synthetic:96", **FAST}, out, log=lambda m: None,
                  progress=False, report=True, ensemble=True)
    rows = {r["model"]: r for r in res["models"]}
    assert rows["ensemble"]["members"] == ["cnn2x32", "cnn4x32"]
    classes = res["dataset"]["classes"]
    a, labels, _ = read_predictions(out / "runs" / "cnn2x32" / "predictions_test.csv", classes)
    b, _, _ = read_predictions(out / "runs" / "cnn4x32" / "predictions_test.csv", classes)
    expect = float(((a + b).argmax(1) == labels).mean())
    assert rows["ensemble"]["test"]["accuracy"] == expect
    assert np.isfinite(rows["ensemble"]["test"]["loss"])
    assert "ensemble" in (out / "report.html").read_text()


@pytest.mark.slow
def test_one_architecture_twice_under_labels(tmp_path, capsys):
    """NAME@LABEL: the same architecture again, with its own overrides, run folder and row."""
    out = tmp_path / "cmp"
    f = tmp_path / "p.yaml"
    f.write_text("models: [cnn2x32, cnn2x32@short]\noverrides:\n  cnn2x32@short: {epochs: 1}\n")
    code = main(["compare", "--data", "synthetic:96", "--config", str(f), "--out", str(out), "--image-size", "32",
                 "--epochs", "2", "--batch-size", "16", "--threads", "1", "--quiet", "--ensemble"])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in res["models"]}
    assert list(rows) == ["cnn2x32", "cnn2x32@short", "ensemble"]
    assert rows["cnn2x32"]["epochs_run"] == 2 and rows["cnn2x32@short"]["epochs_run"] == 1
    assert rows["cnn2x32"]["params"] == rows["cnn2x32@short"]["params"]
    assert rows["cnn2x32@short"]["study"]["label"] == "Model 1"
    saved = load_yaml(out / "runs" / "cnn2x32@short" / "config.yaml")
    assert saved["model"] == "cnn2x32" and saved["epochs"] == 1
    assert rows["ensemble"]["members"] == ["cnn2x32", "cnn2x32@short"]
    for bad, why in (("cnn2x32@a/b", "bad label"), ("nope@x", "unknown model"), ("cnn2x32@x,cnn2x32@x", "twice")):
        capsys.readouterr()
        code = main(["compare", "--data", "synthetic:96", "--models", bad, "--out", str(tmp_path / "other")])
        assert code == 2 and why in capsys.readouterr().err, bad
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_compare_with_folds_reports_mean_and_sd_per_model(tmp_path):
    out = tmp_path / "cmp"
    res = compare(["cnn2x32"], {**FAST, "data": "synthetic:96", "epochs": 1, "precision": "fp32", "folds": 3},
                  out, log=lambda m: None, progress=False)
    row = res["models"][0]
    folds = json.loads((out / "runs" / "cnn2x32" / "folds.json").read_text())
    assert row["cv"] == folds["summary"] and row["folds"] == 3 and row["chosen_fold"] == folds["chosen"]
    assert row["run_dir"] == f"runs/cnn2x32/folds/{folds['chosen']}"  # curves and galleries: the chosen fold
    assert row["test"] == json.loads((out / row["run_dir"] / "metrics.json").read_text())["test"]
    acc = row["cv"]["test"]["accuracy"]
    assert acc["n"] == 3 and acc["sd"] >= 0
    import csv

    flat = next(csv.DictReader((out / "results.csv").open()))
    assert float(flat["cv_test_accuracy_mean"]) == pytest.approx(acc["mean"])
    assert float(flat["cv_test_accuracy_sd"]) == pytest.approx(acc["sd"])
    md = (out / "report.md").read_text()
    assert "### Cross-validation" in md and f"{100 * acc['mean']:.1f} % ± {100 * acc['sd']:.1f}" in md
    logs: list[str] = []  # the same command again keeps every fold
    compare(["cnn2x32"], {**FAST, "data": "synthetic:96", "epochs": 1, "precision": "fp32", "folds": 3},
            out, log=logs.append, progress=False, report=False)
    assert any("already finished" in m for m in logs) and not any("training" in m for m in logs)


def test_anylab_preset_trains_on_every_lab_given(tmp_path):
    """compare --preset anylab --data A --data B: one model on both labs, validation reported per lab;
    its run is what adapt starts from."""
    from test_lab_out import lab

    labs = [str(lab(tmp_path / "lab_a", ("alpha", "beta"), 0)), str(lab(tmp_path / "lab_b", ("alpha", "beta"), 20))]
    out = tmp_path / "c"
    assert main(["compare", "--preset", "anylab", "--data", labs[0], "--data", labs[1], "--epochs", "1",
                 "--image-size", "32", "--threads", "1", "--no-tta", "--no-report", "--quiet", "--out", str(out)]) == 0
    m = json.loads((out / "runs" / "cnn4x32" / "metrics.json").read_text())
    assert set(m["val"]["per_source"]) == set(labs)
    assert main(["adapt", str(out / "runs" / "cnn4x32"), "--data", labs[1], "--out", str(tmp_path / "a")]) == 0


@pytest.mark.slow
def test_pretrained_against_scratch_under_labels(tmp_path, torch_home):
    """resnet18 and resnet18@imagenet (pretrained: true): the row and results.csv name the weights,
    and the parameter count is of the architecture each trained (the ImageNet stem when pretrained)."""
    import csv

    from conftest import fill_torch_cache

    fill_torch_cache("resnet18")
    out = tmp_path / "cmp"
    f = tmp_path / "p.yaml"
    f.write_text("models: [resnet18, resnet18@imagenet]\noverrides:\n  resnet18@imagenet: {pretrained: true}\n")
    assert main(["compare", "--data", "synthetic:96", "--config", str(f), "--out", str(out), "--image-size", "32",
                 "--epochs", "1", "--batch-size", "16", "--threads", "1", "--quiet"]) == 0
    rows = {r["model"]: r for r in json.loads((out / "results.json").read_text())["models"]}
    assert rows["resnet18"]["pretrained"] is None
    assert rows["resnet18@imagenet"]["pretrained"] == "torchvision ResNet18_Weights.IMAGENET1K_V1"
    assert rows["resnet18@imagenet"]["params"] - rows["resnet18"]["params"] == 64 * 3 * (49 - 9)
    with open(out / "results.csv") as fh:
        assert [r["pretrained"] for r in csv.DictReader(fh)] == ["", "torchvision ResNet18_Weights.IMAGENET1K_V1"]


@pytest.mark.slow
def test_a_second_compare_on_one_folder_is_refused_not_mixed_in(tmp_path, capsys):
    """Two `compare` processes on one folder: the second gets one line while the first runs, and the
    folder ends as the first one's alone."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "cmp"
    args = ["compare", "--data", "synthetic:160", "--image-size", "32", "--epochs", "4", "--batch-size", "16",
            "--threads", "1", "--quiet", "--no-report", "--out", str(out)]
    src = str(Path(__file__).parent.parent / "src")
    first = subprocess.Popen([sys.executable, "-m", "bloodcell", *args, "--models", "cnn2x32"],
                             env={**os.environ, "PYTHONPATH": src}, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "compare.yaml").exists() and time.time() < deadline:  # written under the lock
        time.sleep(0.05)
    assert first.poll() is None, "the first compare ended before the second one started"
    capsys.readouterr()
    code = main([*args, "--models", "cnn2x32,cnn4x32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "in use by another bloodcell comparison" in err[0], err
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    rows = json.loads((out / "results.json").read_text())["models"]
    assert [r["model"] for r in rows] == ["cnn2x32"] and sorted(p.name for p in (out / "runs").iterdir()) == ["cnn2x32"]


def test_models_flag_narrows_a_presets_overrides_and_a_stray_override_is_still_said(tmp_path, monkeypatch, capsys):
    import bloodcell.studies.compare as studies

    seen = {}
    monkeypatch.setattr(studies, "compare", lambda models, shared, out, overrides, **kw: seen.update(
        models=models, overrides=overrides) or {})
    assert main(["compare", "--models", "cnn2x32", "--out", str(tmp_path / "a")]) == 0  # demo: overrides resnet18
    assert seen == {"models": ["cnn2x32"], "overrides": {}}
    assert main(["compare", "--models", "resnet18", "--out", str(tmp_path / "b")]) == 0
    assert seen["overrides"] == {"resnet18": {"stem": "imagenet"}}
    f = tmp_path / "p.yaml"
    f.write_text("data: synthetic:96\nmodels: [cnn2x32]\noverrides:\n  vgg3: {lr: 0.001}\n")
    monkeypatch.undo()
    assert main(["compare", "--config", str(f), "--models", "cnn2x32", "--out", str(tmp_path / "c")]) == 2
    assert "overrides name model 'vgg3'" in capsys.readouterr().err


def test_stem_chooses_resnet18s_first_layers_and_is_refused_elsewhere():
    import torch

    from bloodcell.config import TrainConfig, make_config
    from bloodcell.errors import BloodcellError
    from bloodcell.models.build import build_model

    def stem_stride(stem: str, size: int = 48) -> int:
        model, kw = build_model(make_config(TrainConfig, {"model": "resnet18", "image_size": size, "stem": stem}),
                                ["a", "b"])
        return model.conv1.stride[0] * (2 if isinstance(model.maxpool, torch.nn.MaxPool2d) else 1)

    assert stem_stride("auto") == 2 and stem_stride("small") == 2 and stem_stride("imagenet") == 4
    assert stem_stride("auto", 128) == 4 and stem_stride("small", 128) == 2
    with pytest.raises(BloodcellError, match="no choice of stem"):
        build_model(make_config(TrainConfig, {"model": "cnn4x32", "stem": "imagenet"}), ["a", "b"])
    with pytest.raises(BloodcellError, match="cannot start from --pretrained"):
        build_model(make_config(TrainConfig, {"model": "resnet18", "stem": "small", "pretrained": True}), ["a", "b"])
