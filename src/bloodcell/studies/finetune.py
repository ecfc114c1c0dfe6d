"""A fine-tune on a lab's few labelled cells that never ends below the model it starts from.

>>> from bloodcell.studies.finetune import finetune
>>> finetune(cfg, "runs/my-lab-10")      # cfg.init_from: the run; cfg.data: the lab's labelled cells
>>> finetune(cfg, "runs/my-lab-10", adapt_data="my-lab/unlabelled")   # BN statistics from a folder

``train --init-from RUN`` comes here when the lab's labelled cells are few (at most ``SMALL`` of each
class; ``--labels-per-class K`` draws K of each class from the train split, otherwise the train and
val splits together are the labelled cells). Twenty cells can make a model worse as easily as
better, so:

1. The start is RUN's model adapted to the lab (``bloodcell adapt``'s batch-norm re-estimation on
   ``adapt_data``'s images; for a review's labels.csv in a count folder, on every cell the count
   found; else on the labelled cells'); it already is what adapt would give the lab.
2. The fine-tune is conservative (``Recipe``): the classifier and the normalisation layers' scale
   and shift learn, the adapted batch-norm statistics stay (a batch of sixteen cells is a worse
   estimate of them than every image adapted on), a few short epochs at a low rate.
3. Which of the two the run keeps is chosen by the labelled cells alone: K-fold cross-validation
   over them (whole groups per fold, so the cells of one field stay together), the start and the
   fine-tune each scored on every held-out fold. The fine-tune is kept only if its accuracy there
   beats the start's by more than ``margin`` standard errors of the gain (the error counted over
   groups); otherwise the run says so in one line and keeps the start. Labels a review chose
   least sure first vouch for the doubtful cells only: where the start was adapted on the lab's
   images (``adapt_on``), the images it is surer of than of any labelled cell are the ones no
   label speaks for, and every answer the fine-tune changes there counts against it (``reach``,
   ``choose``). No label but the labelled cells' is read; the test split is never read before the
   choice is written.
4. The run folder (``best.pt``, ``config.yaml``, ``finetune.json``, ``metrics.json``,
   ``predictions_test.csv``, ``DONE``) records the cells learnt from per class, both models'
   cross-validated figures and which was kept; ``metrics.json``'s ``test`` scores the kept model on
   the lab's test split, after the choice.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bloodcell.config import FIELD_DEFAULTS, TrainConfig, make_config
from bloodcell.data import BatchLoader, Dataset, Split
from bloodcell.data.build import config_dataset
from bloodcell.data.dataset import JoinedRows
from bloodcell.data.folds import fold_ids
from bloodcell.data.sources import few_labels, select_classes, take
from bloodcell.errors import BloodcellError
from bloodcell.metrics import compute_metrics, split_metrics
from bloodcell.models.checkpoint import (
    load_model,
    model_kwargs_of,
    read_checkpoint,
    save_checkpoint,
)
from bloodcell.models.gate import BRANCHES, ColourGate
from bloodcell.runfiles import (
    check_out_dir,
    clear_run_dir,
    mark_done,
    prepare_run_dir,
    run_lock,
    write_json,
    write_predictions,
    write_yaml,
)
from bloodcell.runtime import check_stop, resolve_device, set_threads
from bloodcell.studies.adapt import (
    NORM_LAYERS,
    counted_cells,
    images_of,
    reestimate_bn,
    unlabelled_folder,
)
from bloodcell.training.engine import class_balance, predict_probs

SMALL = 50  # labelled cells per class up to which train --init-from takes this path
LEARNS = ("head", "norm", "all")
SEEN = 0.05  # a class the start reads in this share of the lab's images needs labelled cells


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the start is fine-tuned (the train config's keys of the same name override these)."""

    learns: str = "norm"  # head: the last linear layer; norm: it and the norm layers' scale and shift; all
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 16
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    augment: str = "light"  # flips and quarter turns: a cell's class does not change with them
    class_weights: bool = True  # each class weighs alike in the loss, however few of its cells were labelled
    seed: int = 0


