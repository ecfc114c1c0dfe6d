"""bloodcell crosslab: leave one lab out, the honest test of a model meant for another microscope.

>>> from bloodcell.studies.lab_out import crosslab
>>> res = crosslab({"data": ["labs/a", "labs/b", "labs/c"], "model": "cnn4x32"}, "runs/crosslab")
>>> res["matrix"]            # held-out lab -> {lab: accuracy}; the diagonal is the unseen lab

For each lab (each ``data`` source), one model is trained on the other labs, as one data set (each
split on its own, validation pooled over them: nothing of the held-out lab chooses anything, not
the epoch, not the checkpoint), and tested on every image of the held-out lab; its test split on
the labs it trained on gives the in-lab figures beside. Only the classes every lab has are used
unless ``classes`` says otherwise. The folds are run folders under ``DIR/folds/``; an interrupted
run continues where it stopped (finished folds are kept), as ``compare`` does.

How many cells must a new lab label? With ``label_curve=(5, 10, 25, 50)`` each fold's model is also,
on the held-out lab split as a run of it alone would be (seeded, grouped): scored as trained on that
lab's test split (K = 0), adapted without labels on its train split's images (``bloodcell adapt``,
K = 0 adapted), and fine-tuned on K labelled cells per class of its train split as ``train
--init-from --labels-per-class K`` does (studies.finetune: from the adapted model, kept only where
the K cells' own cross-validation shows a gain; no label beyond the K chooses anything), each
scored on that same test split (``crosslab.json``:
``label_curve``). ``DIR/crops.npz`` keeps a few images of each lab as the model sees them (size,
resize), for the report's contact sheet.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import numpy as np

from bloodcell import __version__
from bloodcell.config import FIELD_DEFAULTS, RECORD_KEYS, TrainConfig, load_yaml, make_config
from bloodcell.data import discover
from bloodcell.data.build import config_dataset
from bloodcell.errors import BloodcellError, ConfigError
from bloodcell.runfiles import (
    atomic_write,
    check_out_dir,
    has_files,
    read_json,
    run_lock,
    write_json,
    write_yaml,
)
from bloodcell.studies.adapt import adapt
from bloodcell.studies.finetune import finetune
from bloodcell.training.evaluate import evaluate_checkpoint
from bloodcell.training.train import train

PROTOCOL_FILE = "crosslab.yaml"
CROPS_PER_LAB = 8


def lab_name(source: str) -> str:
    """A short, file-safe name for a lab: its folder's name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source.rstrip("/")).name) or "lab"


def shared_classes(sources: tuple[str, ...]) -> list[str]:
    """The classes every source has (names matched in any case), in the first source's spelling."""
    found = [discover(s).classes for s in sources]
    common = set.intersection(*({c.lower() for c in cs} for cs in found))
    return sorted((c for c in found[0] if c.lower() in common), key=str.lower)


def check_labs(labs: tuple[str, ...], classes, who: str, runs: str) -> tuple[list[str], list[str]]:
    """The labs' names and the classes to use (those given, else the ones every lab has), checked
    for a run that leaves each lab out: ``who`` needs two or more labs, and names its ``runs`` by
    each lab's folder, so two alike are refused. One line (a BloodcellError) where they fail."""
    if len(labs) < 2:
        raise ConfigError(f"{who} needs two or more labs: give --data once for each")
    names = [lab_name(s) for s in labs]
    if len(set(names)) < len(names):
        raise ConfigError(f"two labs have the same folder name ({', '.join(names)}); {who} names {runs} by it")
    classes = list(classes) or shared_classes(labs)
    if len(classes) < 2:
        raise BloodcellError(f"the labs share fewer than two classes ({', '.join(classes) or 'none'}); "
                             "name the classes to use with --classes")
    return names, classes


