"""train(cfg): one training run into a run folder, resumable, evaluated on every split."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from bloodcell.checkpoint import model_kwargs_of, read_checkpoint, save_checkpoint
from bloodcell.config import TrainConfig, load_yaml, make_config
from bloodcell.data import (
    BatchLoader,
    Dataset,
    join_train,
    load_dataset,
    load_sources,
    problem_lines,
    select_classes,
    source_names,
)
from bloodcell.engine import (
    EMA,
    FitState,
    Step,
    TrainingDiverged,
    evaluate,
    fit,
    make_optimizer,
    make_scheduler,
)
from bloodcell.errors import BloodcellError, DataError
from bloodcell.metrics import binary_line, compute_metrics, per_source_metrics, split_metrics
from bloodcell.models import get_model, model_info
from bloodcell.runfiles import (
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
from bloodcell.runtime import resolve_device, resolve_precision, set_threads


def model_kwargs(cfg: TrainConfig, num_classes: int) -> dict:
    """The arguments that rebuild the model (saved in every checkpoint)."""
    kw = {"num_classes": num_classes, "image_size": cfg.image_size}
    options = model_info(cfg.model)["options"]
    if "norm" in options:
        kw["norm"] = cfg.norm
    if "pool_first" in options:
        kw["pool_first"] = True  # saved, so a checkpoint names its layer order (load_model)
    if cfg.stain_norm != "none":
        kw["stain_norm"] = cfg.stain_norm
    return kw


# The config keys that decide the data set (what is read, how it is decoded, split and grouped).
DATASET_KEYS = ("data", "image_size", "resize", "seed", "cache_dir", "fractions", "val_fraction",
                "group_regex", "group_by", "extra_train", "classes")


def dataset_key(cfg: TrainConfig) -> tuple:
    """Configs with equal keys load the same data set (one load serves them all)."""
    return tuple(getattr(cfg, k) for k in DATASET_KEYS)


def config_dataset(cfg: TrainConfig):
    """The data set a training config describes: its data, image size, resize, split and groups,
    and the train images of --extra-train (split by its own defaults and the same seed) joined."""
    ds = load_sources(cfg.data if isinstance(cfg.data, str) else list(cfg.data), image_size=cfg.image_size,
                      seed=cfg.seed, resize=cfg.resize, cache_dir=cfg.cache_dir, fractions=cfg.fractions,
                      val_fraction=cfg.val_fraction, group_regex=cfg.group_regex, group_by=cfg.group_by)
    if cfg.extra_train:
        try:
            extra = load_dataset(cfg.extra_train, image_size=cfg.image_size, seed=cfg.seed, resize=cfg.resize,
                                 cache_dir=cfg.cache_dir)
        except DataError as e:  # say which of the two data sets it is about
            raise DataError(f"--extra-train: {e}") from e
        ds = join_train(ds, extra)
    if cfg.classes:  # chosen after the split, so each kept image is in the split it would be in anyway
        ds, _ = select_classes(ds, list(cfg.classes), whose="--classes")
        missing = [c for c in cfg.classes if not any((s.labels == cfg.classes.index(c)).any()
                                                     for s in ds.splits.values())]
        if missing:
            raise DataError(f"--classes: no image of {', '.join(missing)} in {ds.root} (its classes: "
                            f"{', '.join(sorted({c for s in ds.sources for c in s['classes']}) or ds.classes)})")
    return ds


def build_model(cfg: TrainConfig, classes: list[str]) -> tuple[torch.nn.Module, dict]:
    """The model for a config, with local pretrained weights or another run's weights if asked."""
    kw = model_kwargs(cfg, len(classes))
    model = get_model(cfg.model, weights=cfg.weights, **kw) if cfg.weights else get_model(cfg.model, **kw)
    if cfg.init_from:
        src = read_checkpoint(cfg.init_from)
        layout = model_kwargs_of(src).get("pool_first"), kw.get("pool_first")
        if None not in layout and layout[0] != layout[1]:
            raise BloodcellError(f"--init-from {cfg.init_from}: its model pools after the ReLU (an "
                                 "older bloodcell's layer order), so its weights do not map onto "
                                 "today's: train it again")
        own = model.state_dict()
        # A stain-normalised model keeps its weights under "net.": match names without it.
        bare = {k.removeprefix("net."): k for k in own}
        take = {bare[k]: v for k, v in ((k.removeprefix("net."), v) for k, v in src["state_dict"].items())
                if k in bare and own[bare[k]].shape == v.shape}
        if not take:
            raise BloodcellError(f"--init-from {cfg.init_from}: no weights fit model {cfg.model}")
        model.load_state_dict(take, strict=False)
    return model, kw


