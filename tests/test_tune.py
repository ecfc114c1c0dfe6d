"""Tuning: space files, grids, pruning, the never-test rule, resume, and several workers on one study."""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy.exc
import yaml

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

from bloodcell.cli import main  # noqa: E402
from bloodcell.config import TrainConfig, load_yaml, make_config  # noqa: E402
from bloodcell.errors import BloodcellError, ConfigError  # noqa: E402
from bloodcell.tune import Choice, Range, load_space, parse_grid, read_settings, tune  # noqa: E402

DATA = "synthetic:120"
# A tiny space: one or two small image sizes, one or two epochs, one thread per worker.
TINY = {"image_size": {"choices": [32]}, "batch_size": {"choices": [16, 32]},
        "epochs": {"low": 1, "high": 2}, "patience": 0}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def write_space(path: Path, space: dict) -> Path:
    path.write_text(yaml.safe_dump(space))
    return path


def finished_trials(storage: str, study: str) -> list:
    s = optuna.load_study(study_name=study, storage=storage)
    return [t for t in s.get_trials(deepcopy=False, states=FINISHED) if not t.user_attrs.get("surplus")]


def cli(*args: str, **kw) -> subprocess.Popen:
    """`bloodcell ...` in a child process (its own Python, like a worker on another machine)."""
    return subprocess.Popen([sys.executable, "-m", "bloodcell.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            **kw)


def run_numbers(log: str) -> list[int]:
    """Trial numbers a worker's log says it ran to the end (completed or pruned)."""
    return [int(n) for n in re.findall(r"^trial +(\d+) +(?:val|pruned|diverged)", log, re.M)]


# ---------------------------------------------------------------------------------------------
# space and grid


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


# ---------------------------------------------------------------------------------------------
# one study, in process


class PruneOddTrials(optuna.pruners.BasePruner):
    """Prunes every odd-numbered trial at its first report: pruning made deterministic."""

    def prune(self, study, trial) -> bool:
        return trial.number % 2 == 1


def test_four_trial_study_with_pruning(tmp_path, monkeypatch):
    import bloodcell.train as train_module

    loads = collections.Counter()
    real = train_module.load_dataset

    def counting(path, image_size=64, **kw):
        loads[image_size] += 1
        return real(path, image_size=image_size, **kw)

    monkeypatch.setattr(train_module, "load_dataset", counting)  # where config_dataset looks it up
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


def test_same_folder_other_settings_is_refused(tmp_path):
    out = tmp_path / "t"
    tune(DATA, "cnn4x32", 1, out, space={**TINY, "epochs": 1}, base={"threads": 1}, log=lambda m: None)
    with pytest.raises(BloodcellError, match="other settings.*space"):
        tune(DATA, "cnn4x32", 1, out, space={**TINY, "epochs": 2}, base={"threads": 1}, log=lambda m: None)
    assert read_settings(out).space["epochs"] == 1


# ---------------------------------------------------------------------------------------------
# processes: interrupt and resume, two workers on one study


def test_ctrl_c_in_a_storage_write_lets_the_write_finish(tmp_path, monkeypatch, terminal_sigint, caplog):
    """A SIGINT landing inside a database write (here, the report of a trial's epoch) waits for the
    write to end; training stops at its next batch and the trial is marked failed for a resume."""
    from optuna.storages import RDBStorage

    writing = RDBStorage.set_trial_intermediate_value

    def interrupted_write(self, trial_id, step, value):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, mid-write
        return writing(self, trial_id, step, value)

    monkeypatch.setattr(RDBStorage, "set_trial_intermediate_value", interrupted_write)
    out = tmp_path / "t"
    with pytest.raises(KeyboardInterrupt):
        tune(DATA, "cnn4x32", 2, out, space={**TINY, "epochs": 2}, base={"threads": 1},
             pruner="none", log=lambda m: None)
    (trial,) = optuna.load_study(study_name="bloodcell-cnn4x32", storage=f"sqlite:///{out}/study.db").trials
    assert trial.intermediate_values == {1: trial.intermediate_values[1]}  # written, then stopped
    assert trial.state == TrialState.FAIL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not [r for r in caplog.records if "failed" in r.getMessage()]  # no traceback for a Ctrl-C


@pytest.mark.slow
def test_interrupt_and_resume_loses_no_finished_trial(tmp_path):
    out, n = tmp_path / "study", 8  # enough trials that the interrupt lands before the last one
    space = write_space(tmp_path / "space.yaml", {**TINY, "epochs": 2})
    storage = f"sqlite:///{out}/study.db"
    # SIGINT at its default, as in a terminal: a test run started in the background (`cmd &` in a
    # script, nohup) hands its children SIGINT ignored, and then Ctrl-C rightly does nothing.
    p = cli("tune", "--data", DATA, "--trials", str(n), "--space", str(space), "--out", str(out),
            "--threads", "1", "--pruner", "none",
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if (out / "study.db").exists():
            try:
                if len(finished_trials(storage, "bloodcell-cnn4x32")) >= 2:
                    break
            except (KeyError, optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError):
                pass  # the study (or its tables, which this poll may race to create) is being created
    p.send_signal(signal.SIGINT)
    log = p.communicate(timeout=60)[0]
    assert p.returncode == 130, log
    assert "--resume" in log
    before = {t.number: (t.state, t.value, t.params) for t in finished_trials(storage, "bloodcell-cnn4x32")}
    assert 2 <= len(before) < n

    r = subprocess.run([sys.executable, "-m", "bloodcell.cli", "tune", "--resume", str(out), "--no-report"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    after = {t.number: (t.state, t.value, t.params) for t in finished_trials(storage, "bloodcell-cnn4x32")}
    assert len(after) == n
    assert all(after[k] == v for k, v in before.items())  # every finished trial kept as it was
    assert (out / "best.yaml").exists()


def check_workers(procs, storage: str, study: str, n: int) -> None:
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log
    trials = finished_trials(storage, study)
    assert len(trials) == n  # n in all: none lost, none extra
    ran = [run_numbers(log) for log in logs]
    assert all(ran), f"each worker should have run trials: {ran}"
    assert sorted(ran[0] + ran[1]) == sorted(t.number for t in trials)  # none run twice
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == n  # the workers drew different trials
    s = optuna.load_study(study_name=study, storage=storage)
    assert not [t for t in s.trials if t.state == TrialState.FAIL and not t.user_attrs.get("surplus")]


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(tmp_path):
    out, n = tmp_path / "study", 6
    space = write_space(tmp_path / "space.yaml", TINY)
    args = ("tune", "--data", DATA, "--trials", str(n), "--space", str(space), "--out", str(out),
            "--threads", "1", "--no-report")
    procs = [cli(*args), cli(*args)]  # the same command twice: the second joins the first
    check_workers(procs, f"sqlite:///{out}/study.db", "bloodcell-cnn4x32", n)


@pytest.mark.slow
def test_two_workers_share_one_postgres_study(tmp_path):
    url = os.environ.get("BLOODCELL_TEST_POSTGRES")
    if not url:
        pytest.skip("BLOODCELL_TEST_POSTGRES is not set (.ci/postgres.sh starts a server)")
    study, n = f"test-{uuid.uuid4().hex[:12]}", 6
    space = write_space(tmp_path / "space.yaml", TINY)
    procs = [cli("tune", "--data", DATA, "--trials", str(n), "--space", str(space), "--out",
                 str(tmp_path / f"machine{i}"), "--storage", url, "--study", study, "--threads", "1", "--no-report")
             for i in range(2)]
    try:
        check_workers(procs, url, study, n)
    finally:
        optuna.delete_study(study_name=study, storage=url)


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


@pytest.mark.parametrize("name", ["median", "hyperband"])
def test_pruners_wait_for_the_end_of_the_warm_up(name):
    from bloodcell.tune import PRUNE_FROM_EPOCH, _make_pruner

    study = optuna.create_study(direction="maximize", pruner=_make_pruner(name, 9),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(6):  # good trials: 0.9 at every epoch
        t = study.ask()
        for epoch in range(1, 10):
            t.report(0.9, epoch)
        study.tell(t, 0.9)
    bad = study.ask()
    pruned_at = None
    for epoch in range(1, 10):
        bad.report(0.1, epoch)
        if bad.should_prune():
            pruned_at = epoch
            break
    assert PRUNE_FROM_EPOCH == 2
    if name == "median":  # pruned as soon as allowed: not inside the first (warm-up) epoch, not later
        assert pruned_at == PRUNE_FROM_EPOCH
    else:  # Hyperband's rungs start at PRUNE_FROM_EPOCH (a trial's bracket may start later)
        assert pruned_at is None or pruned_at >= PRUNE_FROM_EPOCH
