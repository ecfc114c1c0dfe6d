"""Optuna studies over the training config: resumable, prunable, and shared between machines.

>>> from bloodcell.tune import tune, tune_report
>>> summary = tune("synthetic:400", "cnn4x32", trials=8, out="runs/tune")
>>> summary["best_value"], summary["best_config"]          # best.yaml is a `train --config` file

A study lives in a storage (by default ``DIR/study.db``, SQLite); every process that opens the same
storage and study name is one more worker. Trials run `bloodcell.train.train` on the train and val
splits only: the test split is dropped before a trial starts, so it cannot choose anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import html
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from bloodcell.config import TrainConfig, _coerce, hints, load_yaml, make_config
from bloodcell.errors import BloodcellError, ConfigError

METRICS = {"macro_f1": ("val_macro_f1", "val_macro_f1"), "accuracy": ("val_accuracy", "val_acc")}
PRUNERS = ("median", "hyperband", "none")
# Keys a study may not search: they decide the data, the split or the objective, which every trial
# of a study must share for their values to be comparable.
NOT_SEARCHABLE = ("data", "model", "seed", "fractions", "val_fraction", "group_regex", "group_by",
                  "cache_dir", "monitor", "device", "threads", "init_from", "weights")
NOT_IN_SPACE = ("data", "model", "monitor")  # given by --data, --model and --metric
SPEC_KEYS = {"choices", "low", "high", "log", "step"}
SETTINGS_FILE = "tune.yaml"
STALE_AFTER_S = 120  # a running trial without a heartbeat for this long is failed and retried


# ---------------------------------------------------------------------------------------------
# the search space


@dataclass(frozen=True)
class Choice:
    """A categorical parameter."""

    values: tuple

    def to_yaml(self) -> dict:
        return {"choices": list(self.values)}


@dataclass(frozen=True)
class Range:
    """A numeric parameter between low and high (inclusive), optionally log-scaled or stepped."""

    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False

    def to_yaml(self) -> dict:
        d = {"low": self.low, "high": self.high}
        if self.log:
            d["log"] = True
        if self.step is not None:
            d["step"] = self.step
        return d


def default_space_path() -> Path:
    """The packaged default space (presets/tune_space.yaml)."""
    return Path(str(resources.files("bloodcell") / "presets" / "tune_space.yaml"))


def _check_value(where: str, name: str, value) -> object:
    """Coerce one value to the config key's type and validate it as TrainConfig would."""
    try:
        v = _coerce(name, hints(TrainConfig)[name], value)
        make_config(TrainConfig, {name: v})
    except ConfigError as e:
        raise ConfigError(f"{where}: {name}: {e}") from e
    return v


def _parse_entry(where: str, name: str, spec) -> Choice | Range | object:
    """One space entry: a Choice, a Range, or a fixed value; errors name the file and the key."""
    known = hints(TrainConfig)
    if name not in known:
        close = sorted(n for n in known if n.startswith(name[:3]) or name.startswith(n[:3]))
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{where}: unknown key {name!r}: not a train config key{hint}")
    if name in NOT_IN_SPACE:
        flag = {"monitor": "--metric"}.get(name, f"--{name}")
        raise ConfigError(f"{where}: {name!r} cannot be in a space file; give it with {flag}")
    if not isinstance(spec, dict):
        return _check_value(where, name, spec)
    if name in NOT_SEARCHABLE:
        raise ConfigError(f"{where}: {name!r} cannot be searched (every trial must share it); "
                          "give one fixed value")
    bad = sorted(set(spec) - SPEC_KEYS)
    if bad:
        raise ConfigError(f"{where}: {name}: unknown key {bad[0]!r} (use choices, or low and high "
                          "with optional log and step)")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise ConfigError(f"{where}: {name}: give either choices or low/high, not both")
        values = spec["choices"]
        if not isinstance(values, list):
            raise ConfigError(f"{where}: {name}: choices must be a list, got {values!r}")
        if not values:
            raise ConfigError(f"{where}: {name}: empty choices")
        values = [_check_value(where, name, v) for v in values]
        if len(set(values)) < len(values):
            raise ConfigError(f"{where}: {name}: repeated choices {values}")
        return Choice(tuple(values))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: {name}: needs choices, or both low and high")
    tp = known[name]
    if tp not in (int, float):
        raise ConfigError(f"{where}: {name}: is not a number; use choices")
    low, high = (_check_value(where, name, spec[k]) for k in ("low", "high"))
    log, step = bool(spec.get("log", False)), spec.get("step")
    if low > high:
        raise ConfigError(f"{where}: {name}: empty range, low {low} > high {high}")
    if tp is float and low == high:
        raise ConfigError(f"{where}: {name}: empty range, low == high == {low} (give a plain value "
                          "to fix it)")
    if log and low <= 0:
        raise ConfigError(f"{where}: {name}: a log range needs low > 0, got {low}")
    if step is not None:
        if log:
            raise ConfigError(f"{where}: {name}: give log or step, not both")
        if not isinstance(step, int | float) or step <= 0 or (tp is int and float(step) != int(step)):
            raise ConfigError(f"{where}: {name}: step must be a positive {tp.__name__}, got {step!r}")
        step = tp(step)
    return Range(low, high, log, step, tp is int)


