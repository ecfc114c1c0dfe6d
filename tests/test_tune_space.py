"""The search space: the default, space files, their errors, grids."""

from __future__ import annotations

import pytest

optuna = pytest.importorskip("optuna")

from test_tune_study import DATA, write_space  # noqa: E402

from bloodcell.cli import main  # noqa: E402
from bloodcell.errors import ConfigError  # noqa: E402
from bloodcell.tune import Choice, Range, load_space, parse_grid  # noqa: E402


def test_default_space_is_the_issues():
    space = load_space()
    assert space["image_size"] == Choice((32, 48, 64, 96, 128))
    assert min(space["batch_size"].values) == 16 and max(space["batch_size"].values) == 256
    assert space["lr"].log and space["lr"].low < space["lr"].high
    for key in ("epochs", "weight_decay", "label_smoothing"):
        assert isinstance(space[key], Range)
    assert space["patience"] >= 1  # epochs with early stopping
    assert set(space["augment"].values) == {"none", "light", "strong"}
    assert space["norm"] == Choice(("batch", "none"))


def test_space_file_replaces_entries_and_fixes_values(tmp_path):
    f = write_space(tmp_path / "s.yaml", {"image_size": 64, "lr": {"low": 1e-3, "high": 1e-2},
                                          "epochs": {"low": 2, "high": 8, "step": 2}})
    space = load_space(f)
    assert space["image_size"] == 64  # fixed, no longer searched
    assert space["lr"] == Range(1e-3, 1e-2)
    assert space["epochs"] == Range(2, 8, step=2, integer=True)
    assert space["batch_size"] == load_space()["batch_size"]  # the rest stays
    assert "norm" not in load_space(model="resnet18")  # only the study's models have the option
    assert "norm" in load_space(model="cnn4x32")


@pytest.mark.parametrize("content,names", [
    ({"image_sise": {"choices": [32]}}, ["image_sise", "image_size"]),
    ({"lr": {"low": 0.1, "high": 0.01}}, ["lr", "empty range"]),
    ({"batch_size": {"choices": []}}, ["batch_size", "empty"]),
    ({"lr": {"lo": 0.1, "high": 1.0}}, ["lr", "'lo'"]),
    ({"augment": {"choices": ["none", "heavy"]}}, ["augment", "heavy"]),
    ({"weight_decay": {"low": 0.0, "high": 0.1, "log": True}}, ["weight_decay", "log"]),
    ({"seed": {"choices": [0, 1]}}, ["seed", "cannot be searched"]),
    ({"image_size": {"choices": [16, 32]}}, ["image_size", "16", "minimum"]),
    ({"model": "vgg3"}, ["model", "--model"]),
])
def test_bad_space_file_is_one_clear_error_line(tmp_path, capsys, content, names):
    f = write_space(tmp_path / "bad.yaml", content)
    with pytest.raises(ConfigError):
        load_space(f, model="cnn4x32")
    assert main(["tune", "--data", DATA, "--space", str(f), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bloodcell: error: space file")
    for name in names:
        assert name in err[0]
    assert not (tmp_path / "t").exists()  # nothing started


def test_parse_grid():
    assert parse_grid(["image_size=48,64,96", "batch_size=32,64,128"]) == {
        "image_size": [48, 64, 96], "batch_size": [32, 64, 128]}
    assert parse_grid(["augment=none,strong", "lr=0.001,3e-3"]) == {
        "augment": ["none", "strong"], "lr": [0.001, 0.003]}
    for bad, word in ((["image_size"], "KEY=V1"), (["image_size="], "empty"), (["batch=32"], "batch"),
                      (["image_size=48,big"], "big"), (["data=a,b"], "data")):
        with pytest.raises(ConfigError, match=word):
            parse_grid(bad)
