"""train(cfg): one training run into a run folder, resumable, evaluated on every split."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bloodcell.catalog import MEAN, STD
from bloodcell.config import TrainConfig, load_yaml, make_config
from bloodcell.data import (
    BatchLoader,
    Dataset,
    problem_lines,
    source_names,
)
from bloodcell.data.build import config_dataset
from bloodcell.errors import BloodcellError, ConfigError
from bloodcell.metrics import binary_line, compute_metrics, per_source_metrics, split_metrics
from bloodcell.models.build import build_model, pretrained_recipe
from bloodcell.models.checkpoint import model_kwargs_of, read_checkpoint, save_checkpoint
from bloodcell.models.pretrained import new_parameters, preflight, read_state
from bloodcell.runfiles import (
    check_not_in_use,
    check_out_dir,
    clear_run_dir,
    mark_done,
    prepare_run_dir,
    run_lock,
    write_history,
    write_json,
    write_predictions,
    write_yaml,
)
from bloodcell.runtime import check_batch_memory, resolve_device, resolve_precision, set_threads
from bloodcell.training import distributed
from bloodcell.training.distributed import Reported, World
from bloodcell.training.engine import (
    EMA,
    FitState,
    Step,
    TrainingDiverged,
    class_balance,
    evaluate,
    fit,
    make_optimizer,
    make_scheduler,
)
from bloodcell.training.launch import launch
from bloodcell.training.tracking import Tracker, check_trackers, flat_metrics


def train(cfg: TrainConfig, out: str | Path, *, overwrite: bool = False, resume: bool = False,
          log=print, progress: bool = True, dataset: Dataset | None = None, on_epoch=None) -> dict:
    """Train one model as cfg says, into run folder ``out``; returns the metrics per split.

    ``on_epoch(epoch, history_row)`` is called after each epoch's validation (a tuner reports and
    prunes there); ``dataset`` reuses an already loaded Dataset. Under torchrun every process calls
    this; rank 0 alone writes the run folder and logs. With ``cfg.nproc`` > 1 (and no torchrun)
    the run is launched on that many processes here (bloodcell.training.launch) and this one waits. One
    run at a time trains in ``out`` (runfiles.run_lock, held by rank 0): a second one is refused.
    """
    out = Path(out)
    if cfg.folds and cfg.fold is None:
        raise ConfigError("folds: train() runs one model (give fold too); bloodcell.studies.kfold.cross_validate "
                          "runs every fold (bloodcell train --folds K)")
    check_trackers(cfg.log)  # a tracker that is not installed: refused before anything is written
    if not resume:
        check_out_dir(out)
    world = distributed.setup()
    with distributed.peers_guard(world, out), contextlib.ExitStack() as held:
        # the lock, from the first write in ``out`` to the end (rank 0's; a launching parent's never)
        return _train(world, cfg, out, overwrite, resume, log if world.main else _silent,
                      progress and world.main, dataset, on_epoch,
                      lock=lambda: held.enter_context(run_lock(out, "training")))


def _silent(msg: str) -> None:
    """The log of a rank other than 0."""


def launch_train(cfg: TrainConfig, out: Path, *, overwrite: bool, resume: bool, log, progress: bool,
                 on_epoch=None, splits: list[str] | None = None) -> dict:
    """train() on cfg.nproc processes of this machine (torch's elastic launcher); the metrics.
    ``splits``: the only splits the processes load (those of a Dataset given to train)."""
    log(f"training on {cfg.nproc} processes (torch.distributed), rank 0 writes {out}")
    quiet = [] if progress else ["--quiet"]
    on_row = (lambda row: on_epoch(row["epoch"], row)) if on_epoch is not None else None
    forward = None if log is print else log  # rank 0's lines to a caller's own log (a tuner's trial log)
    if resume:
        launch(["train", "--resume", str(out), *quiet], cfg.nproc, out, on_row, resume=True,
                           log=forward, splits=splits)
    else:
        with tempfile.TemporaryDirectory(prefix="bloodcell-nproc-") as tmp:
            given = Path(tmp) / "config.yaml"
            write_yaml(given, cfg.to_dict())
            launch(["train", "--config", str(given), "--out", str(out), "--overwrite", *quiet],
                               cfg.nproc, out, on_row, log=forward, splits=splits)
    return json.loads((out / "metrics.json").read_text())


def _train(world: World, cfg: TrainConfig, out: Path, overwrite: bool, resume: bool, log, progress: bool,
           dataset: Dataset | None, on_epoch, lock) -> dict:
    """train's work, step by step; ``lock()`` locks the run folder (creating it) before its first write."""
    # prepare: a resumed run reads its own config (and a finished one returns at once)
    given, done = distributed.on_main(world, lambda: _prepare(out, overwrite, resume))
    if resume:
        cfg = make_config(TrainConfig, given)
        if done is not None:
            log(f"{out} is already finished; nothing to resume")
            return done
    if cfg.nproc > 1 and not world.active:
        return launch_train(cfg, out, overwrite=overwrite, resume=resume, log=log, progress=progress,
                            on_epoch=on_epoch, splits=list(dataset.splits) if dataset is not None else None)
    check_batch_memory(cfg.batch_size, cfg.image_size)
    threads = set_threads(cfg.threads, world.local_size)
    device = world.device(resolve_device(cfg.device))
    if device.type == "cuda" and world.local_size > torch.cuda.device_count():  # NCCL: one GPU per process
        raise (BloodcellError if world.main else Reported)(
            f"{world.local_size} processes on this machine but {torch.cuda.device_count()} GPU(s): "
            "give --nproc (or torchrun's --nproc-per-node) at most the number of GPUs, or --device cpu")
    hardware_precision = resolve_precision(cfg.precision, device)  # bf16 where there is none: said first
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    if cfg.pretrained and not cfg.weights:
        preflight(cfg.model)  # offline and not in a cache: say so before reading any data
    if cfg.weights:
        read_state(cfg.weights)  # a file that is not weights: said before any data is read

    # data (each machine's first process decodes into the cache, the others then read it)
    ds = distributed.node_first(world, lambda: _load(cfg, dataset))
    _log_data(ds, cfg, world, device, threads, log)

    # model (before any write: a refused --init-from or a missing download writes nothing)
    model, kw, precision, recipe = _model(world, cfg, ds, device, hardware_precision, log)
    mean, std = (recipe["mean"], recipe["std"]) if recipe else (MEAN, STD)
    resolved = {**cfg.to_dict(), "resolved": {"device": str(device), "precision": precision,
                                              "threads": threads, "processes": world.size,
                                              "layout": ds.layout, "sources": source_names(ds) or [ds.root],
                                              "classes": ds.classes, "mean": list(mean), "std": list(std),
                                              **({"pretrained": recipe} if recipe else {})}}

    # the run folder's first files
    def write_start() -> None:
        lock()
        prepare_run_dir(out, overwrite, resume)  # again, now that no other process can change it
        if not resume:
            clear_run_dir(out)
            write_yaml(out / "config.yaml", cfg.to_dict())
            write_json(out / "splits.json", ds.split_files())
        write_yaml(out / "resolved.yaml", resolved)

    distributed.on_main(world, write_start)

    # fit, then score the best checkpoint on every split
    metrics = _fit(world, cfg, ds, out, model, kw, recipe, mean, std, resolved, device, precision, resume, log,
                   progress, on_epoch, finish=lambda state, step: _final_metrics(
                       world, cfg, ds, model, step, out, state, device, precision, threads, t_start, mean,
                       std, recipe))
    _log_metrics(metrics, log)
    return metrics


def _model(world: World, cfg: TrainConfig, ds: Dataset, device, hardware_precision: str, log):
    """The model (its rebuild arguments), the precision it trains in, and its pretrained recipe."""
    recipe = pretrained_recipe(cfg)
    model, kw = distributed.node_first(world, lambda: build_model(cfg, ds.classes), ordered=False)
    # auto measures one training step each way on this CPU (not across ranks, which must agree)
    shape = None if world.active else (min(cfg.batch_size, len(ds.splits["train"])), 3, cfg.image_size, cfg.image_size)
    precision = resolve_precision(cfg.precision, device, model, shape, log=log)
    why = " (auto: bf16 measured no faster than fp32 on this CPU)" if precision != hardware_precision else ""
    log(f"model: {cfg.model}, {sum(p.numel() for p in model.parameters()):,} parameters, {precision}{why}")
    if recipe:
        _log_recipe(recipe, cfg, log)
    return model, kw, precision, recipe


def _fit(world: World, cfg: TrainConfig, ds: Dataset, out: Path, model, kw: dict, recipe: dict | None, mean, std,
         resolved: dict, device, precision: str, resume: bool, log, progress: bool, on_epoch, finish) -> dict:
    """Loaders, optimiser, schedule, the state resumed from last.pt, fit (checkpoints, trackers),
    then ``finish(state, step)``: the final metrics."""
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    train_loader, val_loader = _loaders(cfg, ds, device, world, mean, std)
    # A pretrained backbone learns at backbone_lr x lr (frozen for freeze_epochs); the new head at lr.
    head = new_parameters(model) if recipe else None
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, head=head,
                               backbone_lr=cfg.backbone_lr)
    steps = len(train_loader)
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.epochs * steps, int(cfg.warmup_epochs * steps),
                               freeze_steps=int(cfg.freeze_epochs * steps) if recipe else 0)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    step = Step(optimizer, scheduler, device, precision, cfg.label_smoothing, _class_weights(cfg, ds, device),
                cfg.clip_grad, cfg.channels_last, ema, world if world.active else None)
    state = FitState()
    ck = distributed.on_main(world, lambda: _read_last(out, kw) if resume else None)
    if ck is not None:
        model.load_state_dict(ck["state_dict"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if ema is not None and ck.get("ema_state_dict"):
            ema.model.load_state_dict(ck["ema_state_dict"])
        state = FitState(**ck["fit_state"])
        log(f"resuming after epoch {state.epoch}")

    def save(name: str, st: FitState) -> None:
        if not world.main:
            return
        net = ema.model if (ema is not None and name == "best.pt") else model
        extra = {"fit_state": {**st.__dict__, "history": list(st.history)}}
        if ema is not None and name == "last.pt":
            extra["ema_state_dict"] = {k: v.clone() for k, v in ema.model.state_dict().items()}
        save_checkpoint(out / name, net, model_name=cfg.model, model_kwargs=kw, classes=ds.classes,
                        image_size=cfg.image_size, resize=ds.resize, config=cfg.to_dict(), epoch=st.epoch,
                        optimizer=optimizer if name == "last.pt" else None,
                        scheduler=scheduler if name == "last.pt" else None,
                        best_metric=st.best_metric, extra=extra, mean=mean, std=std)
        if name == "last.pt":
            write_history(st.history, out / "history.csv")

    # Each rank keeps the batch-norm statistics of its own shard (fit averages them before each
    # validation and checkpoint) instead of taking rank 0's at every step.
    net = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False) \
        if world.active else model
    # the experiment trackers (--log): rank 0 alone records the run
    tracker = Tracker(cfg.log if world.main else (), out, name=str(out), config=resolved, uri=cfg.mlflow_uri,
                      log=log, tags={"bloodcell.model": cfg.model,
                                     **({"bloodcell.fold": str(cfg.fold)} if cfg.folds else {})})

    def epoch_done(epoch: int, row: dict) -> None:
        tracker.epoch(epoch, row)
        if on_epoch is not None:
            on_epoch(epoch, row)

    ok = False
    try:
        state = fit(net, train_loader, val_loader, step, epochs=cfg.epochs, monitor=cfg.monitor,
                    patience=cfg.patience, seed=cfg.seed, state=state,
                    val_metrics=lambda y, p: compute_metrics(y, p, ds.classes, n_boot=0),
                    save_last=lambda s: save("last.pt", s), save_best=lambda s: save("best.pt", s),
                    log=log, progress=progress, on_epoch=epoch_done)
        metrics = finish(state, step)
        tracker.final(flat_metrics(metrics))
        tracker.artifact(out / "metrics.json", out / "history.csv", out / "resolved.yaml")
        ok = True
    except TrainingDiverged as e:
        kept = f"the last good checkpoint (epoch {state.epoch}) is kept in {out / 'last.pt'}" \
            if (out / "last.pt").exists() else "no epoch finished, so no checkpoint was written"
        raise (BloodcellError if world.main else Reported)(
            f"training stopped: {e} in epoch {state.epoch + 1}; {kept}; try a lower --lr or --precision fp32") from e
    finally:
        tracker.close(ok)
    return metrics


def _prepare(out: Path, overwrite: bool, resume: bool) -> tuple[dict | None, dict | None]:
    """Check the run folder; for --resume, the run's own config and, if it finished, its metrics."""
    check_not_in_use(out, "training")  # a run writing there now: not a case for --overwrite
    prepare_run_dir(out, overwrite, resume)
    if not resume:
        return None, None
    given = load_yaml(out / "config.yaml")
    done = json.loads((out / "metrics.json").read_text()) if (out / "DONE").exists() else None
    return given, done


def _load(cfg: TrainConfig, dataset: Dataset | None) -> Dataset:
    """The run's data set: the one given, or the config's; it must have a train and a val split."""
    ds = dataset or config_dataset(cfg)
    keep = distributed.kept_splits()
    if keep is not None:  # launched for a caller that gave train a Dataset of these splits only
        ds = dataclasses.replace(ds, splits={k: v for k, v in ds.splits.items() if k in keep})
    if "train" not in ds.splits or "val" not in ds.splits:
        raise BloodcellError("the data needs a train and a val split (too few images or groups?)")
    return ds


def _log_data(ds: Dataset, cfg: TrainConfig, world: World, device, threads: int, log) -> None:
    """What the run reads: splits, classes, each source's share, the labelled cells, skipped files."""
    on = f"; {world.size} processes" if world.active else ""
    log(f"data: {ds.root} ({ds.layout}), " + ", ".join(f"{k} {len(s):,}" for k, s in ds.splits.items())
        + f"; {len(ds.classes)} classes; {cfg.image_size} px; device {device}, {threads} threads"
        + on)
    if ds.extra_train:
        log(f"data: train also holds {sum(ds.extra_train['images'].values()):,} images of "
            f"{ds.extra_train['root']}'s train split ("
            + ", ".join(f"{c} {n:,}" for c, n in ds.extra_train["images"].items()) + ")")
    for k, (name, src) in enumerate(zip(source_names(ds), ds.sources, strict=True)):  # what each brought
        log(f"data: source {name} ({src['layout']}): " + ", ".join(
            f"{n} {int((s.sources == k).sum()):,}" for n, s in ds.splits.items() if (s.sources == k).any()))
    for name, counts in ds.labelled.items():
        log(f"data: {name} keeps {cfg.labels_per_class} labelled cells per class (--labels-per-class): "
            + ", ".join(f"{c} {n}" for c, n in counts.items()))
    for line in problem_lines(ds, cfg.data):  # files skipped (unreadable, say): the run learns without them
        log(line)


def _log_recipe(recipe: dict, cfg: TrainConfig, log) -> None:
    """What a --pretrained run starts from and how it fine-tunes (the weights' own normalisation)."""
    mean, std = recipe["mean"], recipe["std"]
    log(f"pretrained: {recipe['source']} ({recipe['file']}), normalised with mean "
        f"{', '.join(f'{v:.3f}' for v in mean)} / std {', '.join(f'{v:.3f}' for v in std)}; "
        f"lr {recipe['head_lr']:g} for the new classifier, {recipe['backbone_lr']:g} for the backbone"
        + (f", frozen for {cfg.freeze_epochs:g} epochs" if cfg.freeze_epochs else ""))
    if recipe["input_size"] != cfg.image_size:
        log(f"pretrained: the weights were trained at {recipe['input_size']} px; this run uses "
            f"{cfg.image_size} px (--image-size {recipe['input_size']} matches them)")


def _loaders(cfg: TrainConfig, ds: Dataset, device, world: World, mean, std) -> tuple[BatchLoader, BatchLoader]:
    """The training loader (shuffled, augmented) and the validation loader; they hand uint8 batches to
    the device, so a GPU also does the augmentation."""
    train_loader = BatchLoader(ds.splits["train"], cfg.batch_size, shuffle=True, augment=cfg.augment,
                               seed=cfg.seed, drop_last=len(ds.splits["train"]) > cfg.batch_size, device=device,
                               blur=cfg.blur, mix=cfg.mix, mix_alpha=cfg.mix_alpha, num_classes=len(ds.classes),
                               stain_jitter=cfg.stain_jitter, gray=cfg.gray, zoom=cfg.zoom, rank=world.rank, world=world.size,
                               mean=mean, std=std)
    val_loader = BatchLoader(ds.splits["val"], max(cfg.batch_size, 256), device=device, rank=world.rank,
                             world=world.size, mean=mean, std=std)
    return train_loader, val_loader


def _class_weights(cfg: TrainConfig, ds: Dataset, device) -> torch.Tensor | None:
    """--class-weights: the loss weighted by inverse class frequency in train; else None."""
    if not cfg.class_weights:
        return None
    return class_balance(ds.splits["train"].labels, len(ds.classes)).to(device)


def _read_last(out: Path, kw: dict) -> dict | None:
    """--resume: last.pt (rank 0's file, on every rank), refused if written for another model layout."""
    if not (out / "last.pt").is_file():
        return None
    ck = read_checkpoint(out / "last.pt")
    saved = model_kwargs_of(ck)
    if saved != kw:
        raise BloodcellError(f"--resume: {out / 'last.pt'} was written for another model layout "
                             f"({saved}); start the run afresh with --overwrite")
    return ck


def _log_metrics(metrics: dict, log) -> None:
    """The final figures of test, test_simple and val (and each source's)."""
    for name in ("test", "test_simple", "val"):
        if name in metrics:
            m = metrics[name]
            log(f"{name}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
                f"group accuracy {m.get('group_accuracy', float('nan')):.4f}  {binary_line(m)}".rstrip())
            for root, ms in m.get("per_source", {}).items():
                log(f"  {name} of {root}: accuracy {ms['accuracy']:.4f}  macro-F1 {ms['macro_f1']:.4f}  "
                    f"(n={ms['n']})")


def _final_metrics(world: World, cfg: TrainConfig, ds: Dataset, model, step: Step, out: Path, state: FitState,
                   device, precision, threads: int, t_start: float, mean, std, recipe: dict | None) -> dict:
    """Evaluate the best checkpoint on every split (each rank its share, gathered); rank 0 writes the
    predictions, metrics.json and DONE."""
    train_minutes = (time.perf_counter() - t_start) / 60

    # evaluate the best checkpoint (read back from disk: what predict and serve will use)
    model.load_state_dict(distributed.on_main(world, lambda: read_checkpoint(out / "best.pt")["state_dict"]))
    metrics = {}
    for name in ("val", "test", "test_simple"):
        if name not in ds.splits:
            continue
        loader = BatchLoader(ds.splits[name], 256, device=device, rank=world.rank, world=world.size, mean=mean,
                             std=std)
        r = evaluate(model, loader, device, precision, cfg.channels_last, cfg.tta, step.world)
        s = ds.splits[name]
        metrics[name] = split_metrics(ds.classes, s.groups, r["labels"], r["probs"])
        if len(ds.sources) > 1:  # several sources: their validation is pooled, and shown apart too
            metrics[name]["per_source"] = per_source_metrics(ds.classes, s.groups, r["labels"], r["probs"],
                                                             s.sources, source_names(ds))
        if world.main:
            write_predictions(out / f"predictions_{name}.csv", ds.splits[name].paths, r["labels"], r["probs"],
                              ds.classes)
    metrics["run"] = {"best_epoch": state.best_epoch, "epochs_run": state.epoch,
                      "best_val_" + cfg.monitor.removeprefix("val_"): state.best_metric,
                      "train_minutes": train_minutes,
                      "train_images_per_s": float(np.median([h["images_per_s"] for h in state.history])),
                      "precision": precision, "device": str(device), "threads": threads, "norm": cfg.norm,
                      "processes": world.size, **({"pretrained": recipe} if recipe else {})}
    if ds.labelled:  # the labelled cells the run read, per split and class
        metrics["run"]["labelled_cells"] = ds.labelled

    def finish() -> None:
        write_json(out / "metrics.json", metrics)
        mark_done(out, time.strftime("%Y-%m-%d %H:%M:%S\n"))

    distributed.on_main(world, finish)
    return metrics
