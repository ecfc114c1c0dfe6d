"""The compare report: report.html (one self-contained file) and report.md from a compare
folder's saved results, built from one list of blocks (document.py).

Reads only what `bloodcell compare` saved (results.json, runs/<model>/history.csv,
predictions_test.csv and, for the Grad-CAM gallery, best.pt) and never trains. Each model keeps
one colour in every figure, by its order in the protocol; models are ranked by test accuracy for
reading only (the compare protocol selects each model's epoch on validation and nothing on test).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from bloodcell.errors import BloodcellError
from bloodcell.report.cams import cam_blocks
from bloodcell.report.document import Block, Figure, render_html, render_md
from bloodcell.report.figures import (
    PALETTE,
    fig_confusions,
    fig_cost,
    fig_learning_curves,
    fig_recall,
    fig_val_overlay,
    fig_wrong,
    style,
)
from bloodcell.report.format import (
    MISSING,
    metric,
    num,
)
from bloodcell.report.sections import (
    cv_table,
    dataset_blocks,
    headline,
    metrics_table,
    protocol_blocks,
    ranked,
    recall_table,
    sources_table,
    study_table,
    summary_table,
)
from bloodcell.runfiles import atomic_write, load_results, read_csv, read_history, run_dir

MAX_WRONG = 12


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
    cv = cv_table(models, colors)
    if cv is not None:
        blocks += [Block("h3", "Cross-validation", id="cv-h"), cv,
                   Block("note", "Each cross-validated model was trained once per fold of the pooled train "
                                 "and val images (grouped, stratified), validated on its own fold; the test "
                                 "split is the same for every fold and chose nothing. Figures: mean ± sample "
                                 "sd over the folds, their range beneath. Out-of-fold: every train/val image "
                                 "scored once, by the fold that did not train on it. The other tables, curves "
                                 "and galleries show the fold chosen on validation (best validation score on "
                                 "its own fold).")]
    blocks += [Block("h3", "The study's four models"),
               Block("p", "The study bloodcell started from reported these test figures; ours are beside "
                          "them, measured under this report's protocol and data."),
               study_table(models, colors)]
    blocks += [Block("h3", "More test metrics"), metrics_table(models, colors)]
    per_source = sources_table(models, colors, ds.get("sources"))
    if per_source is not None:
        blocks += [Block("h3", "Per source (lab)"), per_source]

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
                             "unusual stains and look-alike classes. Then, per class, a few right and "
                             "wrong cells with the Grad-CAM overlay of the saved model: where it looked."))
    for r in ranked(models):
        blocks += wrong_blocks(d, r, colors[r["model"]])
        if not r.get("members"):  # an ensemble has no one model to take a map of
            blocks += cam_blocks(d, run_dir(d, r), r["model"], classes, _slug(r["model"]))

    blocks.append(Block("h2", "Data set", id="data"))
    blocks += dataset_blocks(ds)
    blocks.append(Block("h2", "Protocol and environment", id="protocol-h"))
    blocks += protocol_blocks(res, d)
    return blocks


def confident_errors(preds: list[dict], n: int = MAX_WRONG) -> list[dict]:
    """The n wrong predictions with the highest confidence."""
    wrong = [r for r in preds if r.get("label") != r.get("pred")]
    return sorted(wrong, key=lambda r: -(num(r.get("confidence")) or 0.0))[:n]



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


NAV = (("summary-h", "Summary"), ("curves", "Learning curves"), ("errors", "Errors"),
       ("cost", "Cost"), ("wrong", "Confident mistakes"), ("data", "Data"),
       ("protocol-h", "Protocol"))
FOOTER = "Built by `bloodcell report` from the saved results only."

FIGURE_NAMES = ("learning_curves", "val_overlay", "confusion", "recall", "cost")


def build_report(dir: str | Path) -> tuple[Path, Path]:
    """Write DIR/report.html (self-contained) and DIR/report.md (+ DIR/figures/) from saved results."""
    d = Path(dir)
    res = load_results(d)
    with style():
        blocks = build_blocks(d, res)
    ds = res.get("dataset") or {}
    title = "bloodcell comparison" + (" — synthetic data" if ds.get("synthetic") else "")
    sub = (f"{len(res['models'])} models · created {res.get('created') or MISSING} · "
           f"bloodcell {res.get('bloodcell_version') or MISSING}")
    html_path, md_path = d / "report.html", d / "report.md"
    atomic_write(html_path, render_html(blocks, title, sub, nav=NAV, footer=FOOTER))
    drop_stale_figures(d / "figures", blocks)
    atomic_write(md_path, render_md(blocks, title, sub, d / "figures"))
    return html_path, md_path


def drop_stale_figures(figdir: Path, blocks: list) -> None:
    """A rebuilt report drops the figures of models no longer in it (and keeps any other file)."""
    names = {f"{b.name}.png" for b in blocks if isinstance(b, Figure)}
    for old in figdir.glob("*.png"):
        if old.name not in names and (old.stem in FIGURE_NAMES or old.stem.startswith(("wrong_", "cams_"))):
            old.unlink()
