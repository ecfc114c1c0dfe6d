"""crossval: K folds under one folder, the test split fixed and choosing nothing, mean and sd."""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import TINY, quiet, tiny

from bloodcell.cli import main
from bloodcell.config import TrainConfig, make_config
from bloodcell.data.build import config_dataset
from bloodcell.errors import ConfigError
from bloodcell.studies.kfold import cross_validate
from bloodcell.training.evaluate import evaluate_checkpoint
from bloodcell.training.train import train


def test_three_folds_disjoint_validation_same_test_mean_and_sd(tmp_path):
    out = tmp_path / "cv"
    metrics = cross_validate(tiny(folds=3), out, log=quiet, progress=False)
    res = json.loads((out / "folds.json").read_text())
    assert res["folds"] == 3 and [f["fold"] for f in res["per_fold"]] == [0, 1, 2]
    splits = [json.loads((out / "folds" / str(k) / "splits.json").read_text()) for k in range(3)]
    vals = [set(s["val"]) for s in splits]
    assert not (vals[0] & vals[1] or vals[0] & vals[2] or vals[1] & vals[2])  # disjoint
    single = config_dataset(tiny())  # the one-split data: its train and val are what the folds pool
    pooled = set(single.splits["train"].paths) | set(single.splits["val"].paths)
    assert vals[0] | vals[1] | vals[2] == pooled
    for s in splits:
        assert s["test"] == single.splits["test"].paths  # the same test split in every fold
        assert set(s["train"]) == pooled - set(s["val"])
    accs = [json.loads((out / "folds" / str(k) / "metrics.json").read_text())["test"]["accuracy"] for k in range(3)]
    summary = res["summary"]["test"]["accuracy"]
    assert summary["values"] == accs
    assert summary["mean"] == pytest.approx(statistics.mean(accs))
    assert summary["sd"] == pytest.approx(statistics.stdev(accs))
    assert metrics["cv"] == res["summary"]
    # the fold chosen is the one with the best validation score on its own fold (test chose nothing)
    best_val = [json.loads((out / "folds" / str(k) / "metrics.json").read_text())["run"]["best_val_macro_f1"]
                for k in range(3)]
    assert res["chosen"] == best_val.index(max(best_val))
    oof = res["out_of_fold"]
    assert oof["n"] == len(pooled)

    # evaluate on the parent folder: the chosen fold's model, said so
    logs: list[str] = []
    again = evaluate_checkpoint(out, TINY["data"], log=logs.append)
    chosen = json.loads((out / "folds" / str(res["chosen"]) / "metrics.json").read_text())
    assert again["test"]["accuracy"] == chosen["test"]["accuracy"]

    # a fold folder is a plain run: its own config rebuilds its split
    fold1 = make_config(TrainConfig, json.loads(json.dumps(
        __import__("yaml").safe_load((out / "folds" / "1" / "config.yaml").read_text()))))
    assert fold1.fold == 1 and config_dataset(fold1).splits["val"].paths == splits[1]["val"]

    # a rerun keeps every finished fold
    logs = []
    cross_validate(tiny(folds=3), out, resume=True, log=logs.append, progress=False)
    assert any("already finished" in m for m in logs)


def test_interrupted_cross_validation_resumes_keeping_finished_folds(tmp_path):
    out = tmp_path / "cv"
    cross_validate(tiny(folds=2), out, log=quiet, progress=False)
    (out / "DONE").unlink()
    (out / "folds" / "1" / "DONE").unlink()  # as if killed after fold 1's last epoch
    logs: list[str] = []
    cross_validate(tiny(folds=2), out, resume=True, log=logs.append, progress=False)
    assert any("[fold 1/2] already finished, kept" in m for m in logs)
    assert any("[fold 2/2] resuming" in m for m in logs)
    assert (out / "DONE").exists()


def test_folds_refused_where_they_do_not_apply(tmp_path):
    with pytest.raises(ConfigError, match="give fold too"):
        train(tiny(folds=3), tmp_path / "a", log=quiet, progress=False)
    with pytest.raises(ConfigError, match="at least 2"):
        tiny(folds=1)
    with pytest.raises(ConfigError, match="fold needs folds"):
        tiny(fold=0)


def test_cli_train_folds_and_one_fold(tmp_path, capsys):
    flags = ["--data", TINY["data"], "--image-size", "32", "--batch-size", "16", "--epochs", "1",
             "--model", "cnn2x32", "--threads", "1", "--precision", "fp32", "--quiet"]
    assert main(["train", *flags, "--folds", "2", "--out", str(tmp_path / "cv")]) == 0
    assert (tmp_path / "cv" / "folds.json").is_file() and (tmp_path / "cv" / "folds" / "1" / "DONE").is_file()
    assert main(["train", *flags, "--folds", "2", "--fold", "1", "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "splits.json").read_text())
    assert one == json.loads((tmp_path / "cv" / "folds" / "1" / "splits.json").read_text())
    assert main(["train", "--resume", str(tmp_path / "cv")]) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(["train", *flags, "--folds", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "folds must be 0" in capsys.readouterr().err


@pytest.mark.realdata
@pytest.mark.slow
def test_five_folds_on_a_real_lab_keep_cells_apart(other_labs, tmp_path):
    cfg = make_config(TrainConfig, {**TINY, "data": str(other_labs / "tecom"), "folds": 5, "epochs": 1})
    out = tmp_path / "tecom"
    cross_validate(cfg, out, log=quiet, progress=False)
    res = json.loads((out / "folds.json").read_text())
    splits = [json.loads((out / "folds" / str(k) / "splits.json").read_text()) for k in range(5)]
    vals = [v for s in splits for v in s["val"]]
    assert len(vals) == len(set(vals))  # each non-test image validates once
    assert all(s["test"] == splits[0]["test"] for s in splits)
    assert res["summary"]["test"]["accuracy"]["n"] == 5 and res["out_of_fold"]["n"] == len(vals)
