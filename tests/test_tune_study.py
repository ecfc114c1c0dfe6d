"""Optuna plumbing: pruners, Ctrl-C inside a storage write, interrupt and resume, several workers on
one study. Also the helpers the other tune tests share (a tiny space, the finished trials)."""

from __future__ import annotations

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

from bloodcell.config import PRUNE_FROM_EPOCH  # noqa: E402
from bloodcell.tune import tune  # noqa: E402
from bloodcell.tune.study import make_pruner  # noqa: E402

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


@pytest.mark.slow
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


@pytest.mark.parametrize("name", ["median", "hyperband"])
def test_pruners_wait_for_the_end_of_the_warm_up(name):
    study = optuna.create_study(direction="maximize", pruner=make_pruner(name, 9),
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


def test_a_trial_whose_local_worker_is_gone_is_failed_at_once(tmp_path):
    """A SIGKILLed worker's RUNNING trial is failed (and so retried) by the next run on this machine,
    not counted as running for STALE_AFTER_S; a live worker's trial is left alone."""
    import socket

    import optuna

    from bloodcell.tune.study import fail_dead_workers

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    gone, alive = study.ask(), study.ask()
    gone.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    alive.set_user_attr("worker", f"{socket.gethostname()}:{os.getppid()}")
    lines: list[str] = []
    fail_dead_workers(study, lines.append)
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {gone.number: TrialState.FAIL, alive.number: TrialState.RUNNING}
    assert len(lines) == 1 and str(dead.pid) in lines[0]


@pytest.mark.parametrize("points", [[0.01, 0.03], [0.01, 0.03, 0.1]])
def test_a_failed_grid_trial_reruns_its_grid_point_and_the_grid_finishes(points):
    """A grid trial killed mid-run is retried on its own grid point, and the rerun covers the
    whole grid once. Retried through optuna's enqueue_trial, it lost its grid point and
    GridSampler.after_trial raised KeyError('grid_id') with one point left (a kill campaign run)."""
    from bloodcell.config import TuneSettings
    from bloodcell.tune.study import make_sampler, retry_interrupted

    settings = TuneSettings(data=DATA, model="cnn2x32", trials=len(points), timeout_min=None, space={},
                            grid={"lr": points}, storage=None, study=None, metric="macro_f1",
                            pruner="none", base={}, sampler_seed=0)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(settings))
    killed = study.ask()
    killed.suggest_float("lr", min(points), max(points))
    study.tell(killed, state=TrialState.FAIL)
    lines: list[str] = []
    retry_interrupted(study, lines.append)
    assert len(lines) == 1
    study.optimize(lambda t: t.suggest_float("lr", min(points), max(points)))
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["lr"] for t in done) == points
    assert done[0].params == killed.params and done[0].user_attrs["retry_of"] == killed.number


def test_an_untagged_trial_of_a_dead_worker_is_failed_and_a_live_ones_is_left():
    """A worker killed between optuna creating a trial and the objective naming its worker leaves a
    RUNNING trial with no worker and no heartbeat, which optuna would count as running for ever."""
    import datetime
    import socket

    from bloodcell.tune.study import WORKER_ATTR, fail_dead_workers

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    before = (datetime.datetime.now() - datetime.timedelta(seconds=5)).isoformat()
    study = optuna.create_study(direction="maximize")
    study.set_user_attr(f"{WORKER_ATTR}{host}:{dead.pid}", before)
    orphan = study.ask()
    study.set_user_attr(f"{WORKER_ATTR}{host}:{os.getppid()}", datetime.datetime.now().isoformat())
    maybe_alive = study.ask()  # a live worker registered before it: it may be that worker's
    lines: list[str] = []
    fail_dead_workers(study, lines.append)
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {orphan.number: TrialState.FAIL, maybe_alive.number: TrialState.RUNNING}
    assert len(lines) == 1 and f"trial {orphan.number}" in lines[0]


@pytest.mark.slow
def test_a_study_killed_as_a_trial_was_created_reruns_to_its_end(tmp_path):
    """End to end, the kill campaign's case: the killed worker's untagged grid trial is failed on
    the rerun, its grid point run again, and the study ends with both grid points done."""
    child = f"""
import os
from pathlib import Path
from bloodcell.tune.run import new_settings
from bloodcell.tune.study import open_study, register_worker, write_settings
out = Path({str(tmp_path / 'study')!r}); out.mkdir()
s = new_settings({DATA!r}, "cnn2x32", None, timeout_min=None, space=None, grid=["lr=0.01,0.03"],
                 storage=None, study_name=None, metric="macro_f1", pruner="none",
                 base={{"image_size": 32, "batch_size": 16, "threads": 1, "epochs": 1}}, sampler_seed=0)
study = open_study(s, out)
write_settings(s, out)
register_worker(study)
study.ask()
os._exit(0)  # as a SIGKILL would: the trial exists, its objective never ran
"""
    subprocess.run([sys.executable, "-c", child], check=True)
    res = tune(out=tmp_path / "study", resume=True, report=False, log=lambda m: None)
    assert (res["complete"], res["running"], res["failed"]) == (2, 0, 1), res
    lrs = sorted(t.params["lr"] for t in finished_trials(f"sqlite:///{tmp_path / 'study' / 'study.db'}",
                                                        "bloodcell-cnn2x32"))
    assert lrs == [0.01, 0.03]
