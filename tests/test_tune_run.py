"""tune(): a study with pruning, a grid, refused settings, the report command, a bad data path."""

from __future__ import annotations

import collections

import pytest
import yaml

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402
from test_tune_study import DATA, TINY, finished_trials  # noqa: E402

from bloodcell.cli import main  # noqa: E402
from bloodcell.config import TrainConfig, load_yaml, make_config  # noqa: E402
from bloodcell.errors import BloodcellError  # noqa: E402
from bloodcell.tune import read_settings, tune  # noqa: E402


class PruneOddTrials(optuna.pruners.BasePruner):
    """Prunes every odd-numbered trial at its first report: pruning made deterministic."""

    def prune(self, study, trial) -> bool:
        return trial.number % 2 == 1


@pytest.mark.slow
def test_four_trial_study_with_pruning(tmp_path, monkeypatch):
    import bloodcell.data.build as build_module

    loads = collections.Counter()
    real = build_module.load_sources

    def counting(path, image_size=64, **kw):
        loads[image_size] += 1
        return real(path, image_size=image_size, **kw)

    monkeypatch.setattr(build_module, "load_sources", counting)  # where config_dataset looks it up
    out = tmp_path / "study"
    space = {**TINY, "image_size": {"choices": [32, 40]}, "epochs": 2}
    s = tune(DATA, "cnn4x32", 4, out, space=space, pruner=PruneOddTrials(), base={"threads": 1},
             sampler_seed=0, log=lambda m: None)

    trials = optuna.load_study(study_name="bloodcell-cnn4x32", storage=f"sqlite:///{out}/study.db").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED] * 2
    assert (s["complete"], s["pruned"]) == (2, 2)
    for t in trials:  # every epoch reported; the pruned ones stopped after the first
        assert sorted(t.intermediate_values) == ([1, 2] if t.state == TrialState.COMPLETE else [1])
        run = out / "trials" / f"{t.number:04d}"
        assert (run / "DONE").exists() == (t.state == TrialState.COMPLETE)
        assert t.user_attrs["epochs_run"] == len(t.intermediate_values)
    # the test split never reaches a trial: nothing is evaluated on it, let alone chosen by it
    for run in (out / "trials").iterdir():
        assert not list(run.glob("predictions_test*.csv"))
        assert "test" not in yaml.safe_load((run / "splits.json").read_text())
    # one load per image size in the process, however many trials use it
    sizes = {t.params["image_size"] for t in trials}
    assert set(loads) == sizes and all(n == 1 for n in loads.values())

    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert s["best_trial"] == best.number and s["best_value"] == best.value
    cfg = make_config(TrainConfig, load_yaml(out / "best.yaml"))  # what `train --config` reads
    assert cfg.model == "cnn4x32" and cfg.data == DATA and cfg.epochs == 2 and cfg.threads == 1
    for k, v in best.params.items():
        assert getattr(cfg, k) == v
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4  # history, curves, image size, batch size
    assert "http://" not in page and "https://" not in page
    assert "Optimisation history" in page or "history" in page
    assert len((out / "trials.csv").read_text().strip().splitlines()) == 1 + 4


@pytest.mark.slow
def test_grid_runs_every_point_once(tmp_path):
    out = tmp_path / "grid"
    s = tune(DATA, "cnn4x32", None, out, space={"epochs": 1}, grid=["image_size=32,40", "batch_size=16,32"],
             pruner="none", base={"threads": 1}, log=lambda m: None)
    trials = finished_trials(f"sqlite:///{out}/study.db", "bloodcell-cnn4x32")
    assert s["trials"] == 4 and len(trials) == 4
    points = {(t.params["image_size"], t.params["batch_size"]) for t in trials}
    assert points == {(32, 16), (32, 32), (40, 16), (40, 32)}
    assert set(trials[0].params) == {"image_size", "batch_size"}  # nothing else varies
    cfg = make_config(TrainConfig, load_yaml(out / "best.yaml"))
    assert cfg.lr == TrainConfig.lr and cfg.epochs == 1


@pytest.mark.slow
def test_same_folder_other_settings_is_refused(tmp_path):
    out = tmp_path / "t"
    tune(DATA, "cnn4x32", 1, out, space={**TINY, "epochs": 1}, base={"threads": 1}, log=lambda m: None)
    with pytest.raises(BloodcellError, match="other settings.*space"):
        tune(DATA, "cnn4x32", 1, out, space={**TINY, "epochs": 2}, base={"threads": 1}, log=lambda m: None)
    assert read_settings(out).space["epochs"] == 1
    # a base key given at its default is the same study (a second worker with --seed 0 joins it)
    tune(DATA, "cnn4x32", 1, out, space={**TINY, "epochs": 1}, base={"threads": 1, "seed": 0},
         log=lambda m: None)
    with pytest.raises(BloodcellError, match="other settings.*seed"):
        tune(DATA, "cnn4x32", 1, out, space={**TINY, "epochs": 1}, base={"threads": 1, "seed": 1},
             log=lambda m: None)


@pytest.mark.slow
def test_tune_report_command_rebuilds_the_report(tmp_path, capsys):
    out = tmp_path / "t"
    tune(DATA, "cnn4x32", 2, out, space={**TINY, "epochs": 1}, base={"threads": 1}, log=lambda m: None)
    (out / "report.html").unlink()
    (out / "best.yaml").unlink()
    assert main(["tune", "report", str(out)]) == 0
    assert (out / "report.html").exists() and (out / "best.yaml").exists()
    assert main(["tune", "report", str(tmp_path / "nothing")]) == 2
    assert "holds no study" in capsys.readouterr().err


def test_bad_data_path_is_one_line_before_any_trial(tmp_path, capsys):
    from bloodcell.cli import main

    code = main(["tune", "--data", str(tmp_path / "nope"), "--model", "cnn4x32", "--trials", "1",
                 "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"bloodcell: error: data path does not exist: {tmp_path / 'nope'}"]
