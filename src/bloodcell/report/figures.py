"""The reports' shared look and the compare report's figures, drawn with matplotlib's object API
(``Figure``, never pyplot: no global state, no backend switched in the caller's process) and
returned as small PNG bytes.

Shared: ``style()`` (draw every figure inside it), ``figure``, ``png``, the palette, the percent
axis, thumbnails and the font. Compare report: learning curves, the validation overlay, confusion
matrices (the crosslab report's too), recall per class, accuracy against cost, and the gallery of
confident errors (Pillow). The tuning and crosslab reports draw their own figures, in
``report/tune.py`` and ``report/lab_out.py``, with these helpers.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import font_manager
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter, PercentFormatter
from PIL import Image, ImageDraw, ImageFont

from bloodcell.data.images import saved_image
from bloodcell.report.format import fixed, metric, num, short

# Okabe & Ito (2008), ordered so the first five are far apart; yellow last (faint on white).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
THUMB = 96
DPI = 110


# --- shared: style, canvas, PNG ----------------------------------------------------------------


def style():
    """The reports' look, for the figures drawn inside it (a context manager)."""
    return matplotlib.rc_context({
        "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
        "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False,
        "axes.spines.right": False, "axes.grid": True, "grid.color": "#e5e7eb", "grid.linewidth": 0.7,
        "axes.edgecolor": "#6b7280", "axes.titleweight": "bold", "figure.facecolor": "white",
    })


def figure(w: float, h: float) -> Figure:
    """A blank figure of w x h inches."""
    return Figure(figsize=(w, h), layout="constrained")


