"""bloodcell compare: several architectures trained and evaluated under one protocol.

Every model gets the same split, seed, image size, augmentation and epoch budget (per-model
overrides come only from a YAML file, and are recorded). An interrupted comparison continues where it
stopped: finished models are not trained again, an unfinished one resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from bloodcell import __version__
from bloodcell.catalog import STUDY
from bloodcell.config import (
    DEFAULT_MODELS,
    FIELD_DEFAULTS,
    RECORD_KEYS,
    TrainConfig,
    load_yaml,
    make_config,
)
from bloodcell.data.build import config_dataset, dataset_key, source_dataset
from bloodcell.errors import BloodcellError, ConfigError
from bloodcell.metrics import split_metrics
from bloodcell.models import count_parameters, get_model, list_models, model_info
from bloodcell.models.build import model_kwargs
from bloodcell.runfiles import (
    check_out_dir,
    has_files,
    read_predictions,
    run_lock,
    write_csv,
    write_json,
    write_predictions,
    write_yaml,
)
from bloodcell.runtime import environment
from bloodcell.studies.kfold import cross_validate
from bloodcell.training.tracking import check_trackers, flat_metrics, record
from bloodcell.training.train import train

PRESETS_DIR = Path(__file__).parents[1] / "presets" / "compare"


def list_presets() -> list[str]:
    """Names of the presets shipped in the package (presets/compare/*.yaml)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_protocol(config: str | None = None, preset: str | None = None) -> tuple[dict, list[str] | None, dict]:
    """Shared config keys, model list and per-model overrides from a preset and/or a YAML file."""
    shared: dict = {}
    models = None
    overrides: dict = {}
    sources = []
    if preset:
        path = PRESETS_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(list_presets()) or 'none'}")
        sources.append(load_yaml(path))
    if config:
        sources.append(load_yaml(config))
    for src in sources:
        src = dict(src)
        if "models" in src:
            models = model_list(src.pop("models"))
        for name, ov in (src.pop("overrides", None) or {}).items():
            if not isinstance(ov, dict):
                raise ConfigError(f"overrides.{name} must be a mapping of config keys")
            overrides.setdefault(name, {}).update(ov)
        shared.update(src)
    return shared, models, overrides


def architecture(entry: str) -> str:
    """The architecture of a compared entry: ``NAME`` or ``NAME@LABEL`` (one architecture again
    under a label, so that per-model overrides can give it, say, a second schedule)."""
    return entry.split("@", 1)[0]


def model_list(value) -> list[str]:
    """A comma-separated string or list of model entries, checked (NAME or NAME@LABEL)."""
    names = [str(m).strip() for m in (value.split(",") if isinstance(value, str) else value) if str(m).strip()]
    if not names:
        raise ConfigError("no models to compare")
    unknown = [m for m in names if architecture(m) not in list_models()]
    if unknown:
        raise ConfigError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(list_models())}")
    bad = [m for m in names if "@" in m and not re.fullmatch(r"[A-Za-z0-9_.-]+", m.split("@", 1)[1])]
    if bad:
        raise ConfigError(f"bad label in {', '.join(bad)}: NAME@LABEL takes letters, digits, '_', '.', '-'")
    if len(set(names)) != len(names):
        raise ConfigError("a model is listed twice (NAME@LABEL lists an architecture again under a label)")
    return names


def ensemble_row(out: Path, rows: list[dict], ds) -> dict | None:
    """A row for the mean of the compared models' probabilities (uniform: no weight is fitted,
    so the test split chooses nothing), computed from their saved predictions."""
    members = [r["model"] for r in rows]
    run = out / "runs" / "ensemble"
    run.mkdir(parents=True, exist_ok=True)
    metrics = {}
    for split in ("val", "test", "test_simple"):
        files = [out / r["run_dir"] / f"predictions_{split}.csv" for r in rows]
        if split not in ds.splits or not all(f.exists() for f in files):
            continue
        parts = [read_predictions(f, ds.classes) for f in files]
        if any(p[2] != parts[0][2] for p in parts):  # members saw other images (per-model data)
            return None
        probs = sum(p[0] for p in parts) / len(parts)
        metrics[split] = split_metrics(ds.classes, ds.splits[split].groups, parts[0][1], probs)
        write_predictions(run / f"predictions_{split}.csv", parts[0][2], parts[0][1], probs, ds.classes)
    write_json(run / "metrics.json", metrics)
    return {
        "model": "ensemble", "description": "mean of the probabilities of " + ", ".join(members),
        "params": sum(r["params"] for r in rows), "image_size": rows[0]["image_size"],
        "batch_size": rows[0]["batch_size"], "epochs": rows[0]["epochs"], "epochs_run": None,
        "best_epoch": None, "train_minutes": sum(r["train_minutes"] for r in rows),
        "train_images_per_s": None, "norm": None, "precision": rows[0]["precision"],
        "run_dir": "runs/ensemble", **metrics, "study": None, "members": members,
    }


def compare(models: list[str] | None, shared: dict, out: str | Path, overrides: dict | None = None,
            overwrite: bool = False, log=print, progress: bool = True, report: bool = True,
            command: str | None = None, ensemble: bool = False) -> dict:
    """Train and evaluate each model under one protocol; write results.json/.csv (and the report).

    With ``ensemble`` (and two or more models) a last row averages the models' probabilities.
    """
    out = Path(out)
    models = list(models or DEFAULT_MODELS)
    overrides = overrides or {}
    for name in overrides:
        if name not in models:
            raise ConfigError(f"overrides name model {name!r}, which is not being compared")
    base = make_config(TrainConfig, shared)
    cfgs = {m: make_config(TrainConfig, base.to_dict(), overrides.get(m, {}), {"model": architecture(m)})
            for m in models}
    protocol = {**base.to_dict(), "models": models, "overrides": overrides}
    protocol.pop("model")
    check_out_dir(out)
    check_folder(out, protocol, overwrite)
    # Every data set the models need is read (or its cache found) before anything in OUT is
    # touched: a wrong path or unusable data fails here and leaves the folder as it was.
    t0 = time.perf_counter()
    for cfg in cfgs.values():
        check_trackers(cfg.log)
    datasets: dict = {}
    loaded: dict = {}  # the data as split, before folds: what a cross-validated model starts from
    for cfg in cfgs.values():
        if dataset_key(cfg) not in datasets:
            loaded[dataset_key(cfg)] = source_dataset(cfg)
            datasets[dataset_key(cfg)] = config_dataset(cfg, loaded[dataset_key(cfg)])
    # One comparison at a time writes here: a second process is refused, not mixed in.
    with run_lock(out, "comparison"):
        check_folder(out, protocol, overwrite)  # again, now that no other process can change it
        if overwrite and out.exists():
            for p in ("runs", "figures"):
                shutil.rmtree(out / p, ignore_errors=True)
            for p in ("results.json", "results.csv", "report.html", "report.md", "compare.yaml"):
                (out / p).unlink(missing_ok=True)
        (out / "runs").mkdir(parents=True, exist_ok=True)
        write_yaml(out / "compare.yaml", json.loads(json.dumps(protocol)))

        rows = []
        run_info: dict = {}
        for i, m in enumerate(models, 1):
            cfg = cfgs[m]
            run = out / "runs" / m
            ds = datasets[dataset_key(cfg)]
            if cfg.folds and cfg.fold is None:  # K folds under runs/<m>/folds/; a finished one is kept, as a finished model is
                log(f"[{i}/{len(models)}] {m}: {cfg.folds}-fold cross-validation")
                metrics = cross_validate(cfg, run, resume=(run / "config.yaml").exists(), log=log, progress=progress,
                                         dataset=loaded[dataset_key(cfg)])
            elif (run / "DONE").exists():
                log(f"[{i}/{len(models)}] {m}: already finished, kept")
                metrics = json.loads((run / "metrics.json").read_text())
            else:
                resume = (run / "last.pt").exists() and (run / "config.yaml").exists()
                log(f"[{i}/{len(models)}] {m}: {'resuming' if resume else 'training'}")
                metrics = train(cfg, run, resume=resume, overwrite=not resume, log=log, progress=progress,
                                dataset=ds)
            arch = cfg.model  # the architecture of entry m (NAME of NAME@LABEL)
            net = get_model(arch, **model_kwargs(cfg, len(ds.classes)))
            r = metrics["run"]
            run_info = run_info or r
            rows.append({
                "model": m, "description": model_info(arch)["description"], "params": count_parameters(net),
                "image_size": cfg.image_size, "batch_size": cfg.batch_size, "epochs": cfg.epochs,
                "epochs_run": r["epochs_run"], "best_epoch": r["best_epoch"],
                "train_minutes": r["train_minutes"], "train_images_per_s": r["train_images_per_s"],
                "norm": cfg.norm if "norm" in model_info(arch)["options"] else None,
                "precision": r["precision"],
                # with --folds: the fold chosen on validation (its curves, predictions and Grad-CAMs)
                "run_dir": f"runs/{m}" + (f"/folds/{r['chosen_fold']}" if "cv" in metrics else ""),
                "pretrained": (r.get("pretrained") or {}).get("source"),  # the weights it started from
                **{s: metrics[s] for s in ("val", "test", "test_simple") if s in metrics},
                "study": dict(STUDY[arch]) if arch in STUDY else None,
                **({"folds": r["folds"], "chosen_fold": r["chosen_fold"], "cv": metrics["cv"],
                    "out_of_fold": metrics.get("out_of_fold"), "cv_dir": f"runs/{m}"} if "cv" in metrics else {}),
            })
        ds0 = next(iter(datasets.values()))
        if ensemble and any(c.folds for c in cfgs.values()):
            log("--ensemble: not made with --folds (each model's chosen fold validated on other images)")
        elif ensemble and len(rows) > 1 and len(datasets) == 1:
            row = ensemble_row(out, rows, ds0)
            if row is not None:
                rows.append(row)
        results = {
            "bloodcell_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": command or "bloodcell.studies.compare.compare(...)",
            "protocol": {**protocol, "ensemble": ensemble},
            "dataset": {"root": ds0.root, "layout": ds0.layout, "synthetic": ds0.layout == "synthetic",
                        "group_by": ds0.group_by, "classes": ds0.classes, "image_size": ds0.image_size,
                        "splits": ds0.summary(), "extra_train": ds0.extra_train, "sources": ds0.sources,
                        "problems": [{"kind": p.kind, "detail": p.detail, "n": len(p.paths)} for p in ds0.problems]},
            "environment": environment(run_info["device"], run_info["precision"], run_info["threads"]),
            "models": rows,
            "wall_minutes_this_session": (time.perf_counter() - t0) / 60,
        }
        write_json(out / "results.json", results)
        write_results_csv(rows, out / "results.csv")
        log(format_table(rows))
        if report:
            from bloodcell.report import (
                build_report,  # lazy: matplotlib only where a report is asked for
            )

            html, md = build_report(out)
            log(f"report: {html}\n        {md}")
        record(base.log, out, name=f"{out} (compare)", config=json.loads(json.dumps(protocol)), uri=base.mlflow_uri,
               values={f"{r['model']}/{k}": v for r in rows for k, v in flat_metrics(
                   {s: r[s] for s in ("val", "test", "test_simple") if isinstance(r.get(s), dict)}).items()},
               files=[out / n for n in ("results.json", "results.csv", "report.md", "report.html")],
               tags={"bloodcell.studies.compare": ",".join(models)}, log=log)
        return results


def check_folder(out: Path, protocol: dict, overwrite: bool) -> None:
    """Refuse a folder that holds another comparison's protocol, or something else than a comparison."""
    saved = out / "compare.yaml"
    if saved.exists() and not overwrite:
        # The model list may grow or shrink (finished models are kept); the protocol itself may not
        # change, nor the overrides of a model already in the folder.
        old, new = load_yaml(saved), json.loads(json.dumps(protocol))
        both = set(old.get("models", [])) & set(protocol["models"])
        diff = sorted(k for k in (set(old) | set(new)) - {"models", "overrides", *RECORD_KEYS}
                      if old.get(k, FIELD_DEFAULTS.get(k)) != new.get(k))
        diff += [f"overrides of {m}" for m in sorted(both)
                 if old.get("overrides", {}).get(m) != new["overrides"].get(m)]
        if diff:
            raise BloodcellError(f"{out} holds a comparison with another protocol (differs in: "
                                 f"{', '.join(diff)}); use --overwrite or another --out")
    elif has_files(out) and not overwrite and not saved.exists():
        raise BloodcellError(f"{out} exists and is not a compare folder; choose another --out")


def write_results_csv(rows: list[dict], path: Path) -> None:
    """results.csv: one flat row per model."""
    flat = []
    for r in rows:
        f = {k: r[k] for k in ("model", "params", "image_size", "batch_size", "epochs", "epochs_run",
                               "best_epoch", "train_minutes", "train_images_per_s", "norm", "precision")}
        for s in ("val", "test", "test_simple"):
            m = r.get(s)
            for k in ("accuracy", "loss", "macro_f1", "balanced_accuracy", "auc", "ece", "group_accuracy",
                      "f1_positive", "pr_auc"):  # the last two: binary data only (else empty)
                f[f"{s}_{k}"] = None if m is None else m.get(k)
            for k in ("accuracy_ci", "group_accuracy_ci"):
                ci = (m or {}).get(k) or [None, None]
                f[f"{s}_{k}_lo"], f[f"{s}_{k}_hi"] = ci
        f["study_accuracy"] = (r["study"] or {}).get("accuracy")
        if any("cv" in x for x in rows):  # --folds: mean and sample sd over the folds
            f["folds"] = r.get("folds")
            for s in ("val", "test"):
                for k in ("accuracy", "macro_f1", "group_accuracy"):
                    sp = ((r.get("cv") or {}).get(s) or {}).get(k) or {}
                    f[f"cv_{s}_{k}_mean"], f[f"cv_{s}_{k}_sd"] = sp.get("mean"), sp.get("sd")
            f["oof_accuracy"] = (r.get("out_of_fold") or {}).get("accuracy")
        f["pretrained"] = r.get("pretrained")
        flat.append(f)
    write_csv(path, flat)


def format_table(rows: list[dict]) -> str:
    """A plain-text summary, ranked by test accuracy."""
    def pct(v):
        return "  -  " if v is None else f"{100 * v:5.1f}"

    def cv(r, split):
        sp = ((r.get("cv") or {}).get(split) or {}).get("accuracy")
        return "      -      " if sp is None else f"{100 * sp['mean']:5.1f} ± {100 * sp['sd']:4.1f}"

    key = "test" if all("test" in r for r in rows) else "val"
    folds = any("cv" in r for r in rows)
    lines = [f"{'model':20s} {'params':>11s} {'val':>6s} {key:>6s} {'cell':>6s} {'min':>6s} {'img/s':>7s}"
             + (f" {'cv val':>13s} {'cv ' + key:>13s}" if folds else "")]
    for r in sorted(rows, key=lambda r: -r[key]["accuracy"]):
        ips = r["train_images_per_s"]
        lines.append(f"{r['model']:20s} {r['params']:>11,} {pct(r['val']['accuracy']):>6s} "
                     f"{pct(r[key]['accuracy']):>6s} {pct(r[key].get('group_accuracy')):>6s} "
                     f"{r['train_minutes']:6.1f} {'-' if ips is None else f'{ips:.0f}':>7s}"
                     + (f" {cv(r, 'val'):>13s} {cv(r, key):>13s}" if folds else ""))
    if folds:
        lines.append("cv: mean ± sd over the folds; val and test columns: the fold chosen on validation")
    return "\n".join(lines)
