#!/usr/bin/env python
"""python bench/cam_pictures.py [--models a,b] [--epochs N] [--threads 2] [--out bench/out/cam]

Grad-CAM at the raw output against at the layer the head reads, on the same real cells, for every registered model. Trains one
small model per architecture from scratch on a seeded subset of the Kaggle set (TRAIN 500 cells per
class, TEST 50 per class, ``resize cell``, one model at a time, per-model settings in ``RECIPE``; a
finished run is reused), then, on the TEST images each model classifies correctly:

- before: the old map, Grad-CAM at the raw output of the last ``nn.Conv2d`` (before its max-pool,
  batch norm and activation), kept here only as a measurement;
- after: ``bloodcell.inference.cam.GradCAM``, at the output of the last feature block (what the head reads);

and prints, per model, the share with an empty map (no positive pixel) and the share whose peak
lies in the central half of the frame (the ``cell`` crop is centred on the stained cell). Writes
docs/cam_before_after.png (the same cells, every model, before and after) and OUT/cam.md/.json.
The maps are computed on one thread, one image at a time for the ms/map figure.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import OUT, ROOT, default_data, machine_info, machine_md, md_table, write_outputs
from PIL import Image, ImageDraw
from torch import nn

from bloodcell.config import TrainConfig, make_config
from bloodcell.inference.cam import GradCAM, central_peak, has_mass, overlay
from bloodcell.inference.predict import Predictor, decode_image
from bloodcell.models import list_models
from bloodcell.runfiles import atomic_write, read_csv
from bloodcell.training.train import train

CLASSES = ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")
SUBSET = {"TRAIN": 500, "TEST": 50, "TEST_SIMPLE": 0}  # per class; 0 = all
# Per-model settings over the common ones (64 px, batch 64, --epochs, precision auto):
# - the stride-32 baselines at 128 px, where their last block is 4 x 4 (at 64 px it is 2 x 2);
# - ResNet-18 takes 3-4x vgg3's time per epoch: fewer epochs;
# - torchvision's MobileNetV3 has BatchNorm momentum 0.01: at batch 64 (270 steps) its running
#   statistics are still far off and in eval mode it calls every cell one class; batch 16 takes 4x
#   the steps;
# - EfficientNet-B0 from scratch needs steps: at batch 64 it stayed at chance for the two epochs
#   tried (lr 2e-3 and 5e-4); at batch 16, lr 1e-3 and 20 epochs it learns (validation 23 % after
#   epoch 1, 70 % after 4, 84 % after 9; bench/RESULTS.md);
# - the two depthwise models train in fp32, as --precision auto now does on a CPU without AMX, where
#   bf16 autocast trains them no faster (bench/precision_speed.py: MobileNetV3-Small 0.51x,
#   EfficientNet-B0 1.04x of fp32); said here so the run is the same on any CPU.
RECIPE = {
    "resnet18": {"epochs": 6},
    "mobilenet_v3_small": {"image_size": 128, "batch_size": 16, "precision": "fp32"},
    "efficientnet_b0": {"image_size": 128, "batch_size": 16, "lr": 1e-3, "epochs": 20, "precision": "fp32"},
}


def make_subset(src: Path, dst: Path, seed: int = 0) -> Path:
    """A Kaggle-layout folder of symbolic links to a seeded share of each split and class."""
    images = src / "dataset2-master" / "images"
    rng = random.Random(seed)
    for split, n in SUBSET.items():
        for cls in CLASSES:
            out = dst / "images" / split / cls
            if out.is_dir():
                continue
            files = sorted((images / split / cls).glob("*.jpeg"))
            out.mkdir(parents=True)
            for f in sorted(rng.sample(files, n) if 0 < n < len(files) else files):
                (out / f.name).symlink_to(f.resolve())
    return dst


def train_one(name: str, data: Path, out: Path, epochs: int, threads: int) -> Path:
    """A finished run folder for one model (trained here unless one is there already)."""
    run = out / "runs" / name
    if (run / "DONE").exists():
        return run
    cfg = make_config(TrainConfig, {"data": str(data), "model": name, "image_size": 64, "resize": "cell",
                                    "epochs": epochs, "batch_size": 64, "threads": threads, "seed": 0}
                      | RECIPE.get(name, {}))
    t0 = time.perf_counter()
    train(cfg, run, overwrite=True, progress=False, log=lambda s: print(f"  {name}: {s}", flush=True))
    print(f"  {name}: trained in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return run


def last_conv(model: nn.Module, x: torch.Tensor) -> str:
    """The layer the old Grad-CAM read: the last nn.Conv2d whose output is still a map (> 1 x 1)."""
    sizes: dict[str, tuple] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: sizes.__setitem__(n, tuple(o.shape[2:])))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    return [n for n, s in sizes.items() if s != (1, 1)][-1]


def on_cell(heat: np.ndarray, image: np.ndarray, reach: float = 0.08) -> bool:
    """True when the map's peak lies on the stained cell: within ``reach`` x the frame's side of a
    violet pixel (blue above green by 45, the stain ``resize cell`` centres on)."""
    if not has_mass(heat):
        return False
    rgb = image.astype(np.int16)
    ys, xs = np.nonzero(rgb[..., 2] - rgb[..., 1] > 45)
    if not len(ys):
        return False
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return bool(np.min((ys - r) ** 2 + (xs - c) ** 2) <= (reach * heat.shape[0]) ** 2)


def measure(run: Path) -> dict:
    """Maps before and after on the TEST images the model classifies correctly, and their figures."""
    pred = Predictor(run, backend="torch", threads=1)
    rows = read_csv(run / "predictions_test.csv")
    images = np.stack([decode_image(r["path"], pred.image_size, pred.resize) for r in rows])
    labels = np.array([pred.classes.index(r["label"]) for r in rows])
    x = pred.preprocess(images)
    with torch.no_grad():
        guess = torch.cat([pred.model(b) for b in x.split(64)]).argmax(1).numpy()
    right = np.flatnonzero(guess == labels)
    layers = {"before": last_conv(pred.model, x), "after": None}
    out = {"model": pred.model_name, "image_size": pred.image_size, "n_test": len(rows),
           "n_correct": len(right), "paths": [rows[i]["path"] for i in range(len(rows))],
           "images": images, "labels": labels, "guess": guess}
    for when, layer in layers.items():
        cam = GradCAM(pred.model, x[:1], layer=layer)
        t0 = time.perf_counter()
        heat = np.concatenate([cam(x[i:i + 16], guess[i:i + 16].tolist(), normalize=False)
                               for i in range(0, len(x), 16)])
        ms = 1e3 * (time.perf_counter() - t0) / len(x)
        out[when] = {"layer": cam.layer_name, "heat": heat, "ms_per_map": ms,
                     "empty": float(np.mean([not has_mass(heat[i]) for i in right])),
                     "central": float(np.mean([central_peak(heat[i]) for i in right])),
                     "on_cell": float(np.mean([on_cell(heat[i], images[i]) for i in right]))}
    return out


def pick_cells(results: list[dict]) -> list[int]:
    """One TEST image per class (the same for every model): the one most models classify right."""
    labels = results[0]["labels"]
    votes = sum((r["guess"] == labels).astype(int) for r in results)
    return [int(np.flatnonzero(labels == c)[np.argmax(votes[labels == c])]) for c in np.unique(labels)]


def tile(image: np.ndarray, heat: np.ndarray | None, side: int) -> Image.Image:
    """The model input at side px, with the heat map (scaled by its maximum) over it where given."""
    big = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))
    if heat is None:
        return Image.fromarray(big)
    h = heat / heat.max() if heat.max() > 0 else heat
    return Image.fromarray(overlay(big, h))


def draw(results: list[dict], cells: list[int], side: int = 76) -> bytes:
    """Rows = models; per cell the input, then the map before and after; a red frame = a wrong call."""
    pad, left, top = 4, 150, 36
    width = left + len(cells) * (3 * side + 2 * pad + 14)
    canvas = Image.new("RGB", (width, top + len(results) * (side + pad) + pad), "white")
    d = ImageDraw.Draw(canvas)
    for j, i in enumerate(cells):
        x0 = left + j * (3 * side + 2 * pad + 14)
        d.text((x0, 4), CLASSES[results[0]["labels"][i]].lower(), fill="#111827")
        for k, what in enumerate(("input", "before", "after")):
            d.text((x0 + k * (side + pad), 20), what, fill="#4b5563")
    for row, r in enumerate(results):
        y = top + row * (side + pad)
        d.text((6, y + side // 2 - 12), r["model"], fill="#111827")
        d.text((6, y + side // 2 + 2), f"{r['image_size']} px, {r['after']['layer']}", fill="#6b7280")
        for j, i in enumerate(cells):
            x0 = left + j * (3 * side + 2 * pad + 14)
            for k, heat in enumerate((None, r["before"]["heat"][i], r["after"]["heat"][i])):
                canvas.paste(tile(r["images"][i], heat, side), (x0 + k * (side + pad), y))
            if r["guess"][i] != r["labels"][i]:
                d.rectangle((x0 - 2, y - 2, x0 + 3 * side + 2 * pad + 1, y + side + 1), outline="#dc2626", width=2)
    buf = io.BytesIO()
    canvas.quantize(256, dither=Image.Dither.FLOYDSTEINBERG).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def main() -> None:
    """Train (or reuse) one model per architecture, measure before and after, draw the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=default_data(), help="the Kaggle blood-cells folder")
    ap.add_argument("--models", default=",".join(list_models()))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="training threads (maps: always one)")
    ap.add_argument("--out", default=str(OUT / "cam"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    data = make_subset(Path(args.data), out / "data")
    names = args.models.split(",")
    results = []
    for name in names:
        run = train_one(name, data, out, args.epochs, args.threads)
        results.append(measure(run))
        r = results[-1]
        print(f"{name}: {r['n_correct']}/{r['n_test']} right; empty before {r['before']['empty']:.0%}, "
              f"after {r['after']['empty']:.0%}; central peak before {r['before']['central']:.0%}, "
              f"after {r['after']['central']:.0%}; peak on the cell before {r['before']['on_cell']:.0%}, "
              f"after {r['after']['on_cell']:.0%}", flush=True)
    cells = pick_cells(results)
    atomic_write(ROOT / "docs" / "cam_before_after.png", draw(results, cells))
    headers = ["model", "px", "TEST right", "layer before", "layer after", "empty maps", "peak central",
               "peak on the cell", "ms/map"]
    table = [[r["model"], r["image_size"], f"{r['n_correct']}/{r['n_test']}", f"`{r['before']['layer']}`",
              f"`{r['after']['layer']}`"]
             + [f"{r['before'][k]:.0%} → **{r['after'][k]:.0%}**" for k in ("empty", "central", "on_cell")]
             + [f"{r['before']['ms_per_map']:.0f} → {r['after']['ms_per_map']:.0f}"]
             for r in results]
    info = machine_info()
    md = machine_md(info) + "\n\n" + md_table(headers, table, "lrrllrrrr")
    keep = [{k: v for k, v in r.items() if k in ("model", "image_size", "n_test", "n_correct")}
            | {w: {k: v for k, v in r[w].items() if k != "heat"} for w in ("before", "after")}
            for r in results]
    write_outputs(str(out), "cam", md, {"machine": info, "cells": [results[0]["paths"][i] for i in cells],
                                        "models": keep})


if __name__ == "__main__":
    sys.exit(main())
