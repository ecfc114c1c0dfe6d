"""bloodcell adapt: fit a trained model to a new lab's images without reading one label.

>>> from bloodcell.studies.adapt import adapt
>>> adapt("runs/kaggle", "lab_b/", "runs/kaggle-lab_b")          # re-estimate the BN statistics
>>> adapt("runs/kaggle", "lab_b/", "runs/kaggle-lab_b", entropy_steps=20, overwrite=True)

Batch normalisation keeps the mean and variance of the training labs' features; under another
microscope (stain, lamp, camera) they are off, and that is much of what breaks a model there
(Tsutsui et al., ICASSP 2023). ``adapt`` re-estimates them from the new lab's images (Schneider et
al. 2020, "BN adapt"); with ``entropy_steps`` it first takes that many steps that make the
predictions on those images more confident, changing only the normalisation layers' scale and
shift (Tent: Wang et al., ICLR 2021), then re-estimates the statistics under them. Group norm has no
statistics to re-estimate (it uses each image's own); Tent still applies to its scale and shift.

Only images are read (every image of the chosen split, whatever its class folder says); the labels
are read afterwards, to score the adapted and the original model on the splits not adapted on
(``metrics.json``: ``test`` and the rest, each with ``before``). A folder of unlabelled images (no
class folders: what a lab has before anyone labels a cell) is adapted on as a whole, and nothing is
scored. The output is a run folder
(``best.pt``, ``config.yaml``, ``adapt.json``, ``metrics.json``, ``DONE``) that evaluate, predict,
export, serve, train --init-from and adapt itself accept.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bloodcell.data import BatchLoader, Split, discover, problem_lines
from bloodcell.data.dataset import JoinedRows
from bloodcell.data.images import ImageError, decode_image
from bloodcell.data.layouts import IMAGE_EXTENSIONS, is_synthetic
from bloodcell.errors import BloodcellError
from bloodcell.inference.review import read_cells
from bloodcell.models.checkpoint import (
    load_model,
    model_kwargs_of,
    read_checkpoint,
    save_checkpoint,
)
from bloodcell.runfiles import (
    check_out_dir,
    clear_run_dir,
    mark_done,
    prepare_run_dir,
    run_lock,
    write_json,
    write_yaml,
)
from bloodcell.runtime import resolve_device, set_threads
from bloodcell.training.evaluate import checkpoint_data, evaluate_checkpoint

NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def unlabelled_folder(data: str, image_size: int, resize: str, log=print) -> Split | None:
    """The images directly in ``data`` decoded as the model's run would (size, resize), where it is a
    folder of images with no class folders; None where it is any layout with labels. An unreadable
    file is skipped with a line."""
    if is_synthetic(data) or not Path(data).is_dir():
        return None
    src = discover(data)
    if src.items or not any(p.kind == "unlabelled_images" for p in src.problems):
        return None
    found = decoded(sorted(p for p in Path(data).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS),
                    image_size, resize, log)
    if found is None:
        raise BloodcellError(f"no readable image in {data}")
    return found


def counted_cells(table: str, image_size: int, resize: str, log=print) -> Split | None:
    """Every white cell of the count a review's label table sits in (``DIR/labels.csv`` beside
    ``DIR/cells.csv``, which ``bloodcell count --out DIR`` wrote), decoded as the model's run would,
    labels not read; None where ``table`` is not a CSV beside a cells.csv. An unreadable crop is
    skipped with a line."""
    folder = Path(table).parent
    if Path(table).suffix.lower() != ".csv" or not (folder / "cells.csv").is_file():
        return None
    return decoded([folder / c.id for c in read_cells(folder).cells], image_size, resize, log)


def decoded(files: list[Path], image_size: int, resize: str, log=print) -> Split | None:
    """The files decoded as the model's run would (size, resize), labels all 0; None where none is
    readable. An unreadable file is skipped, and said."""
    images, paths = [], []
    for f in files:
        try:
            images.append(decode_image(str(f), image_size, resize))
            paths.append(str(f))
        except ImageError as e:
            log(f"adapt: skipped {f}: {e}")
    if not images:
        return None
    n = len(images)
    return Split(np.stack(images), np.zeros(n, dtype=np.int64), np.arange(n), paths)


def images_of(ds, split: str) -> Split:
    """The images of one split of the data set, or of all of them ("all"), labels not kept."""
    if split != "all" and split not in ds.splits:
        raise BloodcellError(f"split {split!r} not in the data; it has: {', '.join(ds.splits)}, all")
    parts = list(ds.splits.values()) if split == "all" else [ds.splits[split]]
    # several splits: a lazy concatenation, as join_sources makes (no copy of a memory map)
    images = parts[0].images if len(parts) == 1 else JoinedRows([p.images for p in parts])
    n = sum(len(p) for p in parts)
    return Split(images, np.zeros(n, dtype=np.int64), np.arange(n), [q for p in parts for q in p.paths])


def reestimate_bn(model: nn.Module, loader, device) -> int:
    """Replace every BatchNorm's running statistics by those of the loader's images (a cumulative
    average over all of them, not a moving one); returns how many layers were re-estimated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # running stats = the plain average over every batch seen
        m.train()
    with torch.no_grad():
        for x, _ in loader:
            model(x.to(device))
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    model.eval()
    return len(bns)