def png(fig: Figure) -> bytes:
    """PNG bytes, palette-quantised (256 colours): plots stay sharp, the file stays small."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white", bbox_inches="tight", pad_inches=0.06)
    im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    im = im.quantize(256, dither=Image.Dither.NONE)
    out = io.BytesIO()
    im.save(out, format="PNG", optimize=True)
    return out.getvalue()


def pct_axis(ax, axis: str = "y") -> None:
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(PercentFormatter(1.0, decimals=0))


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#6b7280")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


# --- the compare report -------------------------------------------------------------------------


def fig_learning_curves(models: list[dict], histories: dict, colors: dict) -> bytes:
    """Small multiples: per model, loss (top) and accuracy (bottom), train dashed, val solid."""
    n = len(models)
    blocks = math.ceil(n / 5)
    ncols = math.ceil(n / blocks)
    w = max(2.3 * ncols, 5.0)
    fig = figure(w, 3.9 * blocks + 0.3)
    axs = fig.subplots(2 * blocks, ncols, squeeze=False)
    loss_max = max([np.nanmax(np.r_[h.get("train_loss", []), h.get("val_loss", []), 0])
                    for h in histories.values() if h] + [1.0])
    loss_max = min(loss_max, 5.0) * 1.05
    for i in range(blocks * ncols):
        a_loss, a_acc = axs[2 * (i // ncols), i % ncols], axs[2 * (i // ncols) + 1, i % ncols]
        if i >= n:
            a_loss.set_visible(False)
            a_acc.set_visible(False)
            continue
        row = models[i]
        name, c = row["model"], colors[row["model"]]
        a_loss.set_title(name, color=c, loc="left")
        h = histories.get(name)
        if not h:
            _empty(a_loss, "no history saved")
            _empty(a_acc, "")
            continue
        ep = h["epoch"]
        for ax, key, label in ((a_loss, "loss", "loss"), (a_acc, "acc", "accuracy")):
            if f"train_{key}" in h:
                ax.plot(ep, h[f"train_{key}"], "--", color=c, lw=1.4, alpha=0.8, label="train")
            if f"val_{key}" in h:
                ax.plot(ep, h[f"val_{key}"], "-", color=c, lw=1.8, label="val")
            best = num(row.get("best_epoch"))
            if best is not None:
                ax.axvline(best, color="#6b7280", ls=":", lw=1)
            ax.set_ylabel(label if i % ncols == 0 else "")
        a_loss.set_ylim(0, loss_max)
        a_acc.set_ylim(0, 1.0)
        pct_axis(a_acc)
        a_acc.set_xlabel("epoch")
    keys = [Line2D([], [], color="#374151", ls="--", lw=1.4, label="train"),
            Line2D([], [], color="#374151", lw=1.8, label="validation"),
            Line2D([], [], color="#6b7280", ls=":", lw=1, label="chosen epoch")]
    fig.legend(handles=keys, loc="outside upper right", ncols=3, frameon=False)
    return png(fig)


def fig_val_overlay(models: list[dict], histories: dict, colors: dict) -> bytes | None:
    """Validation accuracy and loss of every model on one pair of axes."""
    have = [r for r in models if histories.get(r["model"])]
    if not have:
        return None
    fig = figure(10.0, 3.6)
    a_acc, a_loss = fig.subplots(1, 2)
    for row in have:
        h, c = histories[row["model"]], colors[row["model"]]
        if "val_acc" in h:
            a_acc.plot(h["epoch"], h["val_acc"], "-o", color=c, lw=1.8, ms=3, label=row["model"])
        if "val_loss" in h:
            a_loss.plot(h["epoch"], h["val_loss"], "-o", color=c, lw=1.8, ms=3, label=row["model"])
    a_acc.set_title("validation accuracy", loc="left")
    a_loss.set_title("validation loss", loc="left")
    a_acc.set_ylim(0, 1)
    pct_axis(a_acc)
    for ax in (a_acc, a_loss):
        ax.set_xlabel("epoch")
    fig.legend(handles=a_acc.get_lines() or a_loss.get_lines(), loc="outside right upper", frameon=False)
    return png(fig)


def fig_confusions(models: list[dict], classes: list[str], colors: dict) -> bytes:
    """Per model, the test confusion matrix normalised by row (true class), with counts."""
    n, k = len(models), len(classes)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    cell = 0.62 if k <= 4 else 0.45
    side = max(2.6, cell * k + 1.3)
    fig = figure(side * ncols + 0.8, side * nrows + 0.3)
    axs = fig.subplots(nrows, ncols, squeeze=False)
    names = [c if len(c) <= 10 else c[:9] + "…" for c in classes]
    im = None
    for i, ax in enumerate(axs.flat):
        if i >= n:
            ax.set_visible(False)
            continue
        row = models[i]
        ax.set_title(row["model"], color=colors[row["model"]], loc="left")
        cm = metric(row, "test", "confusion")
        if not cm or len(cm) != k:
            _empty(ax, "no test metrics")
            continue
        cm = np.asarray(cm, dtype=float)
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.grid(False)
        fs = 8 if k <= 4 else 6
        for r in range(k):
            for c in range(k):
                ax.text(c, r, f"{100 * norm[r, c]:.0f}%\n({int(cm[r, c])})", ha="center", va="center",
                        fontsize=fs, color="white" if norm[r, c] > 0.55 else "#1f2937")
        ax.tick_params(length=0)
        ax.set_xticks(range(k), names, rotation=35, ha="right")
        ax.set_yticks(range(k), names if i % ncols == 0 else [""] * k)
        ax.set_xlabel("predicted")
        if i % ncols == 0:
            ax.set_ylabel("true")
        for s in ax.spines.values():
            s.set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=axs, shrink=0.6, label="share of the true class",
                     format=lambda v, _: f"{100 * v:.0f}%")
    return png(fig)


def fig_recall(models: list[dict], classes: list[str], colors: dict) -> bytes | None:
    """Grouped bars: test recall per class, one bar per model."""
    have = [r for r in models if isinstance(metric(r, "test", "per_class"), dict)]
    if not have:
        return None
    w = min(11.0, 2.0 + 0.35 * len(have) * len(classes) + 0.5 * len(classes))
    fig = figure(max(w, 6.5), 3.4)
    ax = fig.subplots()
    width = 0.8 / len(have)
    x = np.arange(len(classes))
    for j, row in enumerate(have):
        pc = row["test"]["per_class"]
        vals = [num((pc.get(c) or {}).get("recall")) or 0.0 for c in classes]
        ax.bar(x - 0.4 + width * (j + 0.5), vals, width * 0.92, color=colors[row["model"]],
               label=row["model"])
    ax.set_xticks(x, classes)
    ax.set_ylim(0, 1.0)
    pct_axis(ax)
    ax.set_ylabel("test recall")
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return png(fig)


def fig_cost(models: list[dict], colors: dict) -> bytes | None:
    """Test accuracy (with its 95 % CI) against training minutes and against parameter count."""
    pts = [r for r in models if num(metric(r, "test", "accuracy")) is not None]
    if not pts:
        return None
    fig = figure(10.0, 3.7)
    axs = fig.subplots(1, 2, sharey=True)
    for ax, key, label in ((axs[0], "train_minutes", "training time (minutes)"),
                           (axs[1], "params", "parameters (log scale)")):
        xs = []
        by_y = sorted(pts, key=lambda r: float(r["test"]["accuracy"]))
        for row in pts:
            x = num(row.get(key))
            if x is None or x <= 0:
                continue
            xs.append(x)
            y = float(row["test"]["accuracy"])
            ci = row["test"].get("accuracy_ci")
            err = None
            if isinstance(ci, list) and len(ci) == 2 and None not in ci:
                err = [[max(0.0, y - ci[0])], [max(0.0, ci[1] - y)]]
            c = colors[row["model"]]
            ax.errorbar([x], [y], yerr=err, fmt="o", color=c, ms=7, capsize=3, lw=1.2)
            dy = 6 if by_y.index(row) % 2 else -11  # alternate, so neighbours' labels rarely collide
            ax.annotate(row["model"], (x, y), xytext=(7, dy), textcoords="offset points", fontsize=8,
                        color=c)
        if key == "params" or (xs and max(xs) / min(xs) > 30):
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # labels even within a decade
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.xaxis.set_minor_formatter(NullFormatter())
        if xs:  # room for labels on the right
            lo, hi = min(xs), max(xs)
            if ax.get_xscale() == "log":
                ax.set_xlim(lo / 1.6, hi * 2.5)
            else:
                span = (hi - lo) or hi or 1.0
                ax.set_xlim(max(0.0, lo - 0.15 * span), hi + 0.3 * span)
        else:
            _empty(ax, f"no {key} recorded")
        ax.set_xlabel(label)
    axs[0].set_ylabel("test accuracy (95 % CI)")
    pct_axis(axs[0])
    return png(fig)


def load_thumbnail(path: str, base: Path) -> np.ndarray | None:
    """The test image at THUMB px: a file (absolute, or relative to cwd or the compare folder) or a
    regenerated synthetic image; None when it cannot be had."""
    try:
        return saved_image(path, THUMB, "squash", (base,))
    except Exception:  # a moved file or a bad file: show a placeholder
        return None


def font(size: int):
    """DejaVu Sans (matplotlib ships it) at a pixel size, else Pillow's built-in font."""
    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except OSError:
        return ImageFont.load_default(size)