def load_space(path: str | Path | dict | None = None, model: str | None = None,
               base: dict | None = None, defaults: bool = True) -> dict:
    """The default space with a space file's (or dict's) entries on top, validated.

    Returns name -> Choice | Range | fixed value. ``model`` drops ``norm`` for models without the
    option and checks image sizes against the model's minimum; ``base`` is the config the fixed
    values apply to (checked together). ``defaults=False`` reads a resolved space alone.
    """
    where = f"default space {default_space_path()}"
    space = {k: _parse_entry(where, k, v) for k, v in load_yaml(default_space_path()).items()} \
        if defaults else {}
    if path is not None:
        where = "space" if isinstance(path, dict) else f"space file {path}"
        data = path if isinstance(path, dict) else load_yaml(path)
        for k, v in data.items():
            space[k.replace("-", "_")] = _parse_entry(where, k.replace("-", "_"), v)
    if model is not None:
        from bloodcell.models import model_info

        if "norm" not in model_info(model)["options"]:
            space.pop("norm", None)
        check_sizes(where, model, space.get("image_size"))
    fixed = {k: v for k, v in space.items() if not isinstance(v, Choice | Range)}
    try:
        make_config(TrainConfig, base or {}, fixed)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    return space


def check_sizes(where: str, model: str, sizes) -> None:
    """Every image size a study may draw must suit the model (cnn4x32 needs 32 px or more)."""
    from bloodcell.models import model_info

    smallest = (min(sizes.values) if isinstance(sizes, Choice) else sizes.low
                if isinstance(sizes, Range) else min(sizes) if isinstance(sizes, list) else sizes)
    least = model_info(model)["min_image_size"]
    if smallest is not None and smallest < least:
        raise ConfigError(f"{where}: image_size {smallest} is below {model}'s minimum of {least} px")


def space_to_yaml(space: dict) -> dict:
    """The space as a plain mapping (the space-file format)."""
    return {k: v.to_yaml() if isinstance(v, Choice | Range) else v for k, v in space.items()}


def parse_grid(items: list[str] | dict | None) -> dict:
    """``["image_size=48,64,96", "batch_size=32,64"]`` -> ``{"image_size": [48, 64, 96], ...}``."""
    if not items:
        return {}
    if isinstance(items, dict):
        items = [f"{k}={','.join(map(str, v))}" for k, v in items.items()]
    grid: dict[str, list] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ConfigError(f"--grid: {item!r} is not KEY=V1,V2,...")
        spec = [v.strip() for v in values.split(",") if v.strip()]
        entry = _parse_entry("--grid", name, {"choices": spec})
        if name in grid:
            raise ConfigError(f"--grid: {name} given twice")
        grid[name] = list(entry.values)
    return grid


def suggest(trial, space: dict, grid: dict) -> dict:
    """The config values a trial draws (searched entries, or the grid's); fixed ones are left out."""
    if grid:  # the study's hand strategy: the grid alone varies, everything else stays fixed
        return {k: trial.suggest_categorical(k, v) for k, v in grid.items()}
    params = {}
    for name, spec in space.items():
        if isinstance(spec, Choice):
            params[name] = trial.suggest_categorical(name, list(spec.values))
        elif isinstance(spec, Range) and spec.integer:
            params[name] = trial.suggest_int(name, int(spec.low), int(spec.high),
                                             step=int(spec.step or 1), log=spec.log)
        elif isinstance(spec, Range):
            params[name] = trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
    return params


# ---------------------------------------------------------------------------------------------
# settings: what a study is, saved as DIR/tune.yaml and in the study itself


@dataclass(frozen=True)
class TuneSettings:
    """Everything that defines a study (the space resolved), saved so `--resume` needs only DIR."""

    data: str = "synthetic"
    model: str = "cnn4x32"
    trials: int = 20
    timeout_min: float | None = None
    space: dict = field(default_factory=dict)  # resolved, space-file format
    grid: dict = field(default_factory=dict)
    storage: str | None = None  # None: sqlite in DIR
    study: str | None = None  # None: bloodcell-<model>
    metric: str = "macro_f1"
    pruner: str = "median"
    base: dict = field(default_factory=dict)  # train config keys every trial shares
    sampler_seed: int | None = None

    # Keys that may change between runs of one study (more trials, another time limit), and base
    # keys that belong to one machine rather than to the study.
    MUTABLE = ("trials", "timeout_min", "sampler_seed")
    LOCAL = ("cache_dir", "device", "threads")

    def identity(self) -> dict:
        """The settings two workers of one study must agree on."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.MUTABLE}
        d["base"] = {k: v for k, v in self.base.items() if k not in self.LOCAL}
        return d

    def study_name(self) -> str:
        return self.study or f"bloodcell-{self.model}"

    def storage_url(self, out: Path) -> str:
        return self.storage or f"sqlite:///{(out / 'study.db').resolve()}"


def _masked(url: str) -> str:
    """A storage URL with any password hidden (for logs and reports)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is shown as given
        return url


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file: workers finishing together never leave a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_yaml(data: dict, path: Path) -> None:
    _atomic_write(path, yaml.safe_dump(data, sort_keys=False))


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


