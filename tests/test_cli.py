"""The command line: flags from the config, one clear line for bad input, an end-to-end run on real data."""

from __future__ import annotations

import json

import pytest

from bloodcell.cli import main
from bloodcell.config import TrainConfig, make_config


@pytest.mark.parametrize("args, needle", [
    (["--model", "nope"], "unknown model 'nope'; known: "),
    (["--image-size", "16"], "needs image_size >= 32"),
    (["--batch-size", "0"], "batch_size (--batch-size) must be in [1, 65536]; got 0"),
    (["--optimizer", "adam"], "optimizer must be one of"),
    (["--lr", "fast"], "lr must be float"),
])
def test_bad_train_flags_are_one_line(tmp_path, capsys, args, needle):
    code = main(["train", "--data", "synthetic:80", "--epochs", "1", "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_every_train_flag_says_what_it_does(capsys):
    from dataclasses import fields

    from bloodcell.config import CHOICES, FIELD_GROUPS

    for f in fields(TrainConfig):  # each field carries its help and its group
        assert f.metadata["group"] in FIELD_GROUPS, f.name
        assert f.name == "data" or len(f.metadata["help"]) > 5, f.name
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, allowed in CHOICES.items():  # the choices are shown, and each is accepted
        assert "{" + ",".join(allowed) + "}" in text, name
        for value in allowed:
            make_config(TrainConfig, {name: value})
    assert "cellfit: that square sized to the cell" in text
    # the flags are shown in their groups, in the groups' order
    at = [text.index(f"{g} options:") for g in FIELD_GROUPS]
    assert at == sorted(at)
    assert at[0] < text.index("--image-size IMAGE_SIZE") < at[1] < text.index("--stain-norm {") < at[2] \
        < text.index("--lr LR") < at[3] < text.index("--blur BLUR") < at[4] < text.index("--tta") < at[5]


@pytest.mark.realdata
@pytest.mark.slow
def test_cli_train_and_evaluate_on_real_subset(kaggle_subset, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", str(kaggle_subset), "--model", "cnn4x32", "--image-size", "32",
                 "--epochs", "2", "--batch-size", "16", "--out", str(out), "--quiet"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"val", "test", "test_simple"}
    assert metrics["test"]["n"] == 4 * 3 * 4 and metrics["test_simple"]["n"] == 12
    from bloodcell.data import discover_grouped

    cells = {it.group for it in discover_grouped(kaggle_subset).items if it.split == "test"}
    assert metrics["test"]["n_groups"] == len(cells) >= 4  # majority vote over each source cell
    lo, hi = metrics["test"]["group_accuracy_ci"]
    assert lo <= metrics["test"]["group_accuracy"] <= hi
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(kaggle_subset), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["test"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"])


@pytest.mark.realdata
def test_two_real_labs_as_one_data_set(other_labs, tmp_path, capsys):
    tecom, cv = other_labs / "tecom", other_labs / "cellavision"
    run = tmp_path / "run"
    assert main(["train", "--data", str(tecom), "--data", str(cv), "--model", "cnn2x32", "--image-size", "32",
                 "--epochs", "1", "--threads", "1", "--resize", "cell", "--quiet", "--out", str(run)]) == 0
    m = json.loads((run / "metrics.json").read_text())
    per = m["test"]["per_source"]
    assert list(per) == [str(tecom), str(cv)]
    assert sum(p["n"] for p in per.values()) == m["test"]["n"]
    splits = json.loads((run / "splits.json").read_text())
    for name in ("train", "val", "test"):  # each lab is split on its own: both are in every split
        assert any(p.startswith(str(tecom)) for p in splits[name])
        assert any(p.startswith(str(cv)) for p in splits[name])
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(cv), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # another data set than the two trained on: every one of its images, the same ones training split
    assert out["all"]["n"] == sum(p.startswith(str(cv)) for name in splits for p in splits[name])
