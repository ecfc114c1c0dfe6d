"""The compare report's sections: the headline, the tables, the data set and the protocol, as blocks."""

from __future__ import annotations

import html
from pathlib import Path

from bloodcell.catalog import STUDY
from bloodcell.report.document import Block, Cell, Table
from bloodcell.report.format import (
    MISSING,
    ci_text,
    count,
    fixed,
    metric,
    num,
    params,
    pct,
    pct_ci,
    setting,
)


def ranked(models: list[dict]) -> list[dict]:
    """Models by test accuracy, best first; those without a test score last (by val accuracy)."""
    def key(r):
        t, v = num(metric(r, "test", "accuracy")), num(metric(r, "val", "accuracy"))
        return (t is None, -(t or 0.0), -(v or 0.0))

    return sorted(models, key=key)


def _best(models: list[dict], split: str) -> dict | None:
    have = [r for r in models if num(metric(r, split, "accuracy")) is not None]
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
        binary = _binary_text(t)
        cards_md.append(f"**Best on test: {bt['model']}** — accuracy {acc}, 95 % CI "
                        f"{ci_text(t.get('accuracy_ci'))}, macro-F1 {f1}{', ' + binary if binary else ''}, "
                        f"on {n} test images.")
        cards_html.append(_card("Best on test", bt["model"], colors, acc,
                                f"95 % CI {ci_text(t.get('accuracy_ci'))} · macro-F1 {f1} · "
                                + (f"{binary.replace(', ', ' · ')} · " if binary else "") + f"n = {n}"))
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


def _binary_text(m: dict) -> str:
    """'balanced accuracy 84.0 %, F1 (IDC) 75.1 %, ROC AUC 0.912, PR AUC 0.874' for binary data, else ''."""
    if not isinstance(m, dict) or "f1_positive" not in m:
        return ""
    return (f"balanced accuracy {pct(m.get('balanced_accuracy'))}, F1 ({m.get('positive_class', '?')}) "
            f"{pct(m.get('f1_positive'))}, ROC AUC {fixed(m.get('auc'))}, PR AUC {fixed(m.get('pr_auc'))}")


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
        ep, best = num(r.get("epochs_run")), num(r.get("best_epoch"))
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
    """The remaining test metrics: balanced accuracy, AUC, calibration, sizes; for two classes the
    binary headline figures too (F1 of the positive class, ROC AUC, PR AUC)."""
    positive = next((metric(r, "test", "positive_class") for r in models if metric(r, "test", "f1_positive")
                     is not None), None)
    binary = ["f1_positive", "pr_auc"] if positive else []
    rows = [[_swatch(r["model"], colors), pct(metric(r, "val", "macro_f1")),
             pct(metric(r, "test", "balanced_accuracy")), *[(pct if k == "f1_positive" else fixed)(
                 metric(r, "test", k)) for k in binary], fixed(metric(r, "test", "auc")),
             fixed(metric(r, "test", "ece")), count(metric(r, "test", "n")),
             count(metric(r, "test", "n_groups")), r.get("norm") or MISSING]
            for r in ranked(models)]
    headers = ["Model", "Val macro-F1", "Test balanced acc",
               *([f"Test F1 ({positive})", "Test PR AUC", "Test ROC AUC"] if positive else ["Test AUC (macro OvR)"]),
               "Test ECE", "Test images", "Test cells (groups)", "Norm"]
    return Table(headers, rows, numeric=set(range(1, len(headers) - 1)), id="test-metrics")


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
    "patient": " Groups here are patients (the IDC layout's patient folders): no patient is on both sides "
               "of a split.",
    "column": " Groups here come from the label table's group column.",
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
                    v = sum(num(x) or 0 for x in d.values()) if c == "Total" and d else d.get(c)
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


def sources_table(models: list[dict], colors: dict, sources: list[dict]) -> Table | None:
    """Validation and test accuracy of each model on each source (lab), where there are several."""
    roots = [s.get("root", MISSING) for s in sources or []]
    if len(roots) < 2:
        return None
    splits = [s for s in ("val", "test") if any(metric(r, s, "per_source") for r in models)]
    rows = []
    for r in ranked(models):
        cells = [_swatch(r["model"], colors)]
        for s in splits:
            per = metric(r, s, "per_source") or {}
            cells += [pct((per.get(root) or {}).get("accuracy")) for root in roots]
        rows.append(cells)
    headers = ["Model"] + [f"{s} acc, {root}" for s in splits for root in roots]
    return Table(headers, rows, numeric=set(range(1, len(headers))), id="per-source",
                 caption="Each source (lab) was split on its own; validation chose the epoch on all of "
                         "them pooled.")


def _spread(sp) -> Cell:
    """'91.2 % ± 1.3' (mean ± sample sd over the folds), the folds' range beneath in HTML."""
    if not isinstance(sp, dict) or num(sp.get("mean")) is None:
        return Cell(MISSING)
    main = f"{pct(sp['mean'])} ± {100 * float(sp.get('sd') or 0):.1f}"
    return _two_line(main, f"{100 * float(sp['min']):.1f}–{100 * float(sp['max']):.1f}")


def cv_table(models: list[dict], colors: dict) -> Table | None:
    """Cross-validated models (--folds): mean ± sd over the folds of val and test figures, the
    out-of-fold figure and the fold chosen on validation; None where no model was cross-validated."""
    rows = []
    for r in ranked(models):
        cv = r.get("cv")
        if not isinstance(cv, dict):
            continue
        val, test = cv.get("val") or {}, cv.get("test") or {}
        rows.append([_swatch(r["model"], colors), count(r.get("folds")), _spread(val.get("accuracy")),
                     _spread(test.get("accuracy")), _spread(test.get("macro_f1")),
                     _spread(test.get("group_accuracy")), pct((r.get("out_of_fold") or {}).get("accuracy")),
                     count(r.get("chosen_fold"))])
    if not rows:
        return None
    return Table(["Model", "Folds", "Val acc (own fold)", "Test acc", "Test macro-F1", "Test cell acc",
                  "Out-of-fold acc", "Chosen fold"], rows, numeric={1, 2, 3, 4, 5, 6, 7}, id="cv")
