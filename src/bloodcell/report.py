"""report.html (one self-contained file) and report.md from a compare folder's saved results.

Usage:
    bloodcell report runs/compare        # rebuilds runs/compare/report.html and report.md

Reads only what `bloodcell compare` saved (results.json, runs/<model>/history.csv and
predictions_test.csv) and never trains: a report can be rebuilt, restyled or extended long after the
runs. Both files are built from one list of blocks, so their tables are the same. The HTML opens
offline: CSS inline, every figure a base64 PNG, no script and no external resource. The Markdown
links the same figures as PNG files in figures/.

Each model keeps one colour (Okabe-Ito, colour-blind safe) in every figure, by its order in the
protocol, so it can be followed from plot to plot. Models are ranked by test accuracy for reading
only; the compare protocol selects each model's epoch on validation and nothing on test.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bloodcell.errors import BloodcellError
from bloodcell.info import STUDY

# Okabe & Ito (2008), ordered so the first five are far apart; yellow last (faint on white).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
MISSING = "–"
MAX_WRONG = 12
THUMB = 96
DPI = 110
SYNTHETIC_RE = re.compile(r"^synthetic://(\d+)/(\d+)$")


# --- formatting -------------------------------------------------------------------------------


def _num(x) -> float | None:
    """A finite float, or None for null, '', NaN and anything unparsable."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def pct(x) -> str:
    """0.9123 -> '91.2 %'; None -> '–'."""
    v = _num(x)
    return MISSING if v is None else f"{100 * v:.1f} %"


def pct_ci(x, ci) -> str:
    """'91.2 % [89.0–93.1]', or without the interval when there is none."""
    if _num(x) is None:
        return MISSING
    if ci_text(ci) == MISSING:
        return pct(x)
    return f"{pct(x)} [{100 * float(ci[0]):.1f}–{100 * float(ci[1]):.1f}]"


def ci_text(ci) -> str:
    """'89.0–93.1 %', or '–'."""
    if not isinstance(ci, list | tuple) or len(ci) != 2 or None in (_num(ci[0]), _num(ci[1])):
        return MISSING
    return f"{100 * float(ci[0]):.1f}–{100 * float(ci[1]):.1f} %"


def fixed(x, digits: int = 3) -> str:
    """A plain decimal, or '–'."""
    v = _num(x)
    return MISSING if v is None else f"{v:.{digits}f}"


def count(x) -> str:
    """1234567 -> '1,234,567'."""
    v = _num(x)
    return MISSING if v is None else f"{round(v):,}"


def params(x) -> str:
    """Parameter count, short: 45.1 k, 1.23 M."""
    v = _num(x)
    if v is None:
        return MISSING
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.0f}"


def setting(v) -> str:
    """A protocol value as a reader would type it."""
    if v is None:
        return MISSING
    if isinstance(v, str):
        return v
    if isinstance(v, list | tuple):
        return ", ".join(setting(x) for x in v) if v else "[]"
    return json.dumps(v)


def metric(row: dict, split: str, key: str):
    """row[split][key], or None when the split or the key is missing."""
    m = row.get(split)
    return m.get(key) if isinstance(m, dict) else None


# --- document blocks: rendered to both HTML and Markdown ---------------------------------------


@dataclass
class Cell:
    """A table cell: Markdown/plain text and, where it differs, its HTML."""

    text: str
    html: str | None = None


@dataclass
class Table:
    headers: list[str]
    rows: list[list]
    numeric: set[int] = field(default_factory=set)  # right-aligned columns
    id: str | None = None
    caption: str | None = None
    compact: bool = False  # as wide as its content, not the page


@dataclass
class Figure:
    name: str  # file stem in figures/
    png: bytes
    alt: str
    caption: str = ""

    @property
    def width(self) -> int:
        """The PNG's width in pixels (from its header): shown at that size, narrower on small screens."""
        return int.from_bytes(self.png[16:20], "big")


@dataclass
class Block:
    kind: str  # h2, h3, p, note, pre, banner, html
    text: str
    html: str | None = None
    id: str | None = None


def _inline(text: str) -> str:
    """Escape, then **bold** and `code` to HTML."""
    s = html.escape(text, quote=False)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def _md_cell(c) -> str:
    text = c.text if isinstance(c, Cell) else str(c)
    return text.replace("|", "\\|").replace("\n", " ")


def _html_cell(c) -> str:
    return c.html if isinstance(c, Cell) and c.html is not None else html.escape(
        c.text if isinstance(c, Cell) else str(c))


