#!/usr/bin/env python
"""python bench/cam_methods.py [--models a,b] [--runs bench/out/cam/runs]

Grad-CAM against Grad-CAM++ (Chattopadhay et al. 2018), and the head's feature map against the
block before it, on the runs ``bench/cam_pictures.py`` trained (run that first): on the TEST cells
each model classifies right, the share of empty maps, of peaks in the central half and of peaks on
the stained cell (``cam_pictures.on_cell``). Both methods are written out here from the two papers
(one hook, one gradient), so they differ in the channel weights alone: Grad-CAM's mean gradient,
Grad-CAM++'s alpha-weighted positive gradients. Our Grad-CAM here reproduces
``bloodcell.inference.cam.GradCAM``'s figures (captum) to the percent. It is the measurement behind
``bloodcell.inference.cam`` offering Grad-CAM alone. Writes bench/out/cam_methods.md and .json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import OUT, machine_info, machine_md, md_table, write_outputs
from cam_libraries import activation_and_grad, weighted_map
from cam_pictures import on_cell

from bloodcell.inference.cam import GradCAM, central_peak, has_mass
from bloodcell.inference.predict import Predictor, decode_image
from bloodcell.models import list_models
from bloodcell.runfiles import read_csv

# The block before the head's, where it still has a larger map (stride 16 against 32).
EARLIER = {"mobilenet_v3_small": "features.11", "efficientnet_b0": "features.7"}


def maps(model, layer, x, idx, method: str) -> np.ndarray:
    """Raw maps (>= 0) at the input size for the classes idx."""
    a, g = activation_and_grad(model, layer, x, idx)
    if method == "Grad-CAM":
        return weighted_map(a, g.mean((2, 3), keepdim=True), x)
    # Grad-CAM++, eq. 19 with the exponential's derivatives, as its reference code does
    denom = 2 * g**2 + a.sum((2, 3), keepdim=True) * g**3
    alpha = g**2 / torch.where(denom != 0, denom, torch.ones_like(denom))
    return weighted_map(a, (alpha * F.relu(g)).sum((2, 3), keepdim=True), x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(list_models()))
    ap.add_argument("--runs", default=str(OUT / "cam" / "runs"))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, result = [], []
    for name in args.models.split(","):
        run = Path(args.runs) / name
        if not (run / "DONE").exists():
            print(f"{run} is not a finished run: run bench/cam_pictures.py first", file=sys.stderr)
            return 1
        pred = Predictor(run, backend="torch", threads=1)
        tests = read_csv(run / "predictions_test.csv")
        images = np.stack([decode_image(r["path"], pred.image_size, pred.resize) for r in tests])
        labels = np.array([pred.classes.index(r["label"]) for r in tests])
        x = pred.preprocess(images)
        cam = GradCAM(pred.model, x[:1])
        model, modules = cam.model, dict(cam.model.named_modules())
        with torch.no_grad():
            guess = torch.cat([model(b) for b in x.split(64)]).argmax(1)
        right = np.flatnonzero(guess.numpy() == labels)
        for layer in [cam.layer_name] + ([EARLIER[name]] if name in EARLIER else []):
            for method in ("Grad-CAM", "Grad-CAM++"):
                heat = np.concatenate([maps(model, modules[layer], x[i:i + 16], guess[i:i + 16], method)
                                       for i in range(0, len(x), 16)])
                r = {"model": name, "layer": layer, "method": method, "n_right": len(right),
                     "empty": float(np.mean([not has_mass(heat[i]) for i in right])),
                     "central": float(np.mean([central_peak(heat[i]) for i in right])),
                     "on_cell": float(np.mean([on_cell(heat[i], images[i]) for i in right]))}
                result.append(r)
                rows.append([name, f"`{layer}`", method, len(right)]
                            + [f"{r[k]:.0%}" for k in ("empty", "central", "on_cell")])
                print(" ".join(str(c) for c in rows[-1]), flush=True)
    md = machine_md(machine_info()) + "\n\n" + md_table(
        ["model", "layer", "method", "right calls", "empty maps", "peak central", "peak on the cell"],
        rows, "lllrrrr")
    write_outputs(args.out, "cam_methods", md, {"machine": machine_info(), "rows": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
