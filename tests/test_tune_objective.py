"""One trial's data: loaded once per image size, decoded once for all the processes of a study."""

from __future__ import annotations

import collections

import pytest

optuna = pytest.importorskip("optuna")

from test_tune_study import TINY, finished_trials  # noqa: E402

from bloodcell.tune import tune  # noqa: E402


@pytest.mark.slow
def test_no_image_is_decoded_twice(class_folders, tmp_path, monkeypatch):
    import bloodcell.data.cache as cache

    decoded = collections.Counter()
    real = cache.load_image

    def counting(path, size, resize="squash"):
        decoded[path, size] += 1
        return real(path, size, resize)

    monkeypatch.setattr(cache, "load_image", counting)
    out = tmp_path / "t"
    space = {**TINY, "image_size": {"choices": [32, 40]}, "epochs": 1}
    kw = {"space": space, "base": {"threads": 1}, "sampler_seed": 1, "report": False, "log": lambda m: None}
    tune(str(class_folders), "cnn4x32", 2, out, **kw)
    tune(str(class_folders), "cnn4x32", 4, out, **kw)  # a second run: a fresh process's view
    images = len(list(class_folders.rglob("*.*")))
    sizes = {size for _, size in decoded}
    assert len(finished_trials(f"sqlite:///{out}/study.db", "bloodcell-cnn4x32")) == 4
    assert max(decoded.values()) == 1 and len(decoded) == images * len(sizes)


def lab(root, classes, shift, n=8):
    from conftest import write_image

    for c, cls in enumerate(classes):
        for i in range(n):
            write_image(root / cls / f"{cls}_{i}.png", color=(70 * c + shift, 60, 210 - 50 * c),
                        seed=shift * 1000 + c * 100 + i)
    return str(root)


@pytest.mark.slow
def test_lab_out_scores_each_lab_on_a_model_that_never_saw_it(tmp_path):
    """--select lab-out: per lab, a model trained on the others, scored on that lab's train and val
    images (never its test split); the trial's value is their mean; the classes are the shared ones."""
    import json

    from bloodcell.training.evaluate import evaluate_checkpoint
    from bloodcell.tune.study import read_settings

    labs = [lab(tmp_path / "lab_a", ("alpha", "beta", "gamma"), 0),
            lab(tmp_path / "lab_b", ("ALPHA", "Beta"), 15),
            lab(tmp_path / "lab_c", ("alpha", "beta", "delta"), 30)]
    out = tmp_path / "t"
    logs: list[str] = []
    res = tune(labs, "cnn2x32", 2, out, grid=["lr=0.003,0.01"], select="lab-out",
               space={"image_size": 32, "epochs": 2, "batch_size": 16, "patience": 0},
               base={"threads": 1, "precision": "fp32"}, log=logs.append)
    settings = read_settings(out)
    assert settings.select == "lab-out" and settings.pruner == "none"
    assert settings.base["classes"] == ["alpha", "beta"]
    assert any("no median pruning" in m for m in logs)
    study = optuna.load_study(study_name="bloodcell-cnn2x32", storage=f"sqlite:///{out}/study.db")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2 and res["best_value"] == max(t.value for t in done)
    for t in done:
        per = t.user_attrs["lab_out"]
        assert list(per) == ["lab_a", "lab_b", "lab_c"]
        assert t.value == pytest.approx(sum(per.values()) / 3)
        for src in labs:
            name = src.rsplit("/", 1)[1]
            run = out / "trials" / f"{t.number:04d}" / f"out-{name}"
            files = [p for s in json.loads((run / "splits.json").read_text()).values() for p in s]
            assert files and not any(p.startswith(src) for p in files)  # never trained or validated on
            again = evaluate_checkpoint(run, src, split="train+val", log=lambda m: None)["train+val"]
            assert again["macro_f1"] == pytest.approx(per[name])
            test = evaluate_checkpoint(run, src, split="test", log=lambda m: None)["test"]
            assert again["n"] + test["n"] == 16  # the lab's images of the shared classes, test left out
    assert "left-out-lab macro_f1" in " ".join(logs)
    page = (out / "report.html").read_text()
    assert "left-out-lab</strong> macro_f1" in page and "left out: lab_a" in page
    assert "No curve per epoch: with --select lab-out" in page  # not an empty figure


def test_lab_out_needs_two_labs(tmp_path, capsys):
    from bloodcell.cli import main
    from bloodcell.errors import ConfigError

    code = main(["tune", "--data", "synthetic:64", "--select", "lab-out", "--out", str(tmp_path / "t")])
    assert code == 2 and "--select lab-out needs two or more labs: give --data once for each" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()  # refused before anything is written
    twins = [lab(tmp_path / side / "lab", ("alpha", "beta"), 0, n=2) for side in ("x", "y")]
    with pytest.raises(ConfigError, match="two labs have the same folder name"):
        tune(twins, "cnn2x32", 1, tmp_path / "t", select="lab-out", report=False, log=lambda m: None)
    with pytest.raises(ConfigError, match="select must be one of"):
        tune("synthetic:64", "cnn2x32", 1, tmp_path / "t", select="test", report=False,
             log=lambda m: None)