def recipe_of(cfg: TrainConfig, given: Iterable[str] | None = None, learns: str = "norm") -> Recipe:
    """The recipe with the config's values where they were given (``given``: the keys set on the
    command line or in --config; None: those that differ from TrainConfig's defaults)."""
    if learns not in LEARNS:
        raise BloodcellError(f"learns must be one of {', '.join(LEARNS)}, got {learns!r}")
    own = [f.name for f in dataclasses.fields(Recipe) if f.name != "learns"]
    keys = set(given) if given is not None else {k for k in own if getattr(cfg, k) != FIELD_DEFAULTS[k]}
    return Recipe(learns=learns, **{k: getattr(cfg, k) for k in own if k in keys})


# ---------------------------------------------------------------------------------------------
# the model: adapted start, fine-tune, predictions


def learnable(model: nn.Module, learns: str) -> list[nn.Parameter]:
    """The parameters a recipe trains: the last linear layer (the classifier), with ``norm`` also
    every normalisation layer's scale and shift, with ``all`` every parameter."""
    if learns == "all":
        return list(model.parameters())
    # The classifier: the last linear layer (of each branch, in a gated model).
    parts = [getattr(model, b) for b in BRANCHES] if isinstance(model, ColourGate) else [model]
    heads = [[m for m in part.modules() if isinstance(m, nn.Linear)][-1:] for part in parts]
    if not all(heads):
        raise BloodcellError("the model has no linear classifier to fine-tune; use learns='all'")
    params = [p for head in heads for p in head[0].parameters()]
    if learns == "norm":
        params += [p for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)]
    return params


def balancing_weights(labels: np.ndarray, model: nn.Module) -> torch.Tensor:
    """Loss weights per class of the model's output that make each labelled class weigh alike: a
    review's labels come lopsided (the cells it shows first are of the classes the start is least
    sure of). A class with no labelled cell keeps weight 1 (it has no loss term to weigh)."""
    n_out = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    return class_balance(labels, n_out, present_only=True)