def crosslab(shared: dict, out: str | Path, overwrite: bool = False, log=print, progress: bool = True,
             report: bool = True, command: str | None = None, label_curve: tuple[int, ...] = ()) -> dict:
    """Leave each lab out once; write DIR/crosslab.json (the matrix, and with ``label_curve`` the
    accuracy against labelled cells per class) and the report; return it."""
    out = check_out_dir(out)
    base = make_config(TrainConfig, shared)
    labs = base.sources
    if base.folds or base.fold is not None:
        raise ConfigError("crosslab's folds are its labs; --folds is for train and compare")
    names, classes = check_labs(labs, base.classes, "crosslab", "folds")
    base = make_config(TrainConfig, base.to_dict(), {"classes": classes})
    protocol = {**base.to_dict(), "labs": list(labs)}
    saved = out / PROTOCOL_FILE
    if saved.exists() and not overwrite:
        old = load_yaml(saved)
        diff = sorted(k for k in set(old) | set(protocol) if k not in RECORD_KEYS
                      and old.get(k, FIELD_DEFAULTS.get(k)) != json.loads(json.dumps(protocol)).get(k))
        if diff:
            raise BloodcellError(f"{out} holds a crosslab run with another protocol (differs in: {', '.join(diff)}); "
                                 "use --overwrite or another --out")
    elif has_files(out) and not overwrite:
        raise BloodcellError(f"{out} exists and is not a crosslab folder; choose another --out")
    with run_lock(out, "crosslab run"):  # one process at a time writes here
        out.mkdir(parents=True, exist_ok=True)
        write_yaml(saved, json.loads(json.dumps(protocol)))
        log(f"crosslab: {len(labs)} labs ({', '.join(names)}), classes {', '.join(classes)}, model {base.model}")
        t0 = time.perf_counter()
        folds = []
        for k, (lab, name) in enumerate(zip(labs, names, strict=True)):
            others = tuple(s for s in labs if s != lab)
            cfg = make_config(TrainConfig, base.to_dict(), {"data": list(others)})
            run = out / "folds" / f"{k}-{name}"
            if (run / "DONE").exists() and not overwrite:
                log(f"[{k + 1}/{len(labs)}] held out {name}: already finished, kept")
                metrics = read_json(run / "metrics.json")
            else:
                resume = (run / "last.pt").exists() and (run / "config.yaml").exists() and not overwrite
                log(f"[{k + 1}/{len(labs)}] held out {name}: {'resuming' if resume else 'training'} on "
                    f"{', '.join(lab_name(s) for s in others)}")
                metrics = train(cfg, run, resume=resume, overwrite=not resume, log=log, progress=progress)
            held = evaluate_checkpoint(run, lab, split="all", cache_dir=cfg.cache_dir, device=cfg.device,
                                       out=run / "held_out", log=log)["all"]
            per = metrics["test"].get("per_source")
            if per is None:  # one lab trained on
                in_lab = {others[0]: metrics["test"]}
            elif set(per) <= set(others):
                in_lab = per
            else:  # keyed by the layouts' roots (a run before sources kept their given names): same order
                in_lab = dict(zip(others, per.values(), strict=False))
            folds.append({"held_out": lab, "name": name, "trained_on": list(others), "run_dir": str(run.relative_to(out)),
                          "held_out_metrics": held, "in_lab": in_lab, "best_epoch": metrics["run"]["best_epoch"],
                          "train_minutes": metrics["run"]["train_minutes"]})
            log(f"  held-out {name}: accuracy {held['accuracy']:.4f}  macro-F1 {held['macro_f1']:.4f}  (n={held['n']}); "
                + "  ".join(f"in-lab {lab_name(s)} {m['accuracy']:.4f}" for s, m in in_lab.items()))
        matrix = {f["name"]: {**{lab_name(s): m["accuracy"] for s, m in f["in_lab"].items()},
                              f["name"]: f["held_out_metrics"]["accuracy"]} for f in folds}
        curve = {f["name"]: fold_label_curve(out / f["run_dir"], f["held_out"], base, label_curve, log=log,
                                             progress=progress) for f in folds} if label_curve else {}
        write_crops(out / "crops.npz", labs, base)
        res = {"bloodcell_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "command": command or "bloodcell.studies.lab_out.crosslab(...)", "protocol": protocol, "classes": classes,
               "labs": [{"root": s, "name": n} for s, n in zip(labs, names, strict=True)], "folds": folds,
               "matrix": matrix, "label_curve": curve, "wall_minutes_this_session": (time.perf_counter() - t0) / 60}
        write_json(out / "crosslab.json", res)
        log(format_matrix(res))
        if report:
            # lazy: matplotlib only where a report is asked for (training code never imports it)
            from bloodcell.report.lab_out import build_crosslab_report

            log(f"report: {build_crosslab_report(out)}")
        return res


