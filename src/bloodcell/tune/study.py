"""Optuna plumbing: the storage (heartbeats, retries), the sampler and pruner, opening or joining a
study, the settings file, recovery after a crash or Ctrl-C, and the plain data the report shows.

A study lives in a storage (by default ``DIR/study.db``, SQLite); every process that opens the same
storage and study name is one more worker. Its settings are saved as ``DIR/tune.yaml`` and in the
study itself, so two workers with different settings cannot share it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import time
import warnings
from pathlib import Path

import optuna
from optuna import storages
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from bloodcell.config import PRUNE_FROM_EPOCH, TrainConfig, TuneSettings, load_yaml
from bloodcell.errors import BloodcellError, ConfigError
from bloodcell.runfiles import write_yaml
from bloodcell.runtime import pid_alive

SETTINGS_FILE = "tune.yaml"
STALE_AFTER_S = 120  # a running trial without a heartbeat for this long is failed and retried


# --- settings: what a study is, saved as DIR/tune.yaml and in the study itself -----------------


def masked(url: str) -> str:
    """A storage URL with any password hidden (for logs and reports)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is shown as given
        return url


def read_settings(out: str | Path) -> TuneSettings:
    """DIR/tune.yaml as TuneSettings; a folder without one is an error."""
    p = Path(out) / SETTINGS_FILE
    if not p.is_file():
        raise BloodcellError(f"{out} holds no study ({SETTINGS_FILE} not found)")
    data = load_yaml(p)
    known = {f.name for f in dataclasses.fields(TuneSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{p}: unknown key {unknown[0]!r}")
    return TuneSettings(**data)


def write_settings(settings: TuneSettings, out: Path) -> None:
    """DIR/tune.yaml, which `bloodcell tune --resume DIR` reads back."""
    write_yaml(out / SETTINGS_FILE, dataclasses.asdict(settings))


def differences(a: dict, b: dict) -> list[str]:
    """'key: A here, B there' for every key where two settings differ."""
    return [f"{k}: {a.get(k)!r} here, {b.get(k)!r} there" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


# --- optuna: logging, storage, sampler, pruner, study -------------------------------------------


class SurplusTrial(Exception):
    """Raised in a trial created after the study already had its number of trials."""


_hushed = {"trial": None}  # the trial whose second failure record is still to come


def _no_bookkeeping_records(record) -> bool:
    """Drop optuna's two failure records (the first with a traceback) for a surplus trial (see
    objective.make_objective) or a trial stopped by Ctrl-C: neither is a failure worth reporting."""
    msg = record.getMessage()
    if not msg.startswith("Trial ") or " failed with " not in msg:
        return True
    number = msg.split()[1]
    if SurplusTrial.__name__ in msg or "KeyboardInterrupt" in msg or "Interrupted(" in msg:
        _hushed["trial"] = number
        return False
    if number == _hushed["trial"] and " failed with value " in msg:
        _hushed["trial"] = None
        return False
    return True


def quiet_optuna() -> None:
    """Optuna's warnings only, without its experimental-feature notes or bookkeeping failures."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna.study._optimize").addFilter(_no_bookkeeping_records)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def open_storage(url: str):
    """An RDB storage with heartbeats: a worker that dies has its trial failed and retried."""
    quiet_optuna()
    if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9
        retry = {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
    else:
        retry = {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=1)}
    # SQLite: wait for the file lock instead of failing when another worker writes.
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    last = None
    for attempt in range(6):  # workers starting together race to create the tables
        try:
            return storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=20,
                                       grace_period=STALE_AFTER_S, **retry)
        except (optuna.exceptions.StorageInternalError, Exception) as e:  # noqa: BLE001
            if isinstance(e, ModuleNotFoundError):
                raise BloodcellError(f"storage {masked(url)}: the database driver is missing "
                                     f"({e.name}); install it (e.g. psycopg2-binary)") from e
            last = e
            time.sleep(0.5 + attempt)
    raise BloodcellError(f"cannot open storage {masked(url)}: {str(last).splitlines()[0]}")


def make_pruner(name: str, max_epochs: int):
    """The named pruner (median, hyperband, none), pruning from epoch PRUNE_FROM_EPOCH on."""
    quiet_optuna()
    if name == "median":
        # Optuna prunes once a trial's step >= n_warmup_steps; steps are 1-based epochs here.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=PRUNE_FROM_EPOCH)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=PRUNE_FROM_EPOCH,
                                              max_resource=max(max_epochs, PRUNE_FROM_EPOCH + 1),
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def make_sampler(settings: TuneSettings):
    """The grid's sampler, or TPE."""
    quiet_optuna()
    if settings.grid:
        return optuna.samplers.GridSampler(settings.grid, seed=settings.sampler_seed)
    # constant_liar: workers running at once see each other's running trials and spread out.
    return optuna.samplers.TPESampler(n_startup_trials=min(10, max(4, settings.trials // 3)),
                                      multivariate=True, constant_liar=True, seed=settings.sampler_seed)


def open_study(settings: TuneSettings, out: Path, pruner=None):
    """Create or join the study; a study made with other settings is an error naming them."""
    quiet_optuna()
    storage = open_storage(settings.storage_url(out))
    space = settings.space
    max_epochs = space["epochs"]["high"] if isinstance(space.get("epochs"), dict) \
        else int(space.get("epochs", settings.base.get("epochs", TrainConfig.epochs)))
    if pruner is None:
        pruner = make_pruner(settings.pruner, max_epochs)
    last = None
    for attempt in range(6):
        try:
            study = optuna.create_study(storage=storage, study_name=settings.study_name(),
                                        direction="maximize", load_if_exists=True,
                                        sampler=make_sampler(settings), pruner=pruner)
            break
        except Exception as e:  # noqa: BLE001 - two workers creating one study at once
            last = e
            time.sleep(0.5 + attempt)
    else:
        raise BloodcellError(f"cannot open study {settings.study_name()!r}: {str(last).splitlines()[0]}")
    mine = json.loads(json.dumps(settings.identity()))
    mine.pop("data")  # the same data may sit at another path on another machine
    mine.pop("storage")
    theirs = study.user_attrs.get("bloodcell")
    if theirs is None:
        study.set_user_attr("bloodcell", mine)
    elif theirs != mine:
        raise BloodcellError(f"study {settings.study_name()!r} in {masked(settings.storage_url(out))} was "
                             f"started with other settings ({'; '.join(differences(mine, theirs))}); "
                             "give another --study or the same settings")
    return study


def counts(study) -> dict:
    """Trials per TrialState, surplus placeholders left out."""
    c = {s: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        if not t.user_attrs.get("surplus"):
            c[t.state] += 1
    return c


# --- recovery: a crash, a Ctrl-C -----------------------------------------------------------------


def worker_id() -> str:
    """This process, as a trial records it: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_own_running(study, started) -> None:
    """After Ctrl-C, mark this process's trials that are still RUNNING as failed, so a resume reruns
    them at once instead of counting them as running elsewhere until their heartbeat goes stale.

    An interrupt between optuna creating a trial and our objective tagging it leaves an untagged
    trial; one created after this process started optimising is taken to be ours.
    """
    me = worker_id()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("worker")
        if owner == me or (owner is None and t.datetime_start and t.datetime_start >= started):
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


WORKER_ATTR = "worker "  # a study user attribute per process that ran it: "worker HOST:PID" -> start


def register_worker(study) -> None:
    """Record this process on the study before it runs a trial, so that a trial it leaves untagged
    (killed between optuna creating it and the objective naming its worker) can be traced to it."""
    study.set_user_attr(WORKER_ATTR + worker_id(), datetime.datetime.now().isoformat())


def _local_and_dead(owner: str) -> bool:
    name, _, pid = owner.rpartition(":")
    return (name == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid()
            and not pid_alive(int(pid)))


def fail_dead_workers(study, log) -> None:
    """Mark RUNNING trials whose worker was a process on this machine that no longer exists (a
    SIGKILL, a crash, a power cut) as failed now, so this run retries them at once instead of
    counting them as running until their heartbeat goes stale (STALE_AFTER_S).

    A trial its worker never tagged (killed within the milliseconds between optuna creating it
    and the objective's first line) has no heartbeat either, so optuna would count it as running
    for ever. It is failed when every worker registered before it started is a dead local process,
    or when it has gone untagged for STALE_AFTER_S.
    """
    workers = {k[len(WORKER_ATTR):]: datetime.datetime.fromisoformat(v)
               for k, v in study.user_attrs.items() if k.startswith(WORKER_ATTR)}
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("worker")
        if owner:
            if _local_and_dead(owner):
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                log(f"trial {t.number}: its worker (process {owner.rpartition(':')[2]}) is gone; marked failed")
            continue
        started = t.datetime_start or now
        makers = [w for w, at in workers.items() if at <= started]
        if (makers and all(_local_and_dead(w) for w in makers)) or \
                (now - started).total_seconds() > STALE_AFTER_S:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            log(f"trial {t.number}: its worker was killed before naming itself; marked failed")


def retry_interrupted(study, log) -> None:
    """Queue again the trials that failed (an interrupt, a crash) and were not rerun: their
    parameters, or for a grid trial killed before it had any, its grid point."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    retried_by_heartbeat = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    done = [point(t) for t in trials if t.state != TrialState.FAIL]
    for t in trials:
        if (t.state == TrialState.FAIL and not t.user_attrs.get("surplus") and point(t)
                and t.number not in retried and t.number not in retried_by_heartbeat
                and point(t) not in done):
            requeue(study, t)
            done.append(point(t))
            log(f"trial {t.number} did not finish; its parameters run again first")


def point(t) -> dict:
    """What a trial tried: its grid point, else its parameters (or those queued for it)."""
    if "grid_id" in t.system_attrs:
        return {"grid_id": t.system_attrs["grid_id"]}
    return t.params or t.system_attrs.get("fixed_params") or {}


def requeue(study, t) -> None:
    """Queue a failed trial's parameters once more.

    A grid trial keeps its grid point (``grid_id``), as optuna's own heartbeat retry does. Optuna's
    enqueue_trial leaves it out, and GridSampler.after_trial then raises KeyError('grid_id') when
    one grid point is left (optuna issue 6073 and PR 6844: by design). A study killed mid-trial
    ended that way on rerun.
    """
    if "grid_id" not in t.system_attrs:
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        return
    keep = {k: t.system_attrs[k] for k in ("grid_id", "search_space") if k in t.system_attrs}
    fixed = {"fixed_params": t.params} if t.params else {}  # none: killed before its first suggest
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, user_attrs={"retry_of": t.number}, system_attrs={**keep, **fixed}))


# --- plain data for the report ---------------------------------------------------------------------


def trial_rows(study) -> list[dict]:
    """One row per trial that ran (surplus placeholders left out): number, state, value, params..."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        value = t.value
        if value is None and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": value,
                     **t.params, "epochs_run": t.user_attrs.get("epochs_run"),
                     "minutes": t.user_attrs.get("minutes"), "note": t.user_attrs.get("note", ""),
                     "_curve": dict(sorted(t.intermediate_values.items()))})
    return rows


def importances(study) -> tuple[dict, str]:
    """Parameter importances, or why there are none."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if len(done) < 3:
        return {}, f"needs at least 3 completed trials ({len(done)} so far)"
    varied = [k for k in done[0].params if len({repr(t.params.get(k)) for t in done}) > 1]
    if not varied:
        return {}, "no parameter varied between the completed trials"
    try:
        import sklearn  # noqa: F401 - optional (fANOVA's random forest); PED-ANOVA without it

        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    except ImportError:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    try:
        return optuna.importance.get_param_importances(study, evaluator=evaluator, params=varied), ""
    except (RuntimeError, ValueError, ZeroDivisionError) as e:
        return {}, f"could not be estimated: {str(e).splitlines()[0]}"
