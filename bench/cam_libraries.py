#!/usr/bin/env python
"""python bench/cam_libraries.py [--runs bench/out/cam/runs] [--rounds 3]

Which Grad-CAM to use: our own hook code (the paper's formula written out), captum's
``LayerGradCam`` and, where it is importable, pytorch-grad-cam's ``GradCAM`` (not a bloodcell
dependency: ``pip install --no-deps --target /tmp/gc grad-cam ttach opencv-python-headless`` and
run with ``PYTHONPATH=/tmp/gc``), all at the same layer (``bloodcell.inference.cam.target_layer``). Prints
the time of one map (batch 1, one thread, the target class given, median over 20 calls, per round)
and the largest difference between their maps, each scaled to [0, 1] by its maximum, over 16
images: for an untrained cnn4x32 and ResNet-18 at 64 px and for every trained run in --runs.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import OUT
from captum.attr import LayerGradCam

from bloodcell.inference.cam import target_layer
from bloodcell.models import get_model
from bloodcell.models.checkpoint import load_model

try:
    from pytorch_grad_cam import GradCAM as PGC
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
except ImportError:
    PGC = None


def activation_and_grad(model, layer, x, idx):
    """The layer's output A for batch x and d y_c / d A for the classes idx (a hook and autograd)."""
    saved = {}
    h = layer.register_forward_hook(lambda _m, _i, o: saved.setdefault("a", o))
    try:
        logits = model(x)
    finally:
        h.remove()
    (g,) = torch.autograd.grad(logits.gather(1, idx[:, None]).sum(), saved["a"])
    return saved["a"].detach(), g


def weighted_map(a, w, x):
    """ReLU(sum_k w_k A_k), bilinear to the input size: N x H x W."""
    cam = F.relu((w * a).sum(1, keepdim=True))
    return F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0].detach().numpy()


def ours(model, layer, x, idx):
    """The paper's map: ReLU(sum_k mean(d y_c / d A_k) A_k), bilinear to the input."""
    a, g = activation_and_grad(model, layer, x, idx)
    return weighted_map(a, g.mean((2, 3), keepdim=True), x)


def captum(lgc, x, idx):
    """captum.attr.LayerGradCam, ReLU'd, bilinear to the input."""
    cam = lgc.attribute(x, target=idx, relu_attributions=True)
    return F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0].detach().numpy()


def pgc(cam, x, idx):
    """pytorch-grad-cam: its own [0, 1] scaling (minimum subtracted) and OpenCV resize."""
    return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(i)) for i in idx])


def scaled(h):
    return h / np.maximum(h.reshape(len(h), -1).max(1), 1e-12)[:, None, None]


def median_ms(f, n=20):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def compare_one(label: str, model: torch.nn.Module, size: int, rounds: int) -> None:
    """Print how far the maps of one model differ, then the time of one map, round by round."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    torch.manual_seed(1)
    x1, x16 = torch.randn(1, 3, size, size), torch.randn(16, 3, size, size)
    name, layer = target_layer(model, x1)
    with torch.no_grad():
        i1, i16 = model(x1).argmax(1), model(x16).argmax(1)
    lgc = LayerGradCam(model, layer)
    a, b = scaled(ours(model, layer, x16, i16)), scaled(captum(lgc, x16, i16))
    line = f"{label} @ {size} px, layer {name}: max |captum - ours| {np.abs(a - b).max():.1e}"
    times = {"ours": lambda: ours(model, layer, x1, i1), "captum": lambda: captum(lgc, x1, i1)}
    if PGC is not None:
        cam = PGC(model=model, target_layers=[layer])
        c = pgc(cam, x16, i16)
        shifted = a - a.reshape(16, -1).min(1)[:, None, None]
        line += (f", max |pytorch-grad-cam - ours| {np.abs(c - a).max():.1e} "
                 f"({np.abs(c - scaled(shifted)).max():.1e} after subtracting each map's minimum)")
        times["pytorch-grad-cam"] = lambda: pgc(cam, x1, i1)
    print(line)
    for r in range(rounds):  # interleaved rounds: the machine is shared
        print(f"  round {r}: ms per map " + ", ".join(f"{k} {median_ms(f):.1f}" for k, f in times.items()),
              flush=True)


def main() -> None:
    """Time and compare the three on each model."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(OUT / "cam" / "runs"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = []
    for name in ("cnn4x32", "resnet18"):
        torch.manual_seed(0)
        models.append((f"{name} (untrained)", get_model(name, 4, 64), 64))
    for run in sorted(Path(args.runs).glob("*/best.pt")):
        model, meta = load_model(run)
        models.append((f"{meta['model']['name']} (trained)", model, meta["image_size"]))
    for label, model, size in models:
        compare_one(label, model, size, args.rounds)


if __name__ == "__main__":
    main()
