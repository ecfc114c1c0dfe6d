"""Run a study (``tune``), and what it leaves in its folder: best.yaml, summary.json, trials.csv and
report.html (``summarise``; ``tune_report`` rebuilds them from the storage alone).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from pathlib import Path

from optuna.trial import TrialState

from bloodcell.config import (
    PRUNERS,
    SELECTIONS,
    TUNE_METRICS,
    TrainConfig,
    TuneSettings,
    make_config,
)
from bloodcell.data.layouts import discover, is_synthetic, raise_if_fatal
from bloodcell.errors import BloodcellError, ConfigError
from bloodcell.models import model_info
from bloodcell.report.tune import TuneData, columns, write_tune_report
from bloodcell.runfiles import check_out_dir, write_csv, write_json, write_yaml
from bloodcell.runtime import stop_between_batches
from bloodcell.studies.lab_out import check_labs
from bloodcell.tune.objective import make_objective, short, stop_when_full
from bloodcell.tune.space import (
    NOT_IN_SPACE,
    check_sizes,
    fixed_values,
    load_space,
    parse_grid,
    space_to_yaml,
)
from bloodcell.tune.study import (
    SETTINGS_FILE,
    STALE_AFTER_S,
    SurplusTrial,
    counts,
    differences,
    fail_dead_workers,
    fail_own_running,
    importances,
    masked,
    open_study,
    read_settings,
    register_worker,
    retry_interrupted,
    trial_rows,
    write_settings,
)


def tune(data: str = "synthetic", model: str = "cnn4x32", trials: int | None = None,
         out: str | Path = "runs/tune", *, timeout_min: float | None = None,
         space: str | Path | dict | None = None, grid: list[str] | dict | None = None,
         storage: str | None = None, study_name: str | None = None, metric: str = "macro_f1",
         pruner: str | object = "median", select: str = "val", base: dict | None = None,
         sampler_seed: int | None = None, resume: bool = False, report: bool = True, log=print) -> dict:
    """Run (or join, or resume) a study maximising a validation metric; returns its summary.

    ``trials`` counts the study's finished trials (completed or pruned) across all workers and
    runs: a resumed or joined study stops when it has that many. ``pruner`` may also be an optuna
    pruner object. ``select="lab-out"`` scores each trial on every lab of ``data`` left out in turn
    (objective.lab_out_value). ``resume=True`` reads everything but trials/timeout from ``out/tune.yaml``.
    """
    out = check_out_dir(out, "--resume" if resume else "--out")
    if resume:
        old = read_settings(out)
        settings = dataclasses.replace(old, trials=trials or old.trials,
                                       timeout_min=timeout_min if timeout_min is not None else old.timeout_min)
    else:
        settings = new_settings(data, model, trials, timeout_min=timeout_min, space=space, grid=grid,
                                storage=storage, study_name=study_name, metric=metric, pruner=pruner,
                                select=select, base=base, sampler_seed=sampler_seed, log=log)
        if (out / SETTINGS_FILE).is_file():  # the same command again (or a second worker): join
            old = read_settings(out)
            diff = differences(settings.identity(), old.identity())
            if diff:
                raise BloodcellError(f"{out} already holds a study with other settings ({'; '.join(diff)});"
                                     f" use 'bloodcell tune --resume {out}' or another --out")
    out.mkdir(parents=True, exist_ok=True)
    # the storage first: one that cannot be opened leaves no tune.yaml that a rerun would be held to
    study = open_study(settings, out, pruner=None if isinstance(pruner, str) or resume else pruner)
    write_settings(settings, out)
    register_worker(study)
    fail_dead_workers(study, log)
    retry_interrupted(study, log)
    c = counts(study)
    finished = c[TrialState.COMPLETE] + c[TrialState.PRUNED]
    log(f"study {settings.study_name()!r} in {masked(settings.storage_url(out))}: {finished} of "
        f"{settings.trials} trials finished, {c[TrialState.RUNNING]} running; maximising "
        f"{settings.value_name()} of {settings.model} on {settings.data}")
    if finished + c[TrialState.RUNNING] < settings.trials:
        started = datetime.datetime.now()
        try:
            # Ctrl-C takes effect between training batches, never inside a storage write or
            # optuna's bookkeeping: one landing anywhere once left the process waiting on the
            # SQLite lock while it marked the interrupted trial failed.
            with stop_between_batches():
                study.optimize(make_objective(settings, out, log), n_trials=None,
                               timeout=settings.timeout_min * 60 if settings.timeout_min else None,
                               catch=(SurplusTrial,), callbacks=[stop_when_full(settings.trials)])
        except KeyboardInterrupt:
            fail_own_running(study, started)
            raise
    return summarise(study, settings, out, report=report, log=log)


def new_settings(data: str, model: str, trials: int | None, *, timeout_min, space, grid, storage,
                 study_name, metric: str, pruner, select: str = "val", base: dict | None, sampler_seed,
                 log=print) -> TuneSettings:
    """A new study's settings, every argument checked (and the data path) before any trial."""
    if metric not in TUNE_METRICS:
        raise ConfigError(f"metric must be one of {', '.join(TUNE_METRICS)}; got {metric!r}")
    pname = pruner if isinstance(pruner, str) else "custom"
    if pname not in (*PRUNERS, "custom"):
        raise ConfigError(f"pruner must be one of {', '.join(PRUNERS)}; got {pruner!r}")
    if select not in SELECTIONS:
        raise ConfigError(f"select must be one of {', '.join(SELECTIONS)}; got {select!r}")
    base = dict(base or {})
    for k in NOT_IN_SPACE:
        if k in base:
            raise ConfigError(f"base config: {k!r} is set by tune's own argument, not the config")
    if base.get("folds") or base.get("fold") is not None:
        raise ConfigError("tune trains each trial on one train/val split; --folds is for train and compare")
    cfg = make_config(TrainConfig, base, {"data": data, "model": model})
    if select == "lab-out":
        # a model trained on some labs is scored on another: their shared classes unless given
        _, classes = check_labs(cfg.sources, cfg.classes, "--select lab-out",
                                "each lab's models (trials/<NNNN>/out-<lab>/)")
        if pname != "none":
            log(f"--select lab-out: one training per lab left out, so no {pname} pruning")
            pname = "none"
        if not cfg.classes:
            base["classes"] = classes
            log(f"--select lab-out: the classes every lab has: {', '.join(classes)}")
    if cfg.cache_dir:  # now, not in the first trial (a failed trial and optuna's traceback)
        check_out_dir(cfg.cache_dir, "--cache-dir")
    data = cfg.data
    for source in ([data] if isinstance(data, str) else data):  # a bad path: one line now, not a failed trial
        if not is_synthetic(source):
            raise_if_fatal(discover(source, group_regex=base.get("group_regex"),
                                    group_by=base.get("group_by", "auto")))
    resolved = load_space(space, model, base)
    grid_d = parse_grid(grid)
    if grid_d:
        if "norm" in grid_d and "norm" not in model_info(model)["options"]:
            raise ConfigError(f"--grid: model {model} has no norm option")
        check_sizes("--grid", model, grid_d.get("image_size"))
        n_grid = math.prod(len(v) for v in grid_d.values())
        trials = min(trials or n_grid, n_grid)
    if trials is not None and trials < 1:
        raise ConfigError(f"trials must be at least 1, got {trials}")
    return TuneSettings(data=data if isinstance(data, str) else list(data), model=model, trials=trials or 20, timeout_min=timeout_min,
                        space=space_to_yaml(resolved), grid=grid_d, storage=storage, study=study_name,
                        metric=metric, pruner=pname, select=select, base=base, sampler_seed=sampler_seed)