def fig_wrong(rows: list[dict], base: Path) -> tuple[bytes, list[str]]:
    """A grid of the given test images captioned 'true → predicted (confidence)', drawn with Pillow
    (ten times faster than matplotlib for a photo grid); returns the unreadable paths too."""
    side, pad, cap = round(THUMB * 1.25), 10, 34
    ncols = min(6, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    canvas = Image.new("RGB", (ncols * (side + pad) + pad, nrows * (side + cap + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    big, small = font(12), font(11)
    missing = []
    for i, r in enumerate(rows):
        x = pad + (i % ncols) * (side + pad)
        y = pad + (i // ncols) * (side + cap + pad)
        img = load_thumbnail(r["path"], base)
        if img is None:
            missing.append(r["path"])
            draw.rectangle((x, y + cap, x + side - 1, y + cap + side - 1), fill="#d1d5db")
            draw.multiline_text((x + side / 2, y + cap + side / 2), "image\nnot found", font=small,
                                fill="#4b5563", anchor="mm", align="center")
        else:
            canvas.paste(Image.fromarray(img).resize((side, side), Image.Resampling.LANCZOS), (x, y + cap))
        conf = fixed(num(r.get("confidence")), 2)
        draw.text((x + side / 2, y), f"{short(str(r.get('label', '?')))} →", font=big, fill="#111827",
                  anchor="ma")
        draw.text((x + side / 2, y + 16), f"{short(str(r.get('pred', '?')))} ({conf})", font=big,
                  fill="#b91c1c", anchor="ma")
    out = io.BytesIO()
    canvas.quantize(256, dither=Image.Dither.FLOYDSTEINBERG).save(out, format="PNG", optimize=True)
    return out.getvalue(), missing