def table_html(t: Table) -> str:
    """A table in a horizontally scrolling wrapper (narrow screens)."""
    def cls(i: int) -> str:
        return ' class="num"' if i in t.numeric else ""

    head = "".join(f"<th{cls(i)}>{html.escape(h)}</th>" for i, h in enumerate(t.headers))
    body = "\n".join("<tr>" + "".join(f"<td{cls(i)}>{_html_cell(c)}</td>" for i, c in enumerate(r))
                     + "</tr>" for r in t.rows)
    idattr = (f' id="{t.id}"' if t.id else "") + (' class="compact"' if t.compact else "")
    cap = f"<caption>{_inline(t.caption)}</caption>" if t.caption else ""
    wrap = "table-wrap compact" if t.compact else "table-wrap"
    return (f'<div class="{wrap}"><table{idattr}>{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>\n{body}\n</tbody></table></div>")


def table_md(t: Table) -> str:
    """A GitHub-flavoured Markdown table."""
    align = ["---:" if i in t.numeric else ":---" for i in range(len(t.headers))]
    lines = ["| " + " | ".join(_md_cell(h) for h in t.headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in t.rows]
    return ("*" + t.caption + "*\n\n" if t.caption else "") + "\n".join(lines)


# --- reading the compare folder ---------------------------------------------------------------


def load_results(d: Path) -> dict:
    """results.json of a compare folder; a BloodcellError when it is missing or unreadable."""
    path = d / "results.json"
    if not path.is_file():
        raise BloodcellError(f"{d} holds no results.json (not a compare folder? "
                             "'bloodcell compare --out DIR' writes one)")
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BloodcellError(f"{path} could not be read: {e}") from e
    if not isinstance(res, dict) or not isinstance(res.get("models"), list):
        raise BloodcellError(f"{path} has no 'models' list; is it a bloodcell compare result?")
    return res


def run_dir(d: Path, row: dict) -> Path:
    """A model's run folder (results.json gives it relative to the compare folder)."""
    return d / (row.get("run_dir") or f"runs/{row.get('model')}")


def read_csv(path: Path) -> list[dict] | None:
    """Rows of a CSV file as dicts, or None when it is missing or unreadable."""
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def read_history(path: Path) -> dict[str, np.ndarray] | None:
    """history.csv as float columns (NaN where empty), or None when there is no epoch."""
    rows = read_csv(path)
    if not rows or "epoch" not in rows[0]:
        return None
    cols = {}
    for k in rows[0]:
        vals = [_num(r.get(k)) for r in rows]
        cols[k] = np.array([np.nan if v is None else v for v in vals], dtype=float)
    return cols


def load_thumbnail(path: str, base: Path) -> np.ndarray | None:
    """The test image at THUMB px: a file (absolute, or relative to cwd or the compare folder) or a
    regenerated synthetic image; None when it cannot be had."""
    m = SYNTHETIC_RE.match(path)
    try:
        if m:
            from bloodcell.data.synthetic import generate

            return generate(1, THUMB, int(m.group(1)), start=int(m.group(2)))[0][0]
        from bloodcell.data.cache import load_image

        p = Path(path)
        if not p.is_file() and not p.is_absolute() and (base / p).is_file():
            p = base / p
        return load_image(str(p), THUMB, "squash")
    except Exception:  # a moved file, a bad file, or no synthetic module: show a placeholder
        return None


# --- figures ----------------------------------------------------------------------------------


def _style():
    import matplotlib

    return matplotlib.rc_context({
        "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
        "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False,
        "axes.spines.right": False, "axes.grid": True, "grid.color": "#e5e7eb", "grid.linewidth": 0.7,
        "axes.edgecolor": "#6b7280", "axes.titleweight": "bold", "figure.facecolor": "white",
    })


def _figure(w: float, h: float):
    from matplotlib.figure import Figure as MplFigure  # no pyplot: no global state, Agg by default

    return MplFigure(figsize=(w, h), layout="constrained")


def _png(fig) -> bytes:
    """PNG bytes, palette-quantised (256 colours): plots stay sharp, the file stays small."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white", bbox_inches="tight", pad_inches=0.06)
    im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    im = im.quantize(256, dither=Image.Dither.NONE)
    out = io.BytesIO()
    im.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _pct_axis(ax, axis: str = "y") -> None:
    from matplotlib.ticker import PercentFormatter

    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(PercentFormatter(1.0, decimals=0))


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#6b7280")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def fig_learning_curves(models: list[dict], histories: dict, colors: dict) -> bytes:
    """Small multiples: per model, loss (top) and accuracy (bottom), train dashed, val solid."""
    from matplotlib.lines import Line2D

    n = len(models)
    blocks = math.ceil(n / 5)
    ncols = math.ceil(n / blocks)
    w = max(2.3 * ncols, 5.0)
    fig = _figure(w, 3.9 * blocks + 0.3)
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
            best = _num(row.get("best_epoch"))
            if best is not None:
                ax.axvline(best, color="#6b7280", ls=":", lw=1)
            ax.set_ylabel(label if i % ncols == 0 else "")
        a_loss.set_ylim(0, loss_max)
        a_acc.set_ylim(0, 1.0)
        _pct_axis(a_acc)
        a_acc.set_xlabel("epoch")
    keys = [Line2D([], [], color="#374151", ls="--", lw=1.4, label="train"),
            Line2D([], [], color="#374151", lw=1.8, label="validation"),
            Line2D([], [], color="#6b7280", ls=":", lw=1, label="chosen epoch")]
    fig.legend(handles=keys, loc="outside upper right", ncols=3, frameon=False)
    return _png(fig)


def fig_val_overlay(models: list[dict], histories: dict, colors: dict) -> bytes | None:
    """Validation accuracy and loss of every model on one pair of axes."""
    have = [r for r in models if histories.get(r["model"])]
    if not have:
        return None
    w = 10.0
    fig = _figure(w, 3.6)
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
    _pct_axis(a_acc)
    for ax in (a_acc, a_loss):
        ax.set_xlabel("epoch")
    fig.legend(handles=a_acc.get_lines() or a_loss.get_lines(), loc="outside right upper", frameon=False)
    return _png(fig)


def fig_confusions(models: list[dict], classes: list[str], colors: dict) -> bytes:
    """Per model, the test confusion matrix normalised by row (true class), with counts."""
    n, k = len(models), len(classes)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    cell = 0.62 if k <= 4 else 0.45
    side = max(2.6, cell * k + 1.3)
    w = side * ncols + 0.8
    fig = _figure(w, side * nrows + 0.3)
    axs = fig.subplots(nrows, ncols, squeeze=False)
    short = [c if len(c) <= 10 else c[:9] + "…" for c in classes]
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
        ax.set_xticks(range(k), short, rotation=35, ha="right")
        ax.set_yticks(range(k), short if i % ncols == 0 else [""] * k)
        ax.set_xlabel("predicted")
        if i % ncols == 0:
            ax.set_ylabel("true")
        for s in ax.spines.values():
            s.set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=axs, shrink=0.6, label="share of the true class",
                     format=lambda v, _: f"{100 * v:.0f}%")
    return _png(fig)


def fig_recall(models: list[dict], classes: list[str], colors: dict) -> bytes | None:
    """Grouped bars: test recall per class, one bar per model."""
    have = [r for r in models if isinstance(metric(r, "test", "per_class"), dict)]
    if not have:
        return None
    w = min(11.0, 2.0 + 0.35 * len(have) * len(classes) + 0.5 * len(classes))
    w = max(w, 6.5)
    fig = _figure(w, 3.4)
    ax = fig.subplots()
    width = 0.8 / len(have)
    x = np.arange(len(classes))
    for j, row in enumerate(have):
        pc = row["test"]["per_class"]
        vals = [_num((pc.get(c) or {}).get("recall")) or 0.0 for c in classes]
        ax.bar(x - 0.4 + width * (j + 0.5), vals, width * 0.92, color=colors[row["model"]],
               label=row["model"])
    ax.set_xticks(x, classes)
    ax.set_ylim(0, 1.0)
    _pct_axis(ax)
    ax.set_ylabel("test recall")
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _png(fig)


def fig_cost(models: list[dict], colors: dict) -> bytes | None:
    """Test accuracy (with its 95 % CI) against training minutes and against parameter count."""
    pts = [r for r in models if _num(metric(r, "test", "accuracy")) is not None]
    if not pts:
        return None
    w = 10.0
    fig = _figure(w, 3.7)
    axs = fig.subplots(1, 2, sharey=True)
    for ax, key, label in ((axs[0], "train_minutes", "training time (minutes)"),
                           (axs[1], "params", "parameters (log scale)")):
        xs = []
        by_y = sorted(pts, key=lambda r: float(r["test"]["accuracy"]))
        for row in pts:
            x = _num(row.get(key))
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
            from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

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
    _pct_axis(axs[0])
    return _png(fig)


def _font(size: int):
    """DejaVu Sans (matplotlib ships it) at a pixel size, else Pillow's built-in font."""
    from matplotlib import font_manager
    from PIL import ImageFont

    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except OSError:
        return ImageFont.load_default(size)


def _short(name: str, n: int = 15) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def fig_wrong(rows: list[dict], base: Path) -> tuple[bytes, list[str]]:
    """A grid of the given test images captioned 'true → predicted (confidence)', drawn with Pillow
    (ten times faster than matplotlib for a photo grid); returns the unreadable paths too."""
    from PIL import Image, ImageDraw

    side, pad, cap = round(THUMB * 1.25), 10, 34
    ncols = min(6, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    canvas = Image.new("RGB", (ncols * (side + pad) + pad, nrows * (side + cap + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = _font(12), _font(11)
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
        conf = fixed(_num(r.get("confidence")), 2)
        draw.text((x + side / 2, y), f"{_short(str(r.get('label', '?')))} →", font=font, fill="#111827",
                  anchor="ma")
        draw.text((x + side / 2, y + 16), f"{_short(str(r.get('pred', '?')))} ({conf})", font=font,
                  fill="#b91c1c", anchor="ma")
    out = io.BytesIO()
    canvas.quantize(256, dither=Image.Dither.FLOYDSTEINBERG).save(out, format="PNG", optimize=True)
    return out.getvalue(), missing


def confident_errors(preds: list[dict], n: int = MAX_WRONG) -> list[dict]:
    """The n wrong predictions with the highest confidence."""
    wrong = [r for r in preds if r.get("label") != r.get("pred")]
    return sorted(wrong, key=lambda r: -(_num(r.get("confidence")) or 0.0))[:n]


# --- sections ---------------------------------------------------------------------------------


def ranked(models: list[dict]) -> list[dict]:
    """Models by test accuracy, best first; those without a test score last (by val accuracy)."""
    def key(r):
        t, v = _num(metric(r, "test", "accuracy")), _num(metric(r, "val", "accuracy"))
        return (t is None, -(t or 0.0), -(v or 0.0))

    return sorted(models, key=key)


def _best(models: list[dict], split: str) -> dict | None:
    have = [r for r in models if _num(metric(r, split, "accuracy")) is not None]
    return max(have, key=lambda r: float(r[split]["accuracy"])) if have else None


def _two_line(main: str, sub: str) -> Cell:
    """'main [sub]' in Markdown; in HTML the sub-figure goes small on a second line."""
    if sub == MISSING or main == MISSING:
        return Cell(main)
    return Cell(f"{main} [{sub}]", f'{html.escape(main)}<span class="sub2">{html.escape(sub)}</span>')


def _ci_cell(x, ci) -> Cell:
    return _two_line(pct(x), ci_text(ci).removesuffix(" %"))


def _swatch(name: str, colors: dict) -> Cell:
    return Cell(name, f'<span class="swatch" style="background:{colors.get(name, "#999")}"></span>'
                      f"<strong>{html.escape(name)}</strong>")


def _study(row: dict) -> dict | None:
    s = row.get("study")
    return s if isinstance(s, dict) else STUDY.get(row.get("model"))


def headline(res: dict, models: list[dict], colors: dict) -> list:
    """Title, the synthetic-data banner and the best models by test and by validation."""
    ds = res.get("dataset") or {}
    blocks: list = []
    if ds.get("synthetic"):
        blocks.append(Block(
            "banner",
            "**SYNTHETIC DATA.** These models were trained and tested on bloodcell's built-in "
            "synthetic set: procedurally drawn smears, **not real blood cells**. The figures below "
            "say nothing about performance on real blood smears; they only show that the pipeline "
            "works and how the models compare on this toy task.", id="synthetic-banner"))
    bt, bv = _best(models, "test"), _best(models, "val")
    cards_md, cards_html = [], []
    if bt:
        t = bt["test"]
        acc, f1, n = pct(t.get("accuracy")), pct(t.get("macro_f1")), count(t.get("n"))
        cards_md.append(f"**Best on test: {bt['model']}** — accuracy {acc}, 95 % CI "
                        f"{ci_text(t.get('accuracy_ci'))}, macro-F1 {f1}, on {n} test images.")
        cards_html.append(_card("Best on test", bt["model"], colors, acc,
                                f"95 % CI {ci_text(t.get('accuracy_ci'))} · macro-F1 {f1} · n = {n}"))
    if bv:
        v = bv["val"]
        cards_md.append(f"**Best on validation: {bv['model']}** — accuracy {pct(v.get('accuracy'))}, "
                        f"macro-F1 {pct(v.get('macro_f1'))}.")
        cards_html.append(_card("Best on validation", bv["model"], colors, pct(v.get("accuracy")),
                                f"macro-F1 {pct(v.get('macro_f1'))} · n = {count(v.get('n'))}"))
    if not (bt or bv):
        cards_md.append("No model has test or validation metrics.")
    n_models = len(models)
    what = "synthetic images" if ds.get("synthetic") else f"`{ds.get('root', '?')}`"
    data_line = (f"{n_models} model{'s' if n_models != 1 else ''} trained under one protocol on {what}, "
                 f"{len(ds.get('classes') or [])} classes.")
    cards_html.append(_card("Comparison", f"{n_models} models", None,
                            f"{len(ds.get('classes') or [])} classes",
                            "synthetic data" if ds.get("synthetic") else f"layout {ds.get('layout', '?')}"))
    blocks.append(Block("html", "\n\n".join("- " + c for c in cards_md),
                        '<div class="cards">' + "".join(cards_html) + "</div>"))
    rank = ranked(models)
    monitor = (res.get("protocol") or {}).get("monitor")
    note = ("Models are ranked by **test** accuracy for reading only: each model's epoch was chosen on the "
            "**validation** split" + (f" ({monitor})" if monitor else "") + " and nothing (model, epoch, "
            "threshold) was selected on the test split. " + data_line)
    if len(rank) > 1:
        a, b = metric(rank[0], "test", "accuracy_ci"), metric(rank[1], "test", "accuracy_ci")
        if a and b and None not in a and None not in b and a[0] <= b[1]:
            note += (f" The 95 % intervals of {rank[0]['model']} and {rank[1]['model']} overlap: "
                     "on this test set the difference between them may be chance.")
    if bt and bv and bt is not bv:
        note += (f" The best model on validation ({bv['model']}) is not the best on test "
                 f"({bt['model']}); picking by validation is the honest choice.")
    blocks.append(Block("p", note))
    return blocks


def _card(label: str, name: str, colors: dict | None, big: str, small: str) -> str:
    sw = (f'<span class="swatch" style="background:{colors[name]}"></span>'
          if colors and name in colors else "")
    return (f'<div class="card"><div class="card-label">{html.escape(label)}</div>'
            f'<div class="card-name">{sw}{html.escape(name)}</div>'
            f'<div class="card-big">{html.escape(big)}</div>'
            f'<div class="card-small">{html.escape(small)}</div></div>')


def summary_table(models: list[dict], colors: dict) -> Table:
    """One row per model, ranked by test accuracy."""
    simple = any(isinstance(r.get("test_simple"), dict) for r in models)
    headers = ["#", "Model", "Params", "Image px", "Epochs run (best)", "Train min", "Images/s",
               "Val acc", "Test acc [95 % CI]", "Test macro-F1", "Test loss", "Cell acc [95 % CI]"]
    if simple:
        headers.append("TEST_SIMPLE acc")
    headers.append("Study reported (acc, loss)")
    rows = []
    for i, r in enumerate(ranked(models), 1):
        ep, best = _num(r.get("epochs_run")), _num(r.get("best_epoch"))
        epochs = MISSING if ep is None else f"{ep:.0f}" + ("" if best is None else f" ({best:.0f})")
        cells = [str(i), _swatch(r["model"], colors), params(r.get("params")), count(r.get("image_size")),
                 epochs, fixed(r.get("train_minutes"), 1), count(r.get("train_images_per_s")),
                 pct(metric(r, "val", "accuracy")),
                 _ci_cell(metric(r, "test", "accuracy"), metric(r, "test", "accuracy_ci")),
                 pct(metric(r, "test", "macro_f1")), fixed(metric(r, "test", "loss")),
                 _ci_cell(metric(r, "test", "group_accuracy"), metric(r, "test", "group_accuracy_ci"))]
        if simple:
            cells.append(pct(metric(r, "test_simple", "accuracy")))
        s = _study(r)
        cells.append(Cell(MISSING) if not s else Cell(
            f"{s.get('label', '?')}: {pct(s.get('accuracy'))}, {fixed(s.get('loss'), 2)}",
            f"{html.escape(s.get('label', '?'))}<span class=\"sub2\">{pct(s.get('accuracy'))}, "
            f"loss {fixed(s.get('loss'), 2)}</span>"))
        rows.append(cells)
    return Table(headers, rows, numeric=set(range(2, len(headers) - 1)) | {0}, id="summary")


def study_table(models: list[dict], colors: dict) -> Table:
    """The study's four models: its reported test figures beside ours."""
    by_name = {r["model"]: r for r in models}
    rows = []
    for name, s in STUDY.items():
        r = by_name.get(name)
        s = (_study(r) if r else None) or s
        ours = [MISSING] * 3 if r is None else [
            pct_ci(metric(r, "test", "accuracy"), metric(r, "test", "accuracy_ci")),
            fixed(metric(r, "test", "loss"), 2), pct(metric(r, "test_simple", "accuracy"))]
        rows.append([s.get("label", "?"), _swatch(name, colors) if r else Cell(f"{name} (not run)"),
                     pct(s.get("accuracy")), fixed(s.get("loss"), 2), *ours])
    return Table(["Study", "bloodcell model", "Study acc", "Study loss", "Our test acc [95 % CI]",
                  "Our test loss", "Our TEST_SIMPLE acc"], rows, numeric={2, 3, 4, 5, 6}, id="study")


def metrics_table(models: list[dict], colors: dict) -> Table:
    """The remaining test metrics: balanced accuracy, AUC, calibration, sizes."""
    rows = [[_swatch(r["model"], colors), pct(metric(r, "val", "macro_f1")),
             pct(metric(r, "test", "balanced_accuracy")), fixed(metric(r, "test", "auc")),
             fixed(metric(r, "test", "ece")), count(metric(r, "test", "n")),
             count(metric(r, "test", "n_groups")), r.get("norm") or MISSING]
            for r in ranked(models)]
    return Table(["Model", "Val macro-F1", "Test balanced acc", "Test AUC (macro OvR)", "Test ECE",
                  "Test images", "Test cells (groups)", "Norm"], rows, numeric={1, 2, 3, 4, 5, 6})


def recall_table(models: list[dict], classes: list[str], colors: dict) -> Table:
    """Test recall per class and model."""
    rows = []
    for r in ranked(models):
        pc = metric(r, "test", "per_class") or {}
        rows.append([_swatch(r["model"], colors), *[pct((pc.get(c) or {}).get("recall")) for c in classes]])
    return Table(["Model", *classes], rows, numeric=set(range(1, len(classes) + 1)))


GROUPED_BY = {
    "similar": " Groups here are look-alike images (augmented copies of one cell, found by their colour "
               "histograms: group_by similar).",
    "name": " Groups here come from the file names (group_by name).",
    "file": " Groups here are single files (byte-identical copies joined: group_by file).",
}


def dataset_blocks(ds: dict) -> list:
    """Classes, images and groups per split, problems found."""
    classes = list(ds.get("classes") or [])
    splits = ds.get("splits") or {}
    kind = ("bloodcell's built-in **synthetic** set" if ds.get("synthetic")
            else f"`{ds.get('root', '?')}` (layout: {ds.get('layout', '?')})")
    how = GROUPED_BY.get(ds.get("group_by"), "")
    out: list = [Block("p", f"Data: {kind}. Classes: {', '.join(classes) or MISSING}. "
                            "A group is one source cell or slide: images of one group never straddle "
                            f"splits, and group (cell) accuracy votes over a group's images.{how}")]
    extra = ds.get("extra_train") or {}
    if extra:
        added = ", ".join(f"{c} {count(n)}" for c, n in (extra.get("images") or {}).items())
        out.append(Block("p", f"The train split also holds images of another data set, `{extra.get('root')}` "
                              f"(its own train split, of the classes above: {added}); validation and test "
                              "are this data's alone."))
    if splits:
        headers = ["Class"]
        for s in splits:
            headers += [f"{s} images", f"{s} groups"]
        rows = []
        for c in classes + ["Total"]:
            cells = [Cell(c, "<strong>Total</strong>") if c == "Total" else c]
            for s in splits.values():
                for key in ("images", "groups"):
                    d = (s or {}).get(key) or {}
                    v = sum(_num(x) or 0 for x in d.values()) if c == "Total" and d else d.get(c)
                    cells.append(count(v))
            rows.append(cells)
        out.append(Table(headers, rows, numeric=set(range(1, len(headers))), id="splits"))
    problems = ds.get("problems") or []
    if problems:
        out.append(Block("h3", "Problems found in the data"))
        out.append(Table(["Kind", "Detail", "N"], [[p.get("kind", MISSING), p.get("detail", MISSING),
                                                      count(p.get("n"))] for p in problems],
                         numeric={2}, id="problems", compact=True))
    else:
        out.append(Block("p", "Problems found in the data: none."))
    return out


def protocol_blocks(res: dict, d: Path) -> list:
    """Every setting, the overrides, software and machine, date and the command."""
    proto = dict(res.get("protocol") or {})
    models = proto.pop("models", None)
    overrides = proto.pop("overrides", None) or {}
    out: list = [Block("p", "Every model was trained with these settings, except the overrides listed. "
                            "To rerun the comparison:")]
    out.append(Block("pre", res.get("command") or "(command not recorded)"))
    out.append(Block("p", f"To rebuild this report from the saved results: `bloodcell report {d}`. "
                          "The numbers are in `results.json` and `results.csv` beside this file; each "
                          "model's run folder holds its config, history, checkpoints and predictions."))
    rows = [[Cell(k, f"<code>{html.escape(k)}</code>"), setting(v)] for k, v in proto.items()]
    rows.append([Cell("models", "<code>models</code>"), setting(models)])
    out.append(Table(["Setting", "Value"], rows, id="protocol", compact=True))
    if overrides:
        out.append(Block("h3", "Per-model overrides"))
        out.append(Table(["Model", "Setting", "Value"],
                         [[m, k, setting(v)] for m, kv in overrides.items() for k, v in (kv or {}).items()],
                         compact=True))
    env = res.get("environment") or {}
    out.append(Block("h3", "Software and machine"))
    env_rows = [["bloodcell", res.get("bloodcell_version") or MISSING],
                ["created", res.get("created") or MISSING]]
    env_rows += [[k, setting(v)] for k, v in env.items()]
    out.append(Table(["", "Value"], env_rows, id="environment", compact=True))
    return out


# --- assembly ---------------------------------------------------------------------------------


def build_blocks(d: Path, res: dict) -> list:
    """The whole report as a list of blocks, in reading order."""
    models = [r for r in res["models"] if isinstance(r, dict) and r.get("model")]
    if not models:
        raise BloodcellError(f"{d / 'results.json'} lists no models")
    order = list((res.get("protocol") or {}).get("models") or [])
    order += [r["model"] for r in models if r["model"] not in order]
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(order)}
    ds = res.get("dataset") or {}
    classes = list(ds.get("classes") or [])
    if not classes:
        pc = next((metric(r, "test", "per_class") for r in models if metric(r, "test", "per_class")), {})
        classes = list(pc)
    histories = {r["model"]: read_history(run_dir(d, r) / "history.csv") for r in models}
    models = ranked(models)  # small multiples in the summary's order; colours keep the protocol's

    blocks: list = headline(res, models, colors)
    blocks += [Block("h2", "Summary", id="summary-h"), summary_table(models, colors),
               Block("note", "Image px: input size. Epochs run (best): epochs trained and the epoch whose "
                             "validation score chose the checkpoint. Cell acc: majority vote over a group's "
                             "images. Intervals are 95 %: for image accuracy a bootstrap that resamples "
                             "whole groups (so augmented twins count once), for cell accuracy a Wilson "
                             "interval over the cells. "
                             f"{MISSING} = not recorded.")]
    blocks += [Block("h3", "The study's four models"),
               Block("p", "The study bloodcell started from reported these test figures; ours are beside "
                          "them, measured under this report's protocol and data."),
               study_table(models, colors)]
    blocks += [Block("h3", "More test metrics"), metrics_table(models, colors)]

    blocks.append(Block("h2", "Learning curves", id="curves"))
    blocks.append(Figure("learning_curves", fig_learning_curves(models, histories, colors),
                         alt="learning curves per model",
                         caption="Loss (top) and accuracy (bottom) per epoch; dashed = train "
                                 "(with augmentation), solid = validation; dotted line = chosen epoch."))
    ov = fig_val_overlay(models, histories, colors)
    if ov:
        blocks.append(Figure("val_overlay", ov, alt="validation accuracy and loss of all models",
                             caption="Validation accuracy and loss of every model."))

    blocks.append(Block("h2", "Where the models err", id="errors"))
    if classes:
        blocks.append(Figure("confusion", fig_confusions(models, classes, colors),
                             alt="test confusion matrices",
                             caption="Test confusion matrices, rows normalised by true class "
                                     "(count in brackets)."))
        rec = fig_recall(models, classes, colors)
        if rec:
            blocks.append(Figure("recall", rec, alt="test recall per class",
                                 caption="Test recall per class."))
        blocks.append(recall_table(models, classes, colors))

    blocks.append(Block("h2", "Accuracy against cost", id="cost"))
    cost = fig_cost(models, colors)
    if cost:
        blocks.append(Figure("cost", cost, alt="test accuracy against training time and parameters",
                             caption="Test accuracy (bars: 95 % CI) against training minutes on this "
                                     "machine and against parameter count."))
    else:
        blocks.append(Block("p", "No model has a test accuracy to plot."))

    blocks.append(Block("h2", "Most confidently wrong test images", id="wrong"))
    blocks.append(Block("p", f"For each model, up to {MAX_WRONG} test images it got wrong with the highest "
                             "confidence, captioned true → predicted (confidence). Look for label noise, "
                             "unusual stains and look-alike classes."))
    for r in ranked(models):
        blocks += wrong_blocks(d, r, colors[r["model"]])

    blocks.append(Block("h2", "Data set", id="data"))
    blocks += dataset_blocks(ds)
    blocks.append(Block("h2", "Protocol and environment", id="protocol-h"))
    blocks += protocol_blocks(res, d)
    return blocks


def wrong_blocks(d: Path, row: dict, color: str) -> list:
    """The gallery of one model's most confident errors, with a note on unreadable images."""
    name = row["model"]
    preds = read_csv(run_dir(d, row) / "predictions_test.csv")
    if preds is None:
        return [Block("p", f"**{name}**: no test predictions saved.")]
    errs = confident_errors(preds)
    if not errs:
        return [Block("p", f"**{name}**: no test errors.")]
    n_wrong = sum(r.get("label") != r.get("pred") for r in preds)
    which = f"all {n_wrong:,} errors" if len(errs) == n_wrong else \
        f"the {len(errs)} most confident of {n_wrong:,} errors"
    title = f"{name}: {which} in {len(preds):,} test images"
    png, missing = fig_wrong(errs, d)
    out: list = [Block("h3", title, html=f'<span class="swatch" style="background:{color}"></span>'
                                         + html.escape(title)),
                 Figure(f"wrong_{_slug(name)}", png, alt=f"most confidently wrong test images of {name}")]
    if missing:
        shown = ", ".join(f"`{p}`" for p in missing[:3]) + (" …" if len(missing) > 3 else "")
        out.append(Block("note", f"{len(missing)} image(s) could not be read (moved or deleted since "
                                 f"training?), shown grey: {shown}"))
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


CSS = """
:root{--fg:#1f2328;--muted:#5b6470;--border:#d8dee4;--soft:#f6f8fa;--accent:#0072B2}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:#fff;color:var(--fg);font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,
 "Helvetica Neue",Arial,"Noto Sans","Liberation Sans",sans-serif}
main{max-width:1180px;margin:0 auto;padding:28px 22px 72px}
header{border-bottom:1px solid var(--border);padding-bottom:14px;margin-bottom:18px}
h1{font-size:1.85rem;line-height:1.2;margin:0 0 6px;letter-spacing:-.01em}
.sub{color:var(--muted);font-size:.92rem}
nav{margin-top:10px;display:flex;flex-wrap:wrap;gap:6px 16px;font-size:.9rem}
nav a{color:var(--accent);text-decoration:none}
nav a:hover{text-decoration:underline}
h2{font-size:1.35rem;margin:2.2em 0 .6em;padding-bottom:.3em;border-bottom:1px solid var(--border)}
h3{font-size:1.08rem;margin:1.6em 0 .4em}
p{margin:.6em 0;max-width:78ch}
.note{color:var(--muted);font-size:.86rem;max-width:none}
.banner{background:#fff5d1;border:2px solid #b7791f;border-left:10px solid #b7791f;border-radius:8px;
 padding:14px 18px;margin:16px 0 20px;font-size:1.05rem;max-width:none}
.banner strong:first-child{color:#7c2d12;letter-spacing:.03em}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(250px,1fr));gap:14px;margin:14px 0}
.card{border:1px solid var(--border);border-radius:12px;padding:14px 18px;background:var(--soft)}
.card-label{color:var(--muted);font-size:.78rem;text-transform:uppercase;letter-spacing:.06em}
.card-name{font-weight:650;font-size:1.1rem;margin-top:2px}
.card-big{font-size:2.1rem;font-weight:700;line-height:1.15;font-variant-numeric:tabular-nums}
.card-small{color:var(--muted);font-size:.85rem}
.table-wrap{overflow-x:auto;margin:10px 0 6px;border:1px solid var(--border);border-radius:10px}
table{border-collapse:collapse;width:100%;font-size:.88rem;font-variant-numeric:tabular-nums}
caption{text-align:left;padding:8px 12px;color:var(--muted)}
th,td{padding:7px 10px;text-align:left;vertical-align:top;border-bottom:1px solid var(--border)}
th{background:var(--soft);font-weight:600;font-size:.82rem;color:#3d444d}
tbody tr:last-child td{border-bottom:none}
tbody tr:nth-child(even){background:#fbfcfd}
tbody tr:hover{background:#eef5fb}
.num{text-align:right;white-space:nowrap}
.table-wrap.compact{display:inline-block;max-width:100%;vertical-align:top}
table.compact{width:auto;min-width:360px}
td:has(.swatch){white-space:nowrap}
.sub2{display:block;color:var(--muted);font-size:.78rem}
#summary th{white-space:normal;min-width:4.2em}
.swatch{display:inline-block;width:.75em;height:.75em;border-radius:3px;margin-right:.45em;
 vertical-align:-.02em}
figure{margin:18px 0 8px}
figure img{display:block;max-width:100%;height:auto;border-radius:6px}
figcaption{color:var(--muted);font-size:.86rem;margin-top:4px}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;font-size:.86em}
code{background:var(--soft);padding:.1em .35em;border-radius:4px}
pre{background:var(--soft);border:1px solid var(--border);padding:10px 14px;border-radius:8px;
 white-space:pre-wrap;word-break:break-all}
footer{margin-top:48px;color:var(--muted);font-size:.82rem;border-top:1px solid var(--border);
 padding-top:10px}
@media (max-width:640px){main{padding:18px 12px 48px}h1{font-size:1.45rem}.card-big{font-size:1.7rem}}
@media print{nav{display:none}h2{break-after:avoid}figure,table{break-inside:avoid}}
"""

NAV = (("summary-h", "Summary"), ("curves", "Learning curves"), ("errors", "Errors"),
       ("cost", "Cost"), ("wrong", "Confident mistakes"), ("data", "Data"),
       ("protocol-h", "Protocol"))


def render_html(blocks: list, title: str, sub: str) -> str:
    """One self-contained HTML page."""
    parts = []
    for b in blocks:
        if isinstance(b, Table):
            parts.append(table_html(b))
        elif isinstance(b, Figure):
            uri = "data:image/png;base64," + base64.b64encode(b.png).decode("ascii")
            w = f' width="{b.width}"' if b.width else ""
            cap = f"<figcaption>{_inline(b.caption)}</figcaption>" if b.caption else ""
            parts.append(f'<figure><img src="{uri}" alt="{html.escape(b.alt)}"{w}>{cap}</figure>')
        elif b.kind in ("h2", "h3"):
            idattr = f' id="{b.id}"' if b.id else ""
            parts.append(f"<{b.kind}{idattr}>{b.html or html.escape(b.text)}</{b.kind}>")
        elif b.kind == "pre":
            parts.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif b.kind == "html":
            parts.append(b.html or "")
        else:
            cls = {"note": ' class="note"', "banner": ' class="banner" role="alert"'}.get(b.kind, "")
            idattr = f' id="{b.id}"' if b.id else ""
            parts.append(f"<p{cls}{idattr}>{_inline(b.text)}</p>")
    nav = " ".join(f'<a href="#{i}">{html.escape(t)}</a>' for i, t in NAV)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<header><h1>{html.escape(title)}</h1><div class=\"sub\">{_inline(sub)}</div>"
            f"<nav>{nav}</nav></header>\n" + "\n".join(parts)
            + "\n<footer>Built by <code>bloodcell report</code> from the saved results only.</footer>\n"
            "</main>\n</body>\n</html>\n")


FIGURE_NAMES = ("learning_curves", "val_overlay", "confusion", "recall", "cost")


def render_md(blocks: list, title: str, sub: str, figdir: Path) -> str:
    """Markdown with the same tables; figures written to figdir and linked relatively."""
    figdir.mkdir(parents=True, exist_ok=True)
    names = {f"{b.name}.png" for b in blocks if isinstance(b, Figure)}
    for old in figdir.glob("*.png"):  # a rebuilt report drops the figures of models no longer in it
        if old.name not in names and (old.stem in FIGURE_NAMES or old.stem.startswith("wrong_")):
            old.unlink()
    parts = [f"# {title}", sub]
    for b in blocks:
        if isinstance(b, Table):
            parts.append(table_md(b))
        elif isinstance(b, Figure):
            (figdir / f"{b.name}.png").write_bytes(b.png)
            cap = f"\n\n*{b.caption}*" if b.caption else ""
            parts.append(f"![{b.alt}]({figdir.name}/{b.name}.png){cap}")
        elif b.kind == "h2":
            parts.append(f"## {b.text}")
        elif b.kind == "h3":
            parts.append(f"### {b.text}")
        elif b.kind == "pre":
            parts.append(f"```\n{b.text}\n```")
        elif b.kind == "banner":
            parts.append(f"> ⚠️ {b.text}")
        elif b.kind == "note":
            parts.append(f"*{b.text}*" if "*" not in b.text else b.text)
        else:
            parts.append(b.text)
    return "\n\n".join(parts) + "\n"


def build_report(dir: str | Path) -> tuple[Path, Path]:
    """Write DIR/report.html (self-contained) and DIR/report.md (+ DIR/figures/) from saved results."""
    d = Path(dir)
    res = load_results(d)
    with _style():
        blocks = build_blocks(d, res)
    ds = res.get("dataset") or {}
    title = "bloodcell comparison" + (" — synthetic data" if ds.get("synthetic") else "")
    sub = (f"{len(res['models'])} models · created {res.get('created') or MISSING} · "
           f"bloodcell {res.get('bloodcell_version') or MISSING}")
    html_path, md_path = d / "report.html", d / "report.md"
    _write(html_path, render_html(blocks, title, sub))
    _write(md_path, render_md(blocks, title, sub, d / "figures"))
    return html_path, md_path


def _write(path: Path, text: str) -> None:
    """Write via a temporary name, so a reader never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# --- command line -----------------------------------------------------------------------------


def cmd_report(args) -> int:
    """bloodcell report runs/compare   (rebuilds report.html and report.md from saved results)"""
    html_path, md_path = build_report(args.dir)
    print(html_path)
    print(md_path)
    return 0


def add_cli(sub) -> None:
    """Register `bloodcell report DIR`."""
    p = sub.add_parser("report", help="rebuild a compare folder's report.html and report.md",
                       description=cmd_report.__doc__)
    p.add_argument("dir", metavar="DIR", help="compare folder (holds results.json)")
    p.set_defaults(func=cmd_report)
