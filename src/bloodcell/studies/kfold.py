"""Cross-validation: K models of one config, each validated on its own fold of the non-test images.

>>> from bloodcell.studies.kfold import cross_validate
>>> res = cross_validate(make_config(TrainConfig, {"data": "labs/tecom", "folds": 5}), "runs/cv")
>>> res["cv"]["test"]["accuracy"]      # {"mean", "sd", "min", "max", "values"} over the 5 folds

The train and val images are pooled and dealt into K grouped, stratified folds (data.folds); fold k
trains on the other folds and validates on fold k, which chooses its epoch. The test split is the
one the config gives, the same in every fold, and chooses nothing: not the epoch, not the fold. On
a small data set (a lab's few hundred cells) the mean and spread over the folds say more than one
split's figure, which rests on a few dozen validation cells.

Folder (as crosslab's): ``RUN/config.yaml`` (the config, folds and no fold), ``RUN/folds/<k>/`` (a
plain run folder per fold: its config names the fold, so ``train --resume RUN/folds/<k>`` and
``evaluate RUN/folds/<k>`` work alone), ``RUN/folds.json`` (per fold, the summary, the fold chosen
on validation), ``RUN/metrics.json`` (the chosen fold's metrics plus ``cv``: the summary) and
``RUN/DONE``. ``evaluate``/``predict``/``export`` on RUN use the chosen fold's best.pt (and say so).
An interrupted run continues where it stopped: finished folds are kept, an unfinished one resumes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bloodcell.config import RECORD_KEYS, TrainConfig, load_yaml, make_config
from bloodcell.data import Dataset
from bloodcell.data.build import config_dataset, source_dataset
from bloodcell.errors import BloodcellError
from bloodcell.metrics import split_metrics
from bloodcell.runfiles import mark_done, read_json, read_predictions, write_json, write_yaml
from bloodcell.training.engine import better
from bloodcell.training.tracking import check_trackers, record
from bloodcell.training.train import train

SUMMARY_FILE = "folds.json"
# The figures summarised over folds (those a split's metrics hold: binary ones only on two classes).
SUMMARISED = ("accuracy", "macro_f1", "balanced_accuracy", "loss", "auc", "ece", "group_accuracy",
              "f1_positive", "pr_auc")


def is_crossval_dir(path: str | Path) -> bool:
    """Does this folder hold a cross-validation (folds.json, or a config with folds and no fold)?"""
    p = Path(path)
    if (p / SUMMARY_FILE).is_file():
        return True
    try:
        cfg = load_yaml(p / "config.yaml") if (p / "config.yaml").is_file() else {}
    except BloodcellError:
        return False
    return bool(cfg.get("folds")) and cfg.get("fold") is None


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (n - 1; 0 for one value), min, max and the values."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": len(v), "values": [float(x) for x in v]}


def summarise(per_fold: list[dict]) -> dict:
    """{split: {metric: spread}} over the folds' metrics (the figures every fold has)."""
    out: dict = {}
    for split in ("val", "test", "test_simple"):
        ms = [f["metrics"].get(split) for f in per_fold]
        if not all(isinstance(m, dict) for m in ms):
            continue
        out[split] = {k: spread([m[k] for m in ms]) for k in SUMMARISED
                      if all(isinstance(m.get(k), int | float) and m[k] == m[k] for m in ms)}
    return out