def entropy_minimise(model: nn.Module, loader, device, steps: int, lr: float) -> list[float]:
    """Tent: ``steps`` Adam steps on the mean prediction entropy of the loader's batches, through the
    normalisation layers' scale and shift only (BatchNorm on each batch's own statistics); returns the
    entropy of each step."""
    params = [p for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)]
    if not params:
        raise BloodcellError("--entropy-steps: the model has no normalisation layer to adapt")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    model.eval()  # dropout off; the norm layers on batch statistics:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    losses = []
    epoch = 0
    while len(losses) < steps:
        loader.set_epoch(epoch)
        for x, _ in loader:
            logp = torch.log_softmax(model(x.to(device)).float(), 1)
            loss = -(logp.exp() * logp).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if len(losses) == steps:
                break
        epoch += 1
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return losses


def adapt(run: str | Path, data: str, out: str | Path, *, split: str = "train", entropy_steps: int = 0,
          lr: float = 1e-3, batch_size: int = 64, seed: int = 0, cache_dir: str | None = None,
          device: str = "auto", overwrite: bool = False, log=print) -> dict:
    """Adapt run's model to data's images (no label read) into run folder ``out``; returns the
    metrics of the adapted and the original model on the splits not adapted on."""
    out = Path(out)
    if out.resolve() == Path(run).resolve():
        raise BloodcellError("--out must be another folder than the run adapted (its files are kept)")
    if entropy_steps < 0 or batch_size < 1 or not lr > 0:
        raise BloodcellError("--entropy-steps must be 0 or more, --batch-size at least 1, --lr positive")
    check_out_dir(out)
    prepare_run_dir(out, overwrite, resume=False)
    set_threads(0)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    model, meta = load_model(run, dev)
    ckpt = read_checkpoint(run)
    images = unlabelled_folder(str(data), meta["image_size"], meta["resize"], log)
    ds = None
    if images is None:
        ds = checkpoint_data(meta, data, cache_dir)
        for line in problem_lines(ds, data):
            log(line)
        images = images_of(ds, split)
    else:
        split = "all"  # no labels, no splits: every image
    log(f"adapt: {meta['path']} to {len(images):,} images of {data} ({split}), labels not read")
    norm = {"mean": meta["mean"], "std": meta["std"]}  # the model's own normalisation
    loader = BatchLoader(images, batch_size, device=dev, **norm)
    losses = []
    if entropy_steps:
        shuffled = BatchLoader(images, batch_size, shuffle=True, seed=seed, device=dev,
                               drop_last=len(images) > batch_size, **norm)
        torch.manual_seed(seed)
        losses = entropy_minimise(model, shuffled, dev, entropy_steps, lr)
        log(f"adapt: {entropy_steps} entropy steps, mean entropy {losses[0]:.3f} -> {losses[-1]:.3f}")
    n_bn = reestimate_bn(model, loader, dev)
    log(f"adapt: batch-norm statistics of {n_bn} layers re-estimated" if n_bn else
        "adapt: the model has no batch-norm layer (its normalisation uses each image's own statistics): "
        "no statistics to re-estimate")
    record = {"source_run": str(Path(run)), "source_checkpoint": meta["path"], "data": str(data), "split": split,
              "images": len(images), "batchnorm_layers": n_bn, "entropy_steps": entropy_steps, "lr": lr,
              "batch_size": batch_size, "seed": seed, "entropy": losses[:1] + losses[-1:],
              "labels_read": False, "minutes": (time.perf_counter() - t0) / 60}
    with run_lock(out, "adaptation"):  # one process at a time writes here
        prepare_run_dir(out, overwrite, resume=False)  # again, under the lock
        clear_run_dir(out)
        config = dict(meta.get("config", {}))
        save_checkpoint(out / "best.pt", model, model_name=ckpt["model"]["name"], model_kwargs=model_kwargs_of(ckpt),
                        classes=meta["classes"], image_size=meta["image_size"], resize=meta["resize"], config=config,
                        epoch=int(meta.get("epoch", 0)), best_metric=meta.get("best_metric"),
                        extra={"adapted": record})
        write_yaml(out / "config.yaml", config)
        write_json(out / "adapt.json", record)

        # Now, and only now, the labels: the adapted model against the original on the other splits.
        scored = [k for k in ds.splits if k != split] if ds is not None and split != "all" else []
        metrics = {}
        if scored:
            after = evaluate_checkpoint(out, data, split=",".join(scored), cache_dir=cache_dir, device=device, log=log)
            before = evaluate_checkpoint(run, data, split=",".join(scored), cache_dir=cache_dir, device=device,
                                         log=lambda _: None)
            for k in scored:
                metrics[k] = {**after[k], "before": {m: before[k][m] for m in ("accuracy", "macro_f1", "loss")
                                                     if m in before[k]}}
                log(f"{k}: accuracy {before[k]['accuracy']:.4f} -> {after[k]['accuracy']:.4f}  macro-F1 "
                    f"{before[k]['macro_f1']:.4f} -> {after[k]['macro_f1']:.4f}  (n={after[k]['n']})")
        else:
            log("adapt: no labelled split left to score (unlabelled images, or --split all)")
        write_json(out / "metrics.json", metrics)
        mark_done(out, time.strftime("%Y-%m-%d %H:%M:%S\n"))
    return metrics



