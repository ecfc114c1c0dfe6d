"""The per-trial objective: train one drawn config on the train split, report the validation metric
per epoch (so a pruner can stop it), return the final one. The test split never reaches a trial.

With ``select: lab-out`` (several labs as ``data``) a trial instead trains one model per lab, on the
other labs, and scores it on that lab's train and val images (``lab_out_value``); the mean over the
labs is its value. Validation drawn from the training labs measures fit at home and ranked first the
recipe that travelled worst (bench/RESULTS.md, "Any lab's cells"); a lab the model never saw
measures the shift to another microscope (DomainBed's leave-one-domain-out selection). The labs'
test splits stay out here too, and pruning does not apply (no one curve to stop on).

A study runs exactly its number of trials over all its workers: a trial created beyond that number
is a surplus placeholder, stopped at once and left out of every count and table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from bloodcell.config import TUNE_METRICS, TrainConfig, TuneSettings, make_config
from bloodcell.data.build import config_dataset, dataset_key
from bloodcell.data.cache import default_cache_dir
from bloodcell.runtime import check_stop
from bloodcell.studies.lab_out import lab_name
from bloodcell.training.engine import TrainingDiverged
from bloodcell.training.evaluate import evaluate_checkpoint
from bloodcell.training.train import train
from bloodcell.tune.space import fixed_values, load_space, suggest
from bloodcell.tune.study import SurplusTrial, counts, quiet_optuna, worker_id


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock between processes on this machine (so one decodes, the others wait)."""
    import fcntl  # POSIX only: importing bloodcell.tune elsewhere still works

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def trial_dataset(cfg: TrainConfig, datasets: dict):
    """The train and val splits for cfg, loaded once per image size in this process.

    The decoded cache on disk is shared by every process (a lock makes the first one decode and
    the others wait for its file), so no image is decoded twice for one size. The test split is
    dropped here: a trial cannot evaluate, let alone choose by, the test split.
    """
    key = dataset_key(cfg)
    if key not in datasets:
        cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        with file_lock(cache / f".tune-{cfg.image_size}-{cfg.resize}.lock"):
            ds = config_dataset(cfg)
        datasets[key] = dataclasses.replace(ds, splits={k: ds.splits[k] for k in ("train", "val")
                                                        if k in ds.splits})
    return datasets[key]


def short(params: dict) -> str:
    """Parameters on one log line: 'lr=0.00311 batch_size=32'."""
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def lab_out_value(cfg: TrainConfig, metric: str, run: Path, datasets: dict, log, on_epoch) -> tuple[float, dict]:
    """Leave each lab of cfg's data out once: train on the others (their train splits, their pooled
    val choosing the epoch), score on the left-out lab's train and val images (never its test).
    Returns the mean of the labs' metric and {lab name: metric}; the models are run/out-<lab>/."""
    scores = {}
    for lab in cfg.sources:
        fold = make_config(TrainConfig, cfg.to_dict(), {"data": [s for s in cfg.sources if s != lab]})
        name = lab_name(lab)
        log(f"--- left out: {name}")
        train(fold, run / f"out-{name}", overwrite=True, log=log, progress=False,
              dataset=trial_dataset(fold, datasets), on_epoch=on_epoch)
        m = evaluate_checkpoint(run / f"out-{name}", lab, split="train+val", cache_dir=fold.cache_dir,
                                device=fold.device, log=log)["train+val"]
        scores[name] = float(m[metric])
        log(f"left-out {name}: {metric} {scores[name]:.4f} (n={m['n']})")
    return float(np.mean(list(scores.values()))), scores


def make_objective(settings: TuneSettings, out: Path, log=print):
    """The function optuna calls per trial: train on train, report val per epoch, return val metric."""
    quiet_optuna()
    monitor, row_key = TUNE_METRICS[settings.metric]
    space = load_space(settings.space, settings.model, settings.base, defaults=False)
    fixed = fixed_values(space)
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
            raise SurplusTrial(f"the study already has {settings.trials} trials")
        params = suggest(trial, space, settings.grid)
        cfg = make_config(TrainConfig, settings.base, fixed, params,
                          {"data": settings.data, "model": settings.model, "monitor": monitor})
        run = out / "trials" / f"{trial.number:04d}"
        run.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        lab_out = settings.select == "lab-out"
        ds = None if lab_out else trial_dataset(cfg, datasets)
        epochs: list[dict] = []

        def on_epoch(epoch: int, row: dict) -> None:
            epochs.append(row)
            if lab_out:  # one training per lab: no single curve a pruner could compare
                return
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
                if lab_out:
                    value, per_lab = lab_out_value(cfg, settings.metric, run, datasets, run_log, on_epoch)
                else:
                    metrics = train(cfg, run, overwrite=True, log=run_log, progress=False, dataset=ds,
                                    on_epoch=on_epoch)
            except optuna.TrialPruned:
                finish(f"pruned after epoch {len(epochs)}")
                log(f"trial {trial.number:3d}  pruned after epoch {len(epochs)} "
                    f"(val {settings.metric} {epochs[-1][row_key]:.4f})  {short(params)}")
                raise
            except TrainingDiverged as e:  # a poor configuration, not a broken study
                finish(f"diverged: {e}")
                log(f"trial {trial.number:3d}  diverged in epoch {len(epochs) + 1}  {short(params)}")
                raise optuna.TrialPruned(f"diverged: {e}") from e
        if lab_out:
            finish("left out: " + ", ".join(f"{k} {v:.4f}" for k, v in per_lab.items()))
            trial.set_user_attr("lab_out", per_lab)
            log(f"trial {trial.number:3d}  {settings.value_name()} {value:.4f}  ("
                + ", ".join(f"{k} {v:.4f}" for k, v in per_lab.items())
                + f"; {(time.perf_counter() - t0) / 60:.1f} min)  {short(params)}")
            return value
        value = float(metrics["val"][settings.metric])
        finish(f"best epoch {metrics['run']['best_epoch']}")
        trial.set_user_attr("best_epoch", metrics["run"]["best_epoch"])
        trial.set_user_attr("val_accuracy", metrics["val"]["accuracy"])
        trial.set_user_attr("val_macro_f1", metrics["val"]["macro_f1"])
        log(f"trial {trial.number:3d}  val {settings.metric} {value:.4f}  "
            f"({len(epochs)} epochs, {(time.perf_counter() - t0) / 60:.1f} min)  {short(params)}")
        return value

    return objective


def stop_when_full(n: int):
    """An optuna callback: stop once finished plus running trials reach n (before asking for more)."""
    def callback(study, trial) -> None:
        c = counts(study)
        if c[TrialState.COMPLETE] + c[TrialState.PRUNED] + c[TrialState.RUNNING] >= n:
            study.stop()

    return callback