def _differences(a: dict, b: dict) -> list[str]:
    return [f"{k}: {a.get(k)!r} here, {b.get(k)!r} there" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


# ---------------------------------------------------------------------------------------------
# optuna plumbing


_hushed = {"trial": None}  # the trial whose second failure record is still to come


def _no_bookkeeping_records(record) -> bool:
    """Drop optuna's two failure records (the first with a traceback) for a surplus trial (see
    make_objective) or a trial stopped by Ctrl-C: neither is a failure worth reporting."""
    msg = record.getMessage()
    if not msg.startswith("Trial ") or " failed with " not in msg:
        return True
    number = msg.split()[1]
    if "_Surplus" in msg or "KeyboardInterrupt" in msg:
        _hushed["trial"] = number
        return False
    if number == _hushed["trial"] and " failed with value " in msg:
        _hushed["trial"] = None
        return False
    return True


def _quiet_optuna():
    import logging
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna.study._optimize").addFilter(_no_bookkeeping_records)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def open_storage(url: str):
    """An RDB storage with heartbeats: a worker that dies has its trial failed and retried."""
    optuna = _quiet_optuna()
    from optuna import storages

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
                raise BloodcellError(f"storage {_masked(url)}: the database driver is missing "
                                     f"({e.name}); install it (e.g. psycopg2-binary)") from e
            last = e
            time.sleep(0.5 + attempt)
    raise BloodcellError(f"cannot open storage {_masked(url)}: {str(last).splitlines()[0]}")


# The first epoch a pruner may stop a trial after. Epoch 1 runs inside the default one-epoch
# learning-rate warm-up, where a trial's score says little about where it ends: in the 20-trial
# Kaggle study, 9 trials were pruned there when pruning began at epoch 1 (bench/RESULTS.md).
PRUNE_FROM_EPOCH = 2


def _make_pruner(name: str, max_epochs: int):
    optuna = _quiet_optuna()
    if name == "median":
        # Optuna prunes once a trial's step >= n_warmup_steps; steps are 1-based epochs here.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=PRUNE_FROM_EPOCH)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=PRUNE_FROM_EPOCH,
                                              max_resource=max(max_epochs, PRUNE_FROM_EPOCH + 1),
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def _make_sampler(settings: TuneSettings):
    optuna = _quiet_optuna()
    if settings.grid:
        return optuna.samplers.GridSampler(settings.grid, seed=settings.sampler_seed)
    # constant_liar: workers running at once see each other's running trials and spread out.
    return optuna.samplers.TPESampler(n_startup_trials=min(10, max(4, settings.trials // 3)),
                                      multivariate=True, constant_liar=True, seed=settings.sampler_seed)


def open_study(settings: TuneSettings, out: Path, pruner=None):
    """Create or join the study; a study made with other settings is an error naming them."""
    optuna = _quiet_optuna()
    storage = open_storage(settings.storage_url(out))
    space = settings.space
    max_epochs = space["epochs"]["high"] if isinstance(space.get("epochs"), dict) \
        else int(space.get("epochs", settings.base.get("epochs", TrainConfig.epochs)))
    if pruner is None:
        pruner = _make_pruner(settings.pruner, max_epochs)
    last = None
    for attempt in range(6):
        try:
            study = optuna.create_study(storage=storage, study_name=settings.study_name(),
                                        direction="maximize", load_if_exists=True,
                                        sampler=_make_sampler(settings), pruner=pruner)
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
        raise BloodcellError(f"study {settings.study_name()!r} in {_masked(settings.storage_url(out))} was "
                             f"started with other settings ({'; '.join(_differences(mine, theirs))}); "
                             "give another --study or the same settings")
    return study


def _counts(study) -> dict:
    from optuna.trial import TrialState

    c = {s: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        if not t.user_attrs.get("surplus"):
            c[t.state] += 1
    return c


# ---------------------------------------------------------------------------------------------
# the study


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock between processes on this machine (so one decodes, the others wait)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _trial_dataset(cfg: TrainConfig, datasets: dict):
    """The train and val splits for cfg, loaded once per image size in this process.

    The decoded cache on disk is shared by every process (a lock makes the first one decode and
    the others wait for its file), so no image is decoded twice for one size. The test split is
    dropped here: a trial cannot evaluate, let alone choose by, the test split.
    """
    from bloodcell.data.cache import default_cache_dir
    from bloodcell.train import config_dataset, dataset_key

    key = dataset_key(cfg)
    if key not in datasets:
        cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        with _file_lock(cache / f".tune-{cfg.image_size}-{cfg.resize}.lock"):
            ds = config_dataset(cfg)
        datasets[key] = dataclasses.replace(ds, splits={k: ds.splits[k] for k in ("train", "val")
                                                        if k in ds.splits})
    return datasets[key]


def _short(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def make_objective(settings: TuneSettings, out: Path, log=print):
    """The function optuna calls per trial: train on train, report val per epoch, return val metric."""
    optuna = _quiet_optuna()
    from optuna.trial import TrialState

    from bloodcell.engine import TrainingDiverged, check_stop
    from bloodcell.train import train

    monitor, row_key = METRICS[settings.metric]
    space = load_space(settings.space, settings.model, settings.base, defaults=False)
    fixed = {k: v for k, v in space.items() if not isinstance(v, Choice | Range)}
    datasets: dict = {}
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)

    def objective(trial) -> float:
        check_stop()  # a Ctrl-C between trials stops here, before this one does anything
        trial.set_user_attr("worker", worker_id())
        # Trial numbers are handed out atomically by the storage, so counting the live trials
        # numbered below this one gives every worker the same answer: exactly `trials` run.
        ahead = sum(1 for t in trial.study.get_trials(deepcopy=False, states=counted)
                    if t.number < trial.number and not t.user_attrs.get("surplus"))
        if ahead >= settings.trials:
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise _Surplus(f"the study already has {settings.trials} trials")
        params = suggest(trial, space, settings.grid)
        cfg = make_config(TrainConfig, settings.base, fixed, params,
                          {"data": settings.data, "model": settings.model, "monitor": monitor})
        run = out / "trials" / f"{trial.number:04d}"
        run.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        ds = _trial_dataset(cfg, datasets)
        epochs: list[dict] = []

        def on_epoch(epoch: int, row: dict) -> None:
            epochs.append(row)
            trial.report(float(row[row_key]), epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        def finish(note: str) -> None:
            trial.set_user_attr("epochs_run", len(epochs))
            trial.set_user_attr("minutes", round((time.perf_counter() - t0) / 60, 3))
            if epochs:
                trial.set_user_attr("images_per_s", round(sum(r["images_per_s"] for r in epochs)
                                                          / len(epochs), 1))
            trial.set_user_attr("note", note)

        with open(run / "log.txt", "a") as f:
            def run_log(msg: str) -> None:
                f.write(msg + "\n")
                f.flush()

            try:
                metrics = train(cfg, run, overwrite=True, log=run_log, progress=False, dataset=ds,
                                on_epoch=on_epoch)
            except optuna.TrialPruned:
                finish(f"pruned after epoch {len(epochs)}")
                log(f"trial {trial.number:3d}  pruned after epoch {len(epochs)} "
                    f"(val {settings.metric} {epochs[-1][row_key]:.4f})  {_short(params)}")
                raise
            except TrainingDiverged as e:  # a poor configuration, not a broken study
                finish(f"diverged: {e}")
                log(f"trial {trial.number:3d}  diverged in epoch {len(epochs) + 1}  {_short(params)}")
                raise optuna.TrialPruned(f"diverged: {e}") from e
        value = float(metrics["val"][settings.metric])
        finish(f"best epoch {metrics['run']['best_epoch']}")
        trial.set_user_attr("best_epoch", metrics["run"]["best_epoch"])
        trial.set_user_attr("val_accuracy", metrics["val"]["accuracy"])
        trial.set_user_attr("val_macro_f1", metrics["val"]["macro_f1"])
        log(f"trial {trial.number:3d}  val {settings.metric} {value:.4f}  "
            f"({len(epochs)} epochs, {(time.perf_counter() - t0) / 60:.1f} min)  {_short(params)}")
        return value

    return objective


class _Surplus(Exception):
    """Raised in a trial created after the study already had its number of trials."""


def _stop_when_full(n: int):
    """An optuna callback: stop once finished plus running trials reach n (before asking for more)."""
    from optuna.trial import TrialState

    def callback(study, trial) -> None:
        c = _counts(study)
        if c[TrialState.COMPLETE] + c[TrialState.PRUNED] + c[TrialState.RUNNING] >= n:
            study.stop()

    return callback


def worker_id() -> str:
    """This process, as a trial records it: host and process id."""
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _fail_own_running(study, started) -> None:
    """After Ctrl-C, mark this process's trials that are still RUNNING as failed, so a resume reruns
    them at once instead of counting them as running elsewhere until their heartbeat goes stale.

    An interrupt between optuna creating a trial and our objective tagging it leaves an untagged
    trial; one created after this process started optimising is taken to be ours.
    """
    from optuna.trial import TrialState

    me = worker_id()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("worker")
        if owner == me or (owner is None and t.datetime_start and t.datetime_start >= started):
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def _retry_interrupted(study, log) -> None:
    """Queue again the parameters of trials that failed (an interrupt, a crash) and were not rerun."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    retried_by_heartbeat = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    done = [t.params or t.system_attrs.get("fixed_params") for t in trials if t.state != TrialState.FAIL]
    for t in trials:
        if (t.state == TrialState.FAIL and not t.user_attrs.get("surplus") and t.params
                and t.number not in retried and t.number not in retried_by_heartbeat
                and t.params not in done):
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            done.append(t.params)
            log(f"trial {t.number} did not finish; its parameters run again first")


def tune(data: str = "synthetic", model: str = "cnn4x32", trials: int | None = None,
         out: str | Path = "runs/tune", *, timeout_min: float | None = None,
         space: str | Path | dict | None = None, grid: list[str] | dict | None = None,
         storage: str | None = None, study_name: str | None = None, metric: str = "macro_f1",
         pruner: str | object = "median", base: dict | None = None, sampler_seed: int | None = None,
         resume: bool = False, report: bool = True, log=print) -> dict:
    """Run (or join, or resume) a study maximising a validation metric; returns its summary.

    ``trials`` counts the study's finished trials (completed or pruned) across all workers and
    runs: a resumed or joined study stops when it has that many. ``pruner`` may also be an optuna
    pruner object. ``resume=True`` reads everything but trials/timeout from ``out/tune.yaml``.
    """
    out = Path(out)
    if resume:
        old = read_settings(out)
        settings = dataclasses.replace(old, trials=trials or old.trials,
                                       timeout_min=timeout_min if timeout_min is not None else old.timeout_min)
    else:
        if metric not in METRICS:
            raise ConfigError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
        pname = pruner if isinstance(pruner, str) else "custom"
        if pname not in (*PRUNERS, "custom"):
            raise ConfigError(f"pruner must be one of {', '.join(PRUNERS)}; got {pruner!r}")
        base = dict(base or {})
        for k in NOT_IN_SPACE:
            if k in base:
                raise ConfigError(f"base config: {k!r} is set by tune's own argument, not the config")
        make_config(TrainConfig, base, {"data": data, "model": model})
        from bloodcell.data.layouts import discover, is_synthetic, raise_if_fatal

        if not is_synthetic(data):  # a bad path is one line now, not a failed trial's traceback
            raise_if_fatal(discover(data, group_regex=base.get("group_regex"),
                                    group_by=base.get("group_by", "auto")))
        resolved = load_space(space, model, base)
        grid_d = parse_grid(grid)
        if grid_d:
            from bloodcell.models import model_info

            if "norm" in grid_d and "norm" not in model_info(model)["options"]:
                raise ConfigError(f"--grid: model {model} has no norm option")
            check_sizes("--grid", model, grid_d.get("image_size"))
            n_grid = math.prod(len(v) for v in grid_d.values())
            trials = min(trials or n_grid, n_grid)
        if trials is not None and trials < 1:
            raise ConfigError(f"trials must be at least 1, got {trials}")
        settings = TuneSettings(data=str(data), model=model, trials=trials or 20, timeout_min=timeout_min,
                                space=space_to_yaml(resolved), grid=grid_d, storage=storage,
                                study=study_name, metric=metric, pruner=pname, base=base,
                                sampler_seed=sampler_seed)
        if (out / SETTINGS_FILE).is_file():  # the same command again (or a second worker): join
            old = read_settings(out)
            diff = _differences(settings.identity(), old.identity())
            if diff:
                raise BloodcellError(f"{out} already holds a study with other settings ({'; '.join(diff)});"
                                     f" use 'bloodcell tune --resume {out}' or another --out")
    out.mkdir(parents=True, exist_ok=True)
    _atomic_yaml(dataclasses.asdict(settings), out / SETTINGS_FILE)

    from optuna.trial import TrialState

    study = open_study(settings, out, pruner=None if isinstance(pruner, str) or resume else pruner)
    _retry_interrupted(study, log)
    c = _counts(study)
    finished = c[TrialState.COMPLETE] + c[TrialState.PRUNED]
    log(f"study {settings.study_name()!r} in {_masked(settings.storage_url(out))}: {finished} of "
        f"{settings.trials} trials finished, {c[TrialState.RUNNING]} running; maximising val "
        f"{settings.metric} of {settings.model} on {settings.data}")
    if finished + c[TrialState.RUNNING] < settings.trials:
        from bloodcell.engine import stop_between_batches

        started = datetime.datetime.now()
        try:
            # Ctrl-C takes effect between training batches, never inside a storage write or
            # optuna's bookkeeping: one landing anywhere once left the process waiting on the
            # SQLite lock while it marked the interrupted trial failed.
            with stop_between_batches():
                study.optimize(make_objective(settings, out, log), n_trials=None,
                               timeout=settings.timeout_min * 60 if settings.timeout_min else None,
                               catch=(_Surplus,), callbacks=[_stop_when_full(settings.trials)])
        except KeyboardInterrupt:
            _fail_own_running(study, started)
            raise
    return summarise(study, settings, out, report=report, log=log)


def best_config(study, settings: TuneSettings) -> dict:
    """The best completed trial's full train config, as a dict `train --config` accepts."""
    space = load_space(settings.space, settings.model, settings.base, defaults=False)
    fixed = {k: v for k, v in space.items() if not isinstance(v, Choice | Range)}
    cfg = make_config(TrainConfig, settings.base, fixed, study.best_trial.params,
                      {"data": settings.data, "model": settings.model,
                       "monitor": METRICS[settings.metric][0]})
    return cfg.to_dict()


def summarise(study, settings: TuneSettings, out: Path, report: bool = True, log=print) -> dict:
    """Write best.yaml (and the report) for the study as it stands; return the summary."""
    from optuna.trial import TrialState

    c = _counts(study)
    summary = {"study": settings.study_name(), "trials": settings.trials,
               "complete": c[TrialState.COMPLETE], "pruned": c[TrialState.PRUNED],
               "failed": c[TrialState.FAIL], "running": c[TrialState.RUNNING],
               "best_value": None, "best_trial": None, "best_params": None, "best_config": None,
               "report": None}
    if c[TrialState.COMPLETE]:
        best = study.best_trial
        _atomic_yaml(best_config(study, settings), out / "best.yaml")
        summary.update(best_value=best.value, best_trial=best.number, best_params=best.params,
                       best_config=str(out / "best.yaml"))
        log(f"best: trial {best.number}, val {settings.metric} {best.value:.4f}  {_short(best.params)}")
        log(f"best config: {out / 'best.yaml'} (bloodcell train --config {out / 'best.yaml'})")
    else:
        log("no trial has completed yet: no best config")
    missing = settings.trials - c[TrialState.COMPLETE] - c[TrialState.PRUNED]
    if missing > 0:
        log(f"{missing} trial(s) still to run ({c[TrialState.RUNNING]} running elsewhere or left by a "
            f"killed worker, retried after {STALE_AFTER_S} s); 'bloodcell tune --resume {out}' continues")
    if report:
        summary["report"] = str(write_report(study, settings, out))
        log(f"report: {summary['report']}")
    _atomic_write(out / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary


def tune_report(out: str | Path, log=print) -> Path:
    """Rebuild DIR/report.html, trials.csv and best.yaml from the study's storage."""
    out = Path(out)
    settings = read_settings(out)
    study = open_study(settings, out)
    summarise(study, settings, out, report=True, log=log)
    return out / "report.html"


# ---------------------------------------------------------------------------------------------
# report: self-contained HTML from the stored study (matplotlib, images embedded)


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


def _png(fig) -> str:
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _importances(study) -> tuple[dict, str]:
    """Parameter importances, or why there are none."""
    import optuna
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if len(done) < 3:
        return {}, f"needs at least 3 completed trials ({len(done)} so far)"
    varied = [k for k in done[0].params if len({repr(t.params.get(k)) for t in done}) > 1]
    if not varied:
        return {}, "no parameter varied between the completed trials"
    try:
        import sklearn  # noqa: F401 - fANOVA's random forest

        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    except ImportError:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    try:
        return optuna.importance.get_param_importances(study, evaluator=evaluator, params=varied), ""
    except (RuntimeError, ValueError, ZeroDivisionError) as e:
        return {}, f"could not be estimated: {str(e).splitlines()[0]}"


def _figures(rows: list[dict], settings: TuneSettings, importances: dict) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ylabel = f"val {settings.metric}"
    done = [r for r in rows if r["state"] == "complete"]
    pruned = [r for r in rows if r["state"] == "pruned" and r["value"] is not None]
    figs = {}

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.scatter([r["number"] for r in done], [r["value"] for r in done], label="completed", zorder=3)
    ax.scatter([r["number"] for r in pruned], [r["value"] for r in pruned], marker="x", c="grey",
               label="pruned (last reported value)", zorder=3)
    if done:
        order = sorted(done, key=lambda r: r["number"])
        best = np.maximum.accumulate([r["value"] for r in order])
        ax.step([r["number"] for r in order], best, where="post", c="C3", label="best so far")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="trial", ylabel=ylabel, title="Optimisation history")
    ax.legend(fontsize=8)
    figs["history"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for r in rows:
        if r["_curve"]:
            ax.plot(list(r["_curve"]), list(r["_curve"].values()), alpha=0.7,
                    ls="-" if r["state"] == "complete" else ":", marker=".")
    ax.set(xlabel="epoch", ylabel=ylabel, title="Validation per epoch (dotted: pruned)")
    figs["curves"] = _png(fig)

    if importances:
        names = list(importances)[::-1]
        fig, ax = plt.subplots(figsize=(6.4, 0.4 * len(names) + 1.2))
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance (share of the variance in the metric)", title="Parameter importances")
        figs["importances"] = _png(fig)

    for key in ("image_size", "batch_size"):
        pts = [(r[key], r["value"]) for r in done if r.get(key) is not None]
        pp = [(r[key], r["value"]) for r in pruned if r.get(key) is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        xs = sorted({x for x, _ in pts + pp})
        rng = np.random.default_rng(0)
        for i, x in enumerate(xs):
            ys = [y for xx, y in pts if xx == x]
            if not ys:
                continue
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(ys)), ys, c="C0", alpha=0.7, zorder=3)
            ax.plot([i - 0.3, i + 0.3], [max(ys)] * 2, c="C3", lw=2)
            ax.plot([i - 0.3, i + 0.3], [float(np.median(ys))] * 2, c="k", lw=1)
        ax.scatter([xs.index(x) for x, _ in pp], [y for _, y in pp], marker="x", c="grey", zorder=2)
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set(xlabel=key, ylabel=ylabel,
               title=f"{ylabel} against {key} (red: best, black: median, x: pruned)")
        figs[key] = _png(fig)
    return figs


def _table(rows: list[dict], params: list[str], best: int | None) -> str:
    cols = ["number", "state", "value", *params, "epochs_run", "minutes", "note"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in sorted(rows, key=lambda r: (r["value"] is None, -(r["value"] or 0))):
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"<td>{'' if v is None else f'{v:.4g}' if isinstance(v, float) else html.escape(str(v))}</td>")
        cls = ' class="best"' if r["number"] == best else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def write_trials_csv(rows: list[dict], params: list[str], path: Path) -> None:
    """trials.csv: the trial table as plain data."""
    import csv
    import io

    cols = ["number", "state", "value", *params, "epochs_run", "minutes", "note"]
    f = io.StringIO()
    w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    _atomic_write(path, f.getvalue())


def write_report(study, settings: TuneSettings, out: Path) -> Path:
    """DIR/report.html (self-contained) and DIR/trials.csv from the study as stored."""
    from optuna.trial import TrialState

    rows = trial_rows(study)
    params = sorted({k for r in rows for k in r if k not in
                     ("number", "state", "value", "epochs_run", "minutes", "note", "_curve")})
    write_trials_csv(rows, params, out / "trials.csv")
    importances, why = _importances(study)
    figs = _figures(rows, settings, importances)
    c = _counts(study)
    best = study.best_trial if c[TrialState.COMPLETE] else None
    e = html.escape

    def img(key: str, missing: str) -> str:
        return f'<img src="{figs[key]}" alt="{key}">' if key in figs else f"<p class=note>{e(missing)}</p>"

    fixed = {k: v for k, v in settings.space.items() if not isinstance(v, dict)}
    searched = settings.grid or {k: v for k, v in settings.space.items() if isinstance(v, dict)}
    best_html = "<p class=note>no trial has completed yet</p>"
    if best is not None:
        chosen = "".join(f"<tr><th>{e(k)}</th><td>{e(f'{v:.4g}' if isinstance(v, float) else str(v))}</td></tr>"
                         for k, v in best.params.items())
        best_html = (f"<p>Trial {best.number}: val {e(settings.metric)} <b>{best.value:.4f}</b>.</p>"
                     f"<table>{chosen}</table><details><summary>The whole configuration "
                     "(<code>best.yaml</code>, for <code>bloodcell train --config</code> and "
                     "<code>compare --config</code>)</summary><pre>"
                     f"{e(yaml.safe_dump(best_config(study, settings), sort_keys=False))}</pre></details>")
    fixed_note = {k: f"{k} was fixed at {fixed.get(k, settings.base.get(k, getattr(TrainConfig, k)))}"
                  for k in ("image_size", "batch_size")}
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bloodcell tune: {e(settings.study_name())}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }} td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
tr.best {{ background: #fde9c8; }} pre {{ background: #f4f4f4; padding: .6em; font-size: 12px; }}
.note {{ color: #777; font-style: italic; }} img {{ max-width: 100%; }}
.grid {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }}
</style></head><body>
<h1>Tuning {e(settings.model)} on {e(settings.data)}</h1>
<p>Study <code>{e(settings.study_name())}</code> in <code>{e(_masked(settings.storage_url(out)))}</code>,
maximising the <b>validation</b> {e(settings.metric)} (the test split is never used here).
{"Grid" if settings.grid else "TPE sampler"}, {e(settings.pruner)} pruner.
Trials: {c[TrialState.COMPLETE]} completed, {c[TrialState.PRUNED]} pruned, {c[TrialState.FAIL]} failed,
{c[TrialState.RUNNING]} running, of {settings.trials} asked for.</p>
<h2>Best configuration</h2>{best_html}
<h2>The study's questions</h2>
<div class="grid"><div>{img("image_size", fixed_note["image_size"])}</div>
<div>{img("batch_size", fixed_note["batch_size"])}</div></div>
<h2>Optimisation</h2>
<div class="grid"><div>{img("history", "no finished trial yet")}</div><div>{img("curves", "")}</div></div>
<h2>Parameter importances</h2>{img("importances", "Importances " + why)}
<h2>Trials</h2>{_table(rows, params, best.number if best else None)}
<h2>Search space</h2><pre>{e(yaml.safe_dump({"searched": searched, "fixed": fixed, "base": settings.base},
                                         sort_keys=False))}</pre>
<p class=note>Generated {time.strftime("%Y-%m-%d %H:%M")} by bloodcell tune report from the study's storage.</p>
</body></html>
"""
    path = out / "report.html"
    _atomic_write(path, page)
    return path


# ---------------------------------------------------------------------------------------------
# command line


def cmd_tune(args) -> int:
    """bloodcell tune --data PATH --model cnn4x32 --trials 20 [--timeout MIN] [--space FILE] --out DIR

    More workers: run the same command elsewhere with --storage postgresql://USER@HOST/DB.
    The study's hand strategy: --grid image_size=48,64,96 batch_size=32,64,128.
    Continue an interrupted study: bloodcell tune --resume DIR. Rebuild its report: bloodcell tune report DIR.
    """
    base = load_yaml(args.config) if args.config else {}
    for k in ("cache_dir", "seed", "device", "threads"):
        if getattr(args, k) is not None:
            base[k] = getattr(args, k)
    try:
        if args.resume:
            out = args.out if args.resume is True else args.resume
            tune(out=out, trials=args.trials, timeout_min=args.timeout, resume=True,
                 report=not args.no_report)
        else:
            tune(args.data or "synthetic", args.model or "cnn4x32", args.trials, args.out,
                 timeout_min=args.timeout, space=args.space, grid=args.grid, storage=args.storage,
                 study_name=args.study, metric=args.metric, pruner=args.pruner, base=base,
                 sampler_seed=args.sampler_seed, report=not args.no_report)
    except KeyboardInterrupt:
        out = args.out if args.resume in (None, True) else args.resume
        print(f"bloodcell: interrupted; finished trials are kept: 'bloodcell tune --resume {out}' "
              "continues the study", file=sys.stderr)
        return 130
    return 0


def cmd_tune_report(args) -> int:
    """bloodcell tune report DIR"""
    print(tune_report(args.dir))
    return 0


def add_cli(sub) -> None:
    """Register `bloodcell tune` (and `bloodcell tune report DIR`) on the CLI's subparsers."""
    import argparse

    p = sub.add_parser("tune", help="tune the training config with Optuna (resumable, many workers)",
                       description=cmd_tune.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a folder of images or 'synthetic[:N]' (default: synthetic)")
    p.add_argument("--model", help="model to tune (default: cnn4x32)")
    p.add_argument("--trials", type=int, help="finished trials the study should have, over all workers "
                                              "(default: 20; a grid's size with --grid)")
    p.add_argument("--timeout", type=float, metavar="MIN", help="stop starting trials after MIN minutes")
    p.add_argument("--space", metavar="FILE", help="YAML space file; its entries replace the default's "
                                                   "(see bloodcell/presets/tune_space.yaml)")
    p.add_argument("--grid", nargs="+", metavar="KEY=V1,V2", help="a grid instead of the search: "
                   "these keys vary, everything else stays at its fixed value")
    p.add_argument("--out", default="runs/tune", help="study folder (default: runs/tune)")
    p.add_argument("--storage", metavar="URL", help="SQLAlchemy URL shared by all workers "
                   "(default: sqlite file DIR/study.db)")
    p.add_argument("--study", metavar="NAME", help="study name in the storage (default: bloodcell-MODEL)")
    p.add_argument("--metric", default="macro_f1", choices=sorted(METRICS),
                   help="validation metric to maximise (default: macro_f1)")
    p.add_argument("--pruner", default="median", choices=PRUNERS, help="stop poor trials early, from "
                   f"epoch {PRUNE_FROM_EPOCH} on, after the learning-rate warm-up (default: median)")
    p.add_argument("--config", metavar="FILE", help="YAML of train config keys every trial shares")
    p.add_argument("--cache-dir", help="decoded-image cache folder")
    p.add_argument("--seed", type=int, help="split and training seed shared by every trial (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="CPU threads per worker (default: physical cores)")
    p.add_argument("--sampler-seed", type=int, help="seed of the sampler (default: random, so that "
                                                    "workers draw different trials)")
    p.add_argument("--resume", nargs="?", const=True, metavar="DIR",
                   help="continue the study in DIR (default: --out) with its saved settings")
    p.add_argument("--no-report", action="store_true", help="skip report.html at the end (with many "
                   "workers, one 'bloodcell tune report DIR' afterwards is enough)")
    p.set_defaults(func=cmd_tune)
    actions = p.add_subparsers(dest="tune_action", metavar="ACTION")
    r = actions.add_parser("report", help="rebuild a study's report.html", description=cmd_tune_report.__doc__)
    r.add_argument("dir", help="the study folder (--out of bloodcell tune)")
    r.set_defaults(func=cmd_tune_report)
