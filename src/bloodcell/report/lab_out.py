"""The leave-one-lab-out report: DIR/report.html and report.md from a crosslab folder's crosslab.json.

The lab-by-lab matrix (rows: the held-out lab; its own column is the accuracy on that unseen lab,
the others are the model's test accuracy on the labs it was trained on), the held-out figures with
their intervals, each held-out lab's confusion matrix, where measured the accuracy against labelled
cells per class of the held-out lab (table and plot), and a contact sheet of each lab's images as
the model sees them (DIR/crops.npz).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bloodcell.errors import BloodcellError
from bloodcell.report.document import Block, Cell, Figure, Table, render_html, render_md
from bloodcell.report.figures import PALETTE, fig_confusions, figure, pct_axis, png, style
from bloodcell.report.format import MISSING, count, fixed, pct, pct_ci, setting
from bloodcell.runfiles import atomic_write, read_json

NAV = (("matrix", "Lab matrix"), ("held-out", "Held-out labs"), ("confusion", "Confusions"),
       ("labels", "Labels needed"), ("crops", "Crops"), ("protocol", "Protocol"))
FOOTER = "Built by `bloodcell crosslab` from crosslab.json."


def matrix_table(res: dict) -> Table:
    """Rows: held-out lab; columns: the lab scored; the diagonal (bold) is the unseen lab."""
    names = [lab["name"] for lab in res["labs"]]
    rows = []
    for row in names:
        cells = [row]
        for col in names:
            v = res["matrix"].get(row, {}).get(col)
            cells.append(Cell(f"**{pct(v)}**", f"<strong>{pct(v)}</strong>") if row == col else pct(v))
        rows.append(cells)
    return Table(["Held-out lab", *names], rows, numeric=set(range(1, len(names) + 1)), id="lab-matrix",
                 caption="Accuracy of the model that never saw the row's lab: on that lab (diagonal, bold) and "
                         "on the test splits of the labs it was trained on.")


def held_out_table(res: dict) -> Table:
    """The held-out figures of each fold, with their 95 % intervals and what it was trained on."""
    rows = []
    for f in res["folds"]:
        m = f["held_out_metrics"]
        rows.append([f["name"], pct_ci(m.get("accuracy"), m.get("accuracy_ci")), pct(m.get("macro_f1")),
                     pct(m.get("balanced_accuracy")), count(m.get("n")),
                     ", ".join(Path(s.rstrip("/")).name for s in f["trained_on"]),
                     count(f.get("best_epoch")), fixed(f.get("train_minutes"), 1)])
    return Table(["Held-out lab", "Accuracy [95 % CI]", "Macro-F1", "Balanced acc", "Images", "Trained on",
                  "Best epoch", "Train min"], rows, numeric={1, 2, 3, 4, 6, 7}, id="held-out-table")


def label_curve_table(curve: dict) -> Table:
    """Rows: held-out lab; columns: test accuracy there as trained, adapted, and with K labels."""
    ks = sorted({int(k) for c in curve.values() for k in c["k"]})
    rows = []
    for lab, c in curve.items():
        cells = [lab, count(c.get("n_test")), pct(c["trained"]["accuracy"]), pct(c["adapted"]["accuracy"])]
        for k in ks:
            v = c["k"].get(str(k))
            few = v and any(n < k for n in v["cells"].values())  # the lab's train split had fewer cells
            cells.append(MISSING if not v else pct(v["accuracy"]) + ("*" if few else ""))
        rows.append(cells)
    return Table(["Held-out lab", "Test images", "K = 0", "K = 0, adapted", *(f"K = {k}" for k in ks)], rows,
                 numeric=set(range(1, 4 + len(ks))), id="label-curve",
                 caption="Accuracy on the held-out lab's test split against K labelled cells per class of its "
                         "train split (fine-tuned from the fold's model; adapted: no label, its train images' "
                         "statistics). *: a class had fewer than K cells there, all were used.")


def build_blocks(res: dict, crops: dict | None = None) -> list:
    """The whole report as blocks, in reading order."""
    classes = list(res.get("classes") or [])
    folds = res.get("folds") or []
    if not folds:
        raise BloodcellError("crosslab.json lists no fold")
    held = [f["held_out_metrics"]["accuracy"] for f in folds]
    blocks: list = [Block("p", f"Each of {len(folds)} labs was left out once: a {res['protocol'].get('model')} "
                               "was trained on the others (validation from those labs only) and tested on every "
                               f"image of the one left out, on the classes all labs share ({', '.join(classes)}). "
                               f"Held-out accuracy: {pct(min(held))} to {pct(max(held))}.")]
    blocks += [Block("h2", "Lab matrix", id="matrix"), matrix_table(res)]
    blocks += [Block("h2", "Held-out labs", id="held-out"), held_out_table(res)]
    rows = [{"model": f["name"], "test": f["held_out_metrics"]} for f in folds]
    colors = {r["model"]: PALETTE[i % len(PALETTE)] for i, r in enumerate(rows)}
    blocks += [Block("h2", "Confusion of each held-out lab", id="confusion"),
               Figure("crosslab_confusion", fig_confusions(rows, classes, colors),
                      alt="confusion matrix of each held-out lab",
                      caption="Rows: the true class, normalised; a panel per held-out lab.")]
    if res.get("label_curve"):
        blocks += [Block("h2", "How many cells must a new lab label?", id="labels"), label_curve_table(res["label_curve"]),
                   Figure("crosslab_labels", fig_label_curve(res["label_curve"]),
                          alt="test accuracy against labelled cells per class, per held-out lab",
                          caption="Hollow marker: adapted without labels (bloodcell adapt).")]
    if crops:
        blocks += [Block("h2", "Each lab's images as the model sees them", id="crops"),
                   Figure("crosslab_crops", fig_contact_sheet(crops), alt="a row of crops per lab",
                          caption=f"resize {res['protocol'].get('resize')}, {res['protocol'].get('image_size')} px: "
                                  "the first test images of each class; the white cell should fill the frame "
                                  "alike in every lab.")]
    proto = res.get("protocol") or {}
    blocks += [Block("h2", "Protocol", id="protocol"), Block("pre", res.get("command") or MISSING),
               Table(["Setting", "Value"], [[k, setting(v)] for k, v in proto.items()], compact=True)]
    return blocks


def build_crosslab_report(dir: str | Path) -> Path:
    """Write DIR/report.html (self-contained) and DIR/report.md (+ DIR/figures/); return the HTML's path."""
    d = Path(dir)
    path = d / "crosslab.json"
    if not path.is_file():
        raise BloodcellError(f"{d} holds no crosslab.json ('bloodcell crosslab --out DIR' writes one)")
    res = read_json(path)
    crops = None
    if (d / "crops.npz").is_file():
        with np.load(d / "crops.npz") as z:
            crops = {k: z[k] for k in z.files}
    with style():
        blocks = build_blocks(res, crops)
    title = "bloodcell leave-one-lab-out"
    sub = f"{len(res['folds'])} labs · created {res.get('created') or MISSING} · bloodcell {res.get('bloodcell_version')}"
    atomic_write(d / "report.html", render_html(blocks, title, sub, nav=NAV, footer=FOOTER))
    atomic_write(d / "report.md", render_md(blocks, title, sub, d / "figures"))
    return d / "report.html"