def best_config(study, settings: TuneSettings) -> dict:
    """The best completed trial's full train config, as a dict `train --config` accepts."""
    space = load_space(settings.space, settings.model, settings.base, defaults=False)
    cfg = make_config(TrainConfig, settings.base, fixed_values(space), study.best_trial.params,
                      {"data": settings.data, "model": settings.model,
                       "monitor": TUNE_METRICS[settings.metric][0]})
    return cfg.to_dict()


def summarise(study, settings: TuneSettings, out: Path, report: bool = True, log=print) -> dict:
    """Write best.yaml (and the report) for the study as it stands; return the summary."""
    c = counts(study)
    summary = {"study": settings.study_name(), "trials": settings.trials, **plain_counts(c),
               "best_value": None, "best_trial": None, "best_params": None, "best_config": None,
               "report": None}
    if c[TrialState.COMPLETE]:
        best = study.best_trial
        write_yaml(out / "best.yaml", best_config(study, settings))
        summary.update(best_value=best.value, best_trial=best.number, best_params=best.params,
                       best_config=str(out / "best.yaml"))
        log(f"best: trial {best.number}, {settings.value_name()} {best.value:.4f}  {short(best.params)}")
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
    write_json(out / "summary.json", summary, indent=1, default=str)
    return summary


def plain_counts(c: dict) -> dict[str, int]:
    """Counts per TrialState as the summary and the report name them."""
    return {"complete": c[TrialState.COMPLETE], "pruned": c[TrialState.PRUNED],
            "failed": c[TrialState.FAIL], "running": c[TrialState.RUNNING]}


def write_trials_csv(rows: list[dict], path: Path) -> None:
    """trials.csv: the trial table as plain data."""
    cols = columns(rows)
    # Only the table's columns (a row's curve stays out); with no trial, the header alone.
    write_csv(path, [{k: r.get(k) for k in cols} for r in rows], cols, lineterminator="\n")


def write_report(study, settings: TuneSettings, out: Path) -> Path:
    """DIR/report.html (self-contained) and DIR/trials.csv from the study as stored."""
    rows = trial_rows(study)
    write_trials_csv(rows, out / "trials.csv")
    imp, why = importances(study)
    c = counts(study)
    best = None
    if c[TrialState.COMPLETE]:
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": b.params, "config": best_config(study, settings)}
    data = TuneData(settings=settings, storage=masked(settings.storage_url(out)), counts=plain_counts(c),
                    rows=rows, best=best, importances=imp, why=why)
    return write_tune_report(data, out / "report.html")


def tune_report(out: str | Path, log=print) -> Path:
    """Rebuild DIR/report.html, trials.csv and best.yaml from the study's storage."""
    out = Path(out)
    settings = read_settings(out)
    study = open_study(settings, out)
    summarise(study, settings, out, report=True, log=log)
    return out / "report.html"