def cross_validate(cfg: TrainConfig, out: str | Path, *, overwrite: bool = False, resume: bool = False,
                   log=print, progress: bool = True, dataset: Dataset | None = None) -> dict:
    """Train every fold of ``cfg`` (``cfg.folds`` of them) under ``out``; write folds.json and
    metrics.json; return the metrics: the chosen fold's splits, ``run`` and ``cv`` (the summary).

    ``dataset`` is ``build.source_dataset(cfg)`` already loaded (compare passes it)."""
    out = Path(out)
    if not cfg.folds or cfg.fold is not None:
        raise BloodcellError("cross_validate needs folds (and no fold): one fold is a plain train run")
    check_trackers(cfg.log)
    if resume:
        if not (out / "config.yaml").is_file():
            raise BloodcellError(f"--resume: {out} holds no run to resume (no config.yaml)")
        cfg = make_config(TrainConfig, load_yaml(out / "config.yaml"), {k: getattr(cfg, k) for k in RECORD_KEYS
                                                                        if getattr(cfg, k)})
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            what = "a finished cross-validation" if (out / "DONE").exists() else "files (an unfinished run?)"
            raise BloodcellError(f"{out} already holds {what}; use --overwrite to replace it"
                                 + ("" if (out / "DONE").exists() else " or --resume to continue it"))
    if resume and (out / "DONE").exists():
        log(f"{out} is already finished; nothing to resume")
        return read_json(out / "metrics.json")
    t0 = time.perf_counter()
    loaded = dataset or source_dataset(cfg)  # before anything is written: a bad path leaves OUT as it was
    fold_data = [config_dataset(make_config(TrainConfig, cfg.to_dict(), {"fold": k}), loaded)
                 for k in range(cfg.folds)]  # every fold's split checked before the first trains
    if overwrite and not resume and out.exists():
        import shutil  # lazy: only an overwrite removes folders

        shutil.rmtree(out / "folds", ignore_errors=True)
        for name in (SUMMARY_FILE, "metrics.json", "DONE", "config.yaml"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / "config.yaml", cfg.to_dict())
    log(f"cross-validation: {cfg.folds} folds of the {sum(len(fold_data[0].splits[n]) for n in ('train', 'val')):,} "
        f"train and val images (grouped, stratified); test {len(fold_data[0].splits.get('test', [])):,} images, "
        "the same in every fold")

    per_fold = []
    for k, ds in enumerate(fold_data):
        run = out / "folds" / str(k)
        fcfg = make_config(TrainConfig, cfg.to_dict(), {"fold": k})
        if (run / "DONE").exists():
            log(f"[fold {k + 1}/{cfg.folds}] already finished, kept")
            metrics = read_json(run / "metrics.json")
        else:
            again = (run / "last.pt").exists() and (run / "config.yaml").exists()
            log(f"[fold {k + 1}/{cfg.folds}] {'resuming' if again else 'training'}: train "
                f"{len(ds.splits['train']):,}, val {len(ds.splits['val']):,} images")
            metrics = train(fcfg, run, resume=again, overwrite=not again, log=log, progress=progress, dataset=ds)
        per_fold.append({"fold": k, "run_dir": f"folds/{k}", "metrics": metrics,
                         "best_epoch": metrics["run"]["best_epoch"],
                         "best_val": metrics["run"]["best_val_" + cfg.monitor.removeprefix("val_")],
                         "val_images": len(ds.splits["val"])})

    # The fold chosen on validation (its own fold's best score) is what evaluate and predict use.
    chosen = 0
    for f in per_fold[1:]:
        if better(cfg.monitor, f["best_val"], per_fold[chosen]["best_val"]):
            chosen = f["fold"]
    summary = summarise(per_fold)
    oof = out_of_fold(out, fold_data)
    res = {"folds": cfg.folds, "seed": cfg.seed, "monitor": cfg.monitor, "chosen": chosen,
           "chosen_by": f"the best {cfg.monitor} on its own fold", "summary": summary,
           "out_of_fold": oof,
           "per_fold": [{k: v for k, v in f.items() if k != "metrics"}
                        | {s: f["metrics"][s] for s in ("val", "test", "test_simple") if s in f["metrics"]}
                        for f in per_fold]}
    write_json(out / SUMMARY_FILE, res)
    best = per_fold[chosen]["metrics"]
    metrics = {**{s: best[s] for s in ("val", "test", "test_simple") if s in best},
               "run": {**best["run"], "chosen_fold": chosen, "folds": cfg.folds,
                       "train_minutes": sum(f["metrics"]["run"]["train_minutes"] for f in per_fold)},
               "cv": summary, "out_of_fold": oof}
    write_json(out / "metrics.json", metrics)
    mark_done(out, time.strftime("%Y-%m-%d %H:%M:%S\n"))
    log(format_summary(res))
    record(cfg.log, out, name=f"{out} ({cfg.folds} folds)", config=cfg.to_dict(), uri=cfg.mlflow_uri,
           values={f"cv/{s}/{k}_{stat}": v[stat] for s, ms in summary.items() for k, v in ms.items()
                   for stat in ("mean", "sd")} | {"cv/chosen_fold": float(chosen)},
           files=[out / SUMMARY_FILE], tags={"bloodcell.model": cfg.model, "bloodcell.folds": str(cfg.folds)},
           log=log)
    log(f"cross-validation: {(time.perf_counter() - t0) / 60:.1f} min this session")
    return metrics


def out_of_fold(out: Path, fold_data: list[Dataset]) -> dict | None:
    """Every pooled image scored once, by the fold model that did not train on it (each fold's
    predictions_val.csv together): one figure over all non-test images."""
    parts = []
    for k, ds in enumerate(fold_data):
        f = out / "folds" / str(k) / "predictions_val.csv"
        if not f.is_file():
            return None
        parts.append((read_predictions(f, ds.classes), ds.splits["val"].groups))
    probs = np.concatenate([p[0][0] for p in parts])
    labels = np.concatenate([p[0][1] for p in parts])
    groups = np.concatenate([g for _, g in parts])
    m = split_metrics(fold_data[0].classes, groups, labels, probs)
    return {k: v for k, v in m.items() if k != "per_source"}


def format_summary(res: dict) -> str:
    """The summary as text: mean ± sd per split, the folds' figures, the chosen fold."""
    lines = []
    for split, ms in res["summary"].items():
        a, f1 = ms.get("accuracy"), ms.get("macro_f1")
        lines.append(f"{split:12s} accuracy {a['mean']:.4f} ± {a['sd']:.4f} (folds: "
                     + ", ".join(f"{v:.3f}" for v in a["values"]) + f")  macro-F1 {f1['mean']:.4f} ± {f1['sd']:.4f}")
    if res.get("out_of_fold"):
        o = res["out_of_fold"]
        lines.append(f"{'out of fold':12s} accuracy {o['accuracy']:.4f}  macro-F1 {o['macro_f1']:.4f}  (n={o['n']}, "
                     "every train/val image scored by the fold that did not train on it)")
    lines.append(f"chosen fold (by {res['monitor']} on its own fold): {res['chosen']}; mean ± sd over "
                 f"{res['folds']} folds (sample sd)")
    return "\n".join(lines)