def fold_label_curve(run: Path, lab: str, base: TrainConfig, ks: tuple[int, ...], log=print,
                     progress: bool = True) -> dict:
    """One fold's model on its held-out lab's test split: as trained, adapted without labels on the
    lab's train images, and fine-tuned on K labelled cells per class of its train split, for each K.
    Returns {"n_test", "trained", "adapted", "k": {K: {"accuracy", "macro_f1", "cells"}}}; the runs
    are kept under the fold (``adapted/``, ``k<K>/``) and a finished one is reused."""
    lab_cfg = make_config(TrainConfig, base.to_dict(), {"data": lab})
    if not (run / "adapted" / "DONE").exists():
        adapt(run, lab, run / "adapted", split="train", cache_dir=base.cache_dir, device=base.device,
              seed=base.seed, overwrite=True, log=log)
    adapted = read_json(run / "adapted" / "metrics.json")["test"]  # "before": the fold's model as trained
    trained = adapted["before"]
    curve = {"n_test": adapted["n"], "trained": {m: trained[m] for m in ("accuracy", "macro_f1")},
             "adapted": {m: adapted[m] for m in ("accuracy", "macro_f1")}, "k": {}}
    log(f"  {lab_name(lab)} test split: as trained {trained['accuracy']:.4f}, adapted {adapted['accuracy']:.4f}")
    for k in ks:
        ft = run / f"k{k}"
        if (ft / "DONE").exists():
            metrics = read_json(ft / "metrics.json")
        else:
            cfg = make_config(TrainConfig, lab_cfg.to_dict(), {"labels_per_class": k,
                                                               "init_from": str(run / "best.pt")})
            # the never-worse fine-tune a lab gets from `train --init-from` (studies.finetune): its
            # recipe, kept only where the labelled cells' own cross-validation shows a gain
            metrics = finetune(cfg, ft, given=(), overwrite=True, log=lambda _: None, progress=progress)
        cells = metrics["run"].get("labelled_cells", {}).get("train", {})
        curve["k"][str(k)] = {"accuracy": metrics["test"]["accuracy"], "macro_f1": metrics["test"]["macro_f1"],
                              "cells": cells}
        log(f"  {lab_name(lab)} with {k} labelled cells per class ({', '.join(f'{c} {n}' for c, n in cells.items())}): "
            f"test accuracy {metrics['test']['accuracy']:.4f}")
    return curve


def write_crops(path: Path, labs: tuple[str, ...], base: TrainConfig) -> None:
    """A few images of each lab as the model sees them (its size and resize; spread over the
    classes), for the report's contact sheet: DIR/crops.npz, one uint8 N x H x W x 3 array per lab."""
    arrays = {}
    for lab in labs:
        ds = config_dataset(make_config(TrainConfig, base.to_dict(), {"data": lab}))
        s = ds.splits.get("test") or next(iter(ds.splits.values()))
        per = max(1, CROPS_PER_LAB // len(ds.classes))
        rows = [r for i in range(len(ds.classes)) for r in np.flatnonzero(s.labels == i)[:per]][:CROPS_PER_LAB]
        arrays[lab_name(lab)] = np.asarray(s.images[np.array(sorted(rows))])
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write(path, buf.getvalue())


def format_matrix(res: dict) -> str:
    """The lab-by-lab matrix as text: rows held-out lab, columns the lab scored (the diagonal: unseen)."""
    names = [lab["name"] for lab in res["labs"]]
    w = max(12, *(len(n) for n in names)) + 2
    lines = ["held out".ljust(w) + "".join(f"{n:>{w}}" for n in names) + "   (accuracy; [x]: the held-out lab)"]
    for row in names:
        cells = []
        for col in names:
            v = res["matrix"].get(row, {}).get(col)
            text = "-" if v is None else f"{100 * v:.1f}"
            cells.append(f"{f'[{text}]' if row == col else text:>{w}}")
        lines.append(row.ljust(w) + "".join(cells))
    return "\n".join(lines)