# --- figures ---------------------------------------------------------------------------------------


def fig_label_curve(curve: dict) -> bytes:
    """Crosslab: per held-out lab, test accuracy against labelled cells per class (0: as trained,
    and adapted without labels, the hollow marker at 0)."""
    fig = figure(6.2, 3.4)
    ax = fig.subplots()
    for i, (lab, c) in enumerate(curve.items()):
        color = PALETTE[i % len(PALETTE)]
        ks = sorted(int(k) for k in c["k"])
        xs = [0, *ks]
        ax.plot(xs, [c["trained"]["accuracy"], *(c["k"][str(k)]["accuracy"] for k in ks)], "o-", color=color,
                label=lab)
        ax.plot([0], [c["adapted"]["accuracy"]], "o", mfc="white", color=color)
    ax.plot([], [], "o", mfc="white", color="#6b7280", label="adapted, no label")
    ax.set_xscale("symlog", linthresh=5)
    ax.set_xticks([0, 5, 10, 25, 50], ["0", "5", "10", "25", "50"])
    ax.set_xlabel("labelled cells per class of the held-out lab")
    ax.set_ylabel("test accuracy there")
    ax.set_ylim(0, 1)
    pct_axis(ax)
    ax.legend(loc="lower right", frameon=False)
    return png(fig)


def fig_contact_sheet(crops: dict[str, np.ndarray]) -> bytes:
    """One row per lab of the images as the model sees them (size, resize): do the cells fill the
    frame alike in every lab?"""
    n = max(len(a) for a in crops.values())
    fig = figure(1.0 * n + 1.2, 1.0 * len(crops) + 0.2)
    axs = fig.subplots(len(crops), n, squeeze=False)
    for r, (lab, arr) in enumerate(crops.items()):
        for c in range(n):
            ax = axs[r, c]
            ax.set_axis_off()
            if c < len(arr):
                ax.imshow(arr[c])
        axs[r, 0].set_axis_on()
        axs[r, 0].set_xticks([])
        axs[r, 0].set_yticks([])
        axs[r, 0].grid(False)
        for s in axs[r, 0].spines.values():
            s.set_visible(False)
        axs[r, 0].set_ylabel(lab, rotation=0, ha="right", va="center")
    return png(fig)