def train(cfg: TrainConfig, out: str | Path, *, overwrite: bool = False, resume: bool = False,
          log=print, progress: bool = True, dataset: Dataset | None = None, on_epoch=None) -> dict:
    """Train one model as cfg says, into run folder ``out``; returns the metrics per split.

    ``on_epoch(epoch, history_row)`` is called after each epoch's validation (a tuner reports and
    prunes there); ``dataset`` reuses an already loaded Dataset. One process at a time trains in
    ``out`` (runfiles.run_lock): a second one is refused.
    """
    out = Path(out)
    if not resume:
        check_out_dir(out)
    prepare_run_dir(out, overwrite, resume)
    with contextlib.ExitStack() as held:  # the lock, from the first write in ``out`` to the end
        return _train(cfg, out, overwrite=overwrite, resume=resume, log=log, progress=progress,
                      dataset=dataset, on_epoch=on_epoch,
                      lock=lambda: held.enter_context(run_lock(out, "training")))


def _train(cfg: TrainConfig, out: Path, *, overwrite: bool, resume: bool, log, progress: bool,
           dataset: Dataset | None, on_epoch, lock) -> dict:
    """train's work; ``lock()`` locks the run folder (creating it), called before its first write."""
    if resume:
        cfg = make_config(TrainConfig, load_yaml(out / "config.yaml"))
        if (out / "DONE").exists():
            log(f"{out} is already finished; nothing to resume")
            return json.loads((out / "metrics.json").read_text())
    threads = set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()

    # data
    ds = dataset or config_dataset(cfg)
    if "train" not in ds.splits or "val" not in ds.splits:
        raise BloodcellError("the data needs a train and a val split (too few images or groups?)")
    log(f"data: {ds.root} ({ds.layout}), " + ", ".join(f"{k} {len(s):,}" for k, s in ds.splits.items())
        + f"; {len(ds.classes)} classes; {cfg.image_size} px; device {device}, {precision}, {threads} threads")
    if ds.extra_train:
        log(f"data: train also holds {sum(ds.extra_train['images'].values()):,} images of "
            f"{ds.extra_train['root']}'s train split ("
            + ", ".join(f"{c} {n:,}" for c, n in ds.extra_train["images"].items()) + ")")
    for k, (name, src) in enumerate(zip(source_names(ds), ds.sources, strict=True)):  # what each brought
        log(f"data: source {name} ({src['layout']}): " + ", ".join(
            f"{n} {int((s.sources == k).sum()):,}" for n, s in ds.splits.items() if (s.sources == k).any()))
    for line in problem_lines(ds, cfg.data):  # files skipped (unreadable, say): the run learns without them
        log(line)

    # model, optimiser, schedule (the model first: a refused --init-from writes nothing)
    model, kw = build_model(cfg, ds.classes)
    resolved = {**cfg.to_dict(), "resolved": {"device": str(device), "precision": precision,
                                              "threads": threads, "layout": ds.layout,
                                              "sources": source_names(ds) or [ds.root],
                                              "classes": ds.classes}}
    lock()
    prepare_run_dir(out, overwrite, resume)  # again, now that no other process can change it
    if not resume:
        clear_run_dir(out)
        write_yaml(out / "config.yaml", cfg.to_dict())
        write_json(out / "splits.json", ds.split_files())
    write_yaml(out / "resolved.yaml", resolved)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    # The loaders hand uint8 batches to the device, so a GPU also does the augmentation.
    train_loader = BatchLoader(ds.splits["train"], cfg.batch_size, shuffle=True, augment=cfg.augment,
                               seed=cfg.seed, drop_last=len(ds.splits["train"]) > cfg.batch_size, device=device,
                               blur=cfg.blur, mix=cfg.mix, mix_alpha=cfg.mix_alpha, num_classes=len(ds.classes))
    val_loader = BatchLoader(ds.splits["val"], max(cfg.batch_size, 256), device=device)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)
    steps = len(train_loader)
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.epochs * steps, int(cfg.warmup_epochs * steps))
    weights = None
    if cfg.class_weights:
        counts = np.bincount(ds.splits["train"].labels, minlength=len(ds.classes)).astype(float)
        weights = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32,
                               device=device)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    step = Step(optimizer, scheduler, device, precision, cfg.label_smoothing, weights, cfg.clip_grad,
                cfg.channels_last, ema)
    state = FitState()
    if resume and (out / "last.pt").is_file():
        ck = read_checkpoint(out / "last.pt")
        saved = model_kwargs_of(ck)
        if saved != kw:
            raise BloodcellError(f"--resume: {out / 'last.pt'} was written for another model layout "
                                 f"({saved}); start the run afresh with --overwrite")
        model.load_state_dict(ck["state_dict"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if ema is not None and ck.get("ema_state_dict"):
            ema.model.load_state_dict(ck["ema_state_dict"])
        state = FitState(**ck["fit_state"])
        log(f"resuming after epoch {state.epoch}")

    def save(name: str, st: FitState) -> None:
        net = ema.model if (ema is not None and name == "best.pt") else model
        extra = {"fit_state": {**st.__dict__, "history": list(st.history)}}
        if ema is not None and name == "last.pt":
            extra["ema_state_dict"] = {k: v.clone() for k, v in ema.model.state_dict().items()}
        save_checkpoint(out / name, net, model_name=cfg.model, model_kwargs=kw, classes=ds.classes,
                        image_size=cfg.image_size, resize=ds.resize, config=cfg.to_dict(), epoch=st.epoch,
                        optimizer=optimizer if name == "last.pt" else None,
                        scheduler=scheduler if name == "last.pt" else None,
                        best_metric=st.best_metric, extra=extra)
        if name == "last.pt":
            write_history(st.history, out / "history.csv")

    try:
        state = fit(model, train_loader, val_loader, step, epochs=cfg.epochs, monitor=cfg.monitor,
                    patience=cfg.patience, seed=cfg.seed, state=state,
                    val_metrics=lambda y, p: compute_metrics(y, p, ds.classes, n_boot=0),
                    save_last=lambda s: save("last.pt", s), save_best=lambda s: save("best.pt", s),
                    log=log, progress=progress, on_epoch=on_epoch)
    except TrainingDiverged as e:
        kept = f"the last good checkpoint (epoch {state.epoch}) is kept in {out / 'last.pt'}" \
            if (out / "last.pt").exists() else "no epoch finished, so no checkpoint was written"
        raise BloodcellError(f"training stopped: {e} in epoch {state.epoch + 1}; {kept}; "
                             "try a lower --lr or --precision fp32") from e
    train_minutes = (time.perf_counter() - t_start) / 60

    # evaluate the best checkpoint (read back from disk: what predict and serve will use)
    best = read_checkpoint(out / "best.pt")
    model.load_state_dict(best["state_dict"])
    metrics = {}
    for name in ("val", "test", "test_simple"):
        if name not in ds.splits:
            continue
        r = evaluate(model, BatchLoader(ds.splits[name], 256, device=device), device, precision,
                     cfg.channels_last, cfg.tta)
        s = ds.splits[name]
        metrics[name] = split_metrics(ds.classes, s.groups, r["labels"], r["probs"])
        if len(ds.sources) > 1:  # several sources: their validation is pooled, and shown apart too
            metrics[name]["per_source"] = per_source_metrics(ds.classes, s.groups, r["labels"], r["probs"],
                                                             s.sources, source_names(ds))
        write_predictions(out / f"predictions_{name}.csv", ds.splits[name].paths, r["labels"], r["probs"],
                          ds.classes)
    metrics["run"] = {"best_epoch": state.best_epoch, "epochs_run": state.epoch,
                      "best_val_" + cfg.monitor.removeprefix("val_"): state.best_metric,
                      "train_minutes": train_minutes,
                      "train_images_per_s": float(np.median([h["images_per_s"] for h in state.history])),
                      "precision": precision, "device": str(device), "threads": threads, "norm": cfg.norm}
    write_json(out / "metrics.json", metrics)
    mark_done(out, time.strftime("%Y-%m-%d %H:%M:%S\n"))
    for name in ("test", "test_simple", "val"):
        if name in metrics:
            m = metrics[name]
            log(f"{name}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
                f"group accuracy {m.get('group_accuracy', float('nan')):.4f}  {binary_line(m)}".rstrip())
            for root, ms in m.get("per_source", {}).items():
                log(f"  {name} of {root}: accuracy {ms['accuracy']:.4f}  macro-F1 {ms['macro_f1']:.4f}  "
                    f"(n={ms['n']})")
    return metrics
