"""The compare report's Grad-CAM gallery: per class, a few right and a few wrong test cells of one
model, each beside its overlay (``cam.showcase``).

Still from saved files only: the maps come from the run's saved ``best.pt`` and the cells from its
``predictions_test.csv``. A run whose checkpoint is gone (a compare folder copied without its
``*.pt``) gets the same cells as plain thumbnails and a note, so ``bloodcell report`` still works.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from bloodcell.inference.cam import overlay, showcase, upscale
from bloodcell.inference.predict import Predictor
from bloodcell.report.document import Block, Figure
from bloodcell.report.figures import THUMB, font, load_thumbnail
from bloodcell.report.format import fixed, num, short
from bloodcell.runfiles import read_csv

N_RIGHT, N_WRONG = 2, 2  # per class


def cam_cells(d: Path, run: Path, rows: list[dict]) -> tuple[list[dict], list[str], bool]:
    """The showcase's cells with ``image`` (THUMB px) and ``overlay`` (None without a checkpoint),
    the paths that could not be read, and whether the maps were drawn."""
    ckpt = run / "best.pt"
    if ckpt.is_file():
        # threads: this process's own setting (a report inside `compare` keeps its threads)
        pred = Predictor(ckpt, backend="torch", threads=torch.get_num_threads())
        cells, missing = pred.examples("test", N_RIGHT, N_WRONG, bases=(d,))
        for c in cells:
            c["image"] = upscale(c["image"], THUMB)
            c["overlay"] = overlay(c["image"], c["heat"] / max(float(c["heat"].max()), 1e-12))
        return cells, missing, True
    cells, missing = [], []
    for r in showcase(rows, N_RIGHT, N_WRONG):
        img = load_thumbnail(r["path"], d)
        if img is None:
            missing.append(r["path"])
        else:
            cells.append({**r, "image": img, "overlay": None})
    return cells, missing, False


def fig_cams(cells: list[dict], classes: list[str]) -> bytes:
    """One row per true class: its right calls, then its mistakes, each as image and overlay side by
    side (image alone without maps), captioned 'right' or '→ predicted', with the confidence."""
    pair = 2 * THUMB if any(c["overlay"] is not None for c in cells) else THUMB
    pad, cap, left = 10, 18, 110
    ncols = N_RIGHT + N_WRONG
    canvas = Image.new("RGB", (left + ncols * (pair + pad), len(classes) * (THUMB + cap + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    big, small = font(12), font(11)
    for row, label in enumerate(classes):
        y = pad + row * (THUMB + cap + pad)
        draw.text((6, y + cap + THUMB / 2), short(label), font=big, fill="#111827", anchor="lm")
        mine = [c for c in cells if c.get("label") == label]
        if not mine:
            draw.text((left, y + cap + THUMB / 2), "no test images shown", font=small, fill="#6b7280",
                      anchor="lm")
        for k, c in enumerate(mine[:ncols]):
            x = left + k * (pair + pad)
            right = c.get("pred") == label
            conf = fixed(num(c.get("confidence")), 2)
            text = f"right ({conf})" if right else f"→ {short(str(c.get('pred', '?')))} ({conf})"
            draw.text((x, y), text, font=small, fill="#047857" if right else "#b91c1c")
            canvas.paste(Image.fromarray(c["image"]), (x, y + cap))
            if c["overlay"] is not None:
                canvas.paste(Image.fromarray(c["overlay"]), (x + THUMB, y + cap))
    out = io.BytesIO()
    canvas.quantize(256, dither=Image.Dither.FLOYDSTEINBERG).save(out, format="PNG", optimize=True)
    return out.getvalue()


def cam_blocks(d: Path, run: Path, name: str, classes: list[str], slug: str) -> list:
    """One model's gallery of right and wrong test cells with their Grad-CAM, or why there is none."""
    rows = read_csv(run / "predictions_test.csv")
    if not rows:
        return []
    cells, missing, with_maps = cam_cells(d, run, rows)
    classes = classes or list(dict.fromkeys(r.get("label") for r in rows))
    out: list = [Block("p", f"**{name}, where it looks**: per class, right calls (the surest first, "
                            f"the least sure last) and its {N_WRONG} most confident mistakes among the "
                            "test images, each beside its Grad-CAM for the predicted class (red: that "
                            "class's evidence).")]
    if cells:
        out.append(Figure(f"cams_{slug}", fig_cams(cells, classes),
                          alt=f"Grad-CAM overlays of right and wrong test cells of {name}"))
    if not with_maps:
        out.append(Block("note", f"No Grad-CAM: `{run.name}/best.pt` is not in this folder, so the "
                                 "cells are shown without their maps."))
    if missing:
        out.append(Block("note", f"{len(missing)} of these test image(s) could not be read and are "
                                 "left out: " + ", ".join(f"`{p}`" for p in missing[:3])
                         + (" …" if len(missing) > 3 else "")))
    return out