def tune(start: nn.Module, cells: Split, recipe: Recipe, device, mean, std) -> nn.Module:
    """A copy of ``start`` fine-tuned on ``cells`` as the recipe says; batch-norm statistics kept
    (the layers in eval mode), dropout on. ``start`` is left as it was."""
    model = copy.deepcopy(start).to(device)
    params = learnable(model, recipe.learns)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    loader = BatchLoader(cells, min(recipe.batch_size, len(cells)), shuffle=True, augment=recipe.augment,
                         seed=recipe.seed, device=device, mean=mean, std=std)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, recipe.epochs * len(loader)))
    weight = balancing_weights(cells.labels, model).to(device) if recipe.class_weights else None
    torch.manual_seed(recipe.seed)
    for epoch in range(recipe.epochs):
        loader.set_epoch(epoch)
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()  # the adapted statistics, not each small batch's
        for x, y in loader:
            check_stop()
            loss = F.cross_entropy(model(x.to(device)).float(), y.to(device), weight=weight,
                                   label_smoothing=recipe.label_smoothing)
            if not torch.isfinite(loss):
                raise BloodcellError(f"fine-tune: the loss became {loss.item()}; try a lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def probs_of(model: nn.Module, split: Split, device, mean, std) -> np.ndarray:
    """The model's class probabilities for every image of the split, in order."""
    return predict_probs(model, BatchLoader(split, 256, device=device, mean=mean, std=std), device,
                         channels_last=False)[0]


def adapted(model: nn.Module, images: Split, device, mean, std, batch_size: int = 64) -> int:
    """Re-estimate the model's batch-norm statistics on ``images`` in place (``bloodcell adapt``);
    returns how many layers were."""
    return reestimate_bn(model, BatchLoader(images, batch_size, device=device, mean=mean, std=std), device)


# ---------------------------------------------------------------------------------------------
# the choice: cross-validation over the labelled cells


def paired_gain(start_ok: np.ndarray, tuned_ok: np.ndarray, groups: np.ndarray,
                labels: np.ndarray | None = None) -> tuple[float, float]:
    """The accuracy gain of the fine-tune over the start on the same cells, and its standard error
    counted over groups (cells of one field are not independent: the cluster-robust error). With
    ``labels``, each class present weighs alike (the gain in balanced accuracy): a class the labels
    show twice counts as much as one they show twenty times, and its noise with it."""
    d = tuned_ok.astype(float) - start_ok.astype(float)
    if labels is None:
        w = np.full(len(d), 1 / len(d))
    else:
        _, cls, per = np.unique(labels, return_inverse=True, return_counts=True)
        w = 1 / (per[cls] * len(per))
    gain = float((w * d).sum())
    _, g = np.unique(groups, return_inverse=True)
    sums = np.bincount(g, weights=w * (d - gain))
    k = len(sums)
    se = float(np.sqrt(k / (k - 1) * (sums ** 2).sum())) if k > 1 else float("inf")
    return gain, se


def cross_validate(start: nn.Module, cells: Split, classes: list[str], recipe: Recipe, folds: int, device,
                   mean, std, log=print) -> dict:
    """The start and the fine-tune scored on each held-out fold of the labelled cells (folds of
    whole groups, stratified by class); the fine-tune of each fold learns from the other folds."""
    folds = min(folds, len(np.unique(cells.groups)))
    if folds < 2:
        return {"folds": folds, "n": len(cells), "reason": "fewer than two groups of labelled cells"}
    fold = fold_ids(cells.labels, cells.groups, folds, recipe.seed)
    p_start = probs_of(start, cells, device, mean, std)
    p_tuned = np.zeros_like(p_start)
    for k in range(folds):
        held = np.flatnonzero(fold == k)
        if len(held) == 0:
            continue
        rest = np.flatnonzero(fold != k)
        if len(rest) == 0:  # every cell in this fold (a handful of cells): nothing to learn from
            p_tuned[held] = p_start[held]
            continue
        model = tune(start, take(cells, rest), recipe, device, mean, std)
        p_tuned[held] = probs_of(model, take(cells, held), device, mean, std)
        log(f"fine-tune: fold {k + 1}/{folds}: start {np.mean(p_start[held].argmax(1) == cells.labels[held]):.3f}, "
            f"fine-tuned {np.mean(p_tuned[held].argmax(1) == cells.labels[held]):.3f} (n={len(held)})")
    y = cells.labels
    gain, se = paired_gain(p_start.argmax(1) == y, p_tuned.argmax(1) == y, cells.groups, y)

    def scores(p: np.ndarray) -> dict:
        ok = p.argmax(1) == y
        m = compute_metrics(y, p, classes, n_boot=0)
        return {"balanced_accuracy": float(np.mean([ok[y == c].mean() for c in np.unique(y)])),
                "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    return {"folds": folds, "n": len(cells), "groups": len(np.unique(cells.groups)), "start": scores(p_start),
            "finetune": scores(p_tuned), "gain": gain, "gain_se": se}


def reach(p_images: np.ndarray, p_cells: np.ndarray, p_tuned: np.ndarray) -> dict:
    """How far the labelled cells vouch for the lab's images: the share of the images (start's
    probabilities ``p_images``) that the start is surer of than of any labelled cell (``p_cells``),
    and the share of those whose answer the fine-tune (``p_tuned``, on the images) changes."""
    threshold = float(p_cells.max(1).max())
    beyond = p_images.max(1) > threshold
    changed = (p_tuned.argmax(1) != p_images.argmax(1))[beyond]
    return {"images": len(p_images), "threshold": threshold, "beyond": float(beyond.mean()),
            "changed": float(changed.mean()) if len(changed) else 0.0}


def choose(cv: dict, margin: float) -> tuple[str, str]:
    """'finetune' or 'start', and why in one line: the fine-tune only where its cross-validated
    gain is positive and more than ``margin`` standard errors, and, where ``cv['reach']`` says some of
    the lab's images are surer than any labelled cell (labels chosen least sure first vouch for the
    doubtful cells only), still so when every answer the fine-tune changes on those is counted as an
    error: (1 - u) gain - u changed > margin x se x (1 - u), u their share."""
    if "gain" not in cv:
        return "start", f"fine-tune not tried: {cv['reason']} to cross-validate on; the adapted start is kept"
    if cv.get("unlabelled_classes"):
        return "start", (f"no labelled cell of {', '.join(cv['unlabelled_classes'])}, which the start reads in "
                         f"{100 * SEEN:g} % or more of the lab's images: the labels cannot show a fine-tune keeps "
                         "them, so the adapted start is kept")
    a, b = cv["start"]["balanced_accuracy"], cv["finetune"]["balanced_accuracy"]
    gain, se = cv["gain"], cv["gain_se"]
    said = (f"on the {cv['n']} labelled cells ({cv['folds']}-fold, by group; each class weighed alike) the fine-tune reads "
            f"{100 * b:.1f} % against the adapted start's {100 * a:.1f} % (gain {100 * gain:+.1f} ± {100 * se:.1f})")
    if not (gain > 0 and gain > margin * se + 1e-9):  # one cell more of n is 1/n ± 1/n: not enough
        why = "not positive" if gain <= 0 else f"within {margin:g} standard error{'s' * (margin != 1)}"
        return "start", said + f"; the gain is {why}, so the labels cannot show it is better: the adapted start is kept"
    reach = cv.get("reach")
    if reach and reach["beyond"] > 0:
        u, f = reach["beyond"], reach["changed"]
        net = (1 - u) * gain - u * f
        said += (f"; {100 * u:.1f} % of the lab's {reach['images']:,} images are surer than any labelled cell (start's "
                 f"probability above {reach['threshold']:.2f}), and the fine-tune changes {100 * f:.1f} % of their "
                 f"answers: counted as errors, the gain on the lab is {100 * net:+.1f}")
        if not net > margin * se * (1 - u) + 1e-9:
            return "start", said + (", so the labels cannot show it is better there: the adapted start is kept "
                                     "(cells labelled in random order, bloodcell review --order random, reach them)")
    return "finetune", said + ": the fine-tune is kept"


# ---------------------------------------------------------------------------------------------
# one run


def safe_finetune(start_run: str | Path, cells: Split, classes: list[str], out: str | Path, *,
                  recipe: Recipe = Recipe(), adapt_on: Split | None = None, adapt_name: str = "",
                  test: Split | None = None, folds: int = 5, margin: float = 1.0, device: str = "auto",
                  config: dict | None = None, overwrite: bool = False, log=print) -> dict:
    """Fine-tune ``start_run``'s model on ``cells`` (labels in ``classes``, the model's classes) into
    run folder ``out``, keeping the adapted start where the cells' cross-validation cannot show the
    fine-tune is better; ``test`` (optional) is scored after the choice. Returns metrics.json's dict."""
    out = Path(out)
    check_out_dir(out)
    prepare_run_dir(out, overwrite, resume=False)
    if len(cells) == 0:
        raise BloodcellError("fine-tune: no labelled cell to learn from")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    model, meta = load_model(start_run, dev)
    ckpt = read_checkpoint(start_run)
    if [c.lower() for c in meta["classes"]] != [c.lower() for c in classes]:
        raise BloodcellError(f"fine-tune: the cells' classes ({', '.join(classes)}) are not the model's "
                             f"({', '.join(meta['classes'])})")
    mean, std = meta["mean"], meta["std"]
    counts = {c: int((cells.labels == i).sum()) for i, c in enumerate(classes)}
    log("fine-tune: " + f"{len(cells)} labelled cells (" + ", ".join(f"{c} {n}" for c, n in counts.items())
        + f"), from {meta['path']}")

    # the start: the model adapted to the lab's images (no label read)
    images = adapt_on if adapt_on is not None else cells
    n_bn = adapted(model, images, dev, mean, std)
    log(f"fine-tune: the start is the model adapted to {len(images):,} images of "
        f"{adapt_name or 'the labelled cells'} ({n_bn} batch-norm layers re-estimated)")

    # the choice, on the labelled cells alone; a class the start reads on the lab's images but no
    # labelled cell shows cannot be vouched for (a fine-tune without it learns to never say it)
    p_images = probs_of(model, images, dev, mean, std)
    share = np.bincount(p_images.argmax(1), minlength=len(classes)) / len(images)
    cv = cross_validate(model, cells, classes, recipe, folds, dev, mean, std, log=log)
    cv["unlabelled_classes"] = [c for i, c in enumerate(classes) if counts[c] == 0 and share[i] >= SEEN]
    tuned = None
    if choose(cv, margin)[0] == "finetune" and adapt_on is not None:
        # what the labels cannot see: the lab's images surer than any labelled cell
        tuned = tune(model, cells, recipe, dev, mean, std)
        cv["reach"] = reach(p_images, probs_of(model, cells, dev, mean, std), probs_of(tuned, images, dev, mean, std))
    kept, why = choose(cv, margin)
    log(f"fine-tune: {why}")
    if kept == "finetune" and tuned is None:
        tuned = tune(model, cells, recipe, dev, mean, std)
    final = tuned if kept == "finetune" else model
    record = {"source_run": str(start_run), "source_checkpoint": meta["path"], "cells": counts,
              "labelled_cells": len(cells), "adapted_on": {"images": len(images),
                                                           "what": adapt_name or "the labelled cells"},
              "batchnorm_layers": n_bn, "recipe": dataclasses.asdict(recipe), "margin": margin, "cv": cv,
              "kept": kept, "why": why, "test_read": False, "minutes": (time.perf_counter() - t0) / 60}

    with run_lock(out, "fine-tune"):  # one process at a time writes here
        prepare_run_dir(out, overwrite, resume=False)  # again, under the lock
        clear_run_dir(out)
        cfg = {**(config or meta.get("config", {})), "image_size": meta["image_size"], "resize": meta["resize"]}
        save_checkpoint(out / "best.pt", final, model_name=ckpt["model"]["name"], model_kwargs=model_kwargs_of(ckpt),
                        classes=meta["classes"], image_size=meta["image_size"], resize=meta["resize"], config=cfg,
                        epoch=recipe.epochs if kept == "finetune" else int(meta.get("epoch", 0)),
                        best_metric=cv.get(kept, {}).get("accuracy"), extra={"finetune": record},
                        mean=mean, std=std)
        write_yaml(out / "config.yaml", cfg)
        # as every run folder: which images were learnt from (the labelled cells) and scored on
        write_json(out / "splits.json", {"train": list(cells.paths),
                                         **({"test": list(test.paths)} if test is not None else {})})
        write_json(out / "finetune.json", record)
        # only now, with the choice written, the test split
        metrics = {"run": {"labelled_cells": {"train": counts}, "kept": kept, "train_minutes": record["minutes"],
                           "best_epoch": record["recipe"]["epochs"] if kept == "finetune" else 0},
                   "finetune": record}
        if test is not None and len(test):
            p = probs_of(final, test, dev, mean, std)
            metrics["test"] = split_metrics(meta["classes"], test.groups, test.labels, p)
            write_predictions(out / "predictions_test.csv", test.paths, test.labels, p, meta["classes"])
            log(f"test: accuracy {metrics['test']['accuracy']:.4f}  macro-F1 {metrics['test']['macro_f1']:.4f}  "
                f"(n={len(test)}, the {kept} kept)")
        write_json(out / "metrics.json", metrics)
        mark_done(out, time.strftime("%Y-%m-%d %H:%M:%S\n"))
    return metrics


# ---------------------------------------------------------------------------------------------
# train --init-from


def labelled_cells(cfg: TrainConfig, classes: list[str]) -> tuple[Dataset, Split, dict[str, int]]:
    """The lab's data at the start model's size and resize, in its classes: the data set, its
    labelled cells (``labels_per_class`` K: K per class drawn from the train split; otherwise the
    train and val splits together) and their count per class. The test split is left in the data
    set, untouched."""
    ds = config_dataset(dataclasses.replace(cfg, labels_per_class=0))
    unknown = [c for c in ds.classes if c.lower() not in {m.lower() for m in classes}]
    if unknown:
        raise BloodcellError(f"--init-from: the model does not know {', '.join(unknown)} (its classes: "
                             f"{', '.join(classes)}); keep the others with --classes")
    ds, _ = select_classes(ds, classes)
    if cfg.labels_per_class:
        ds = few_labels(ds, cfg.labels_per_class, cfg.seed, splits=("train",))
        cells = ds.splits["train"]
    else:
        parts = [ds.splits[k] for k in ("train", "val") if k in ds.splits]
        cells = parts[0] if len(parts) == 1 else Split(  # lazily joined: no copy of a memory map
            JoinedRows([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
            np.concatenate([p.groups for p in parts]), [q for p in parts for q in p.paths])
    return ds, cells, {c: int((cells.labels == i).sum()) for i, c in enumerate(classes)}


def finetune(cfg: TrainConfig, out: str | Path, *, given: Iterable[str] | None = None, adapt_data: str | None = None,
             learns: str = "norm", folds: int = 5, margin: float = 1.0, overwrite: bool = False, log=print,
             progress: bool = True) -> dict:
    """``train --init-from``: the never-worse fine-tune where the lab's labelled cells are few (at
    most SMALL per class), else the plain training run (training.train). Returns the run's metrics."""
    from bloodcell.training.train import train  # lazy: only the plain path needs the training run

    if not cfg.init_from:
        raise BloodcellError("fine-tune: give the run to start from (--init-from)")
    meta = read_checkpoint(cfg.init_from)
    lab = make_config(TrainConfig, cfg.to_dict(), {"image_size": meta["image_size"], "resize": meta["resize"]})
    if (cfg.image_size, cfg.resize) != (lab.image_size, lab.resize):
        log(f"fine-tune: the lab's cells are read at the model's {lab.image_size} px, {lab.resize}")
    set_threads(cfg.threads)
    ds, cells, counts = labelled_cells(lab, meta["classes"])
    if max(counts.values()) > SMALL:
        log(f"fine-tune: more than {SMALL} labelled cells of a class ({max(counts.values())}): a full training "
            "run from the model, validated on the val split" + (" (--adapt-data not used)" if adapt_data else ""))
        return train(cfg, out, overwrite=overwrite, log=log, progress=progress)
    adapt_on, adapt_name = None, adapt_data or ""
    if adapt_data:
        adapt_on = unlabelled_folder(adapt_data, lab.image_size, lab.resize, log)
        if adapt_on is None:  # a labelled layout: its images, every split, labels not read
            adapt_on = images_of(config_dataset(make_config(TrainConfig, lab.to_dict(), {"data": adapt_data,
                                                                                         "labels_per_class": 0})),
                                 "all")
    elif isinstance(cfg.data, str):  # a review's labels.csv in a count folder: every cell it counted
        adapt_on = counted_cells(cfg.data, lab.image_size, lab.resize, log)
        adapt_name = f"{Path(cfg.data).parent / 'cells.csv'} (every cell counted)" if adapt_on is not None else ""
    config = {**lab.to_dict(), "classes": list(meta["classes"])}
    return safe_finetune(cfg.init_from, cells, list(meta["classes"]), out, recipe=recipe_of(cfg, given, learns),
                         adapt_on=adapt_on, adapt_name=adapt_name, test=ds.splits.get("test"), folds=folds,
                         margin=margin, device=cfg.device, config=config, overwrite=overwrite, log=log)
