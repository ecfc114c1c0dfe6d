"""report.sections: the binary headline figures in the headline and the test-metrics table."""

from __future__ import annotations

from bloodcell.report.document import Table, render_html
from bloodcell.report.sections import dataset_blocks, headline, metrics_table


def row(model: str, f1: float, **extra) -> dict:
    test = {"accuracy": 0.8, "macro_f1": 0.7, "balanced_accuracy": 0.75, "auc": 0.91, "ece": 0.05, "n": 839,
            "n_groups": 5, "accuracy_ci": [0.7, 0.9], **extra}
    if f1 is not None:
        test.update(positive_class="IDC", f1_positive=f1, pr_auc=0.874)
    return {"model": model, "val": {"accuracy": 0.7, "macro_f1": 0.6}, "test": test}


def cells(table: Table, model: str) -> dict:
    r = next(r for r in table.rows if r[0].text == model)
    return dict(zip(table.headers, (c.text if hasattr(c, "text") else c for c in r), strict=True))


def test_binary_columns_show_the_saved_figures():
    t = metrics_table([row("cnn2x32", 0.751), row("vgg3", 0.602)], {})
    c = cells(t, "cnn2x32")
    assert c["Test F1 (IDC)"] == "75.1 %" and c["Test PR AUC"] == "0.874" and c["Test ROC AUC"] == "0.910"
    assert c["Test balanced acc"] == "75.0 %" and cells(t, "vgg3")["Test F1 (IDC)"] == "60.2 %"
    assert "Test AUC (macro OvR)" not in t.headers


def test_more_classes_keep_the_old_columns():
    t = metrics_table([row("cnn2x32", None)], {})
    assert "Test AUC (macro OvR)" in t.headers and not any("F1 (" in h for h in t.headers)


def test_headline_card_names_the_positive_class():
    blocks = headline({"dataset": {"classes": ["no IDC", "IDC"], "layout": "idc"}}, [row("cnn2x32", 0.751)], {})
    md = blocks[0].text
    assert "balanced accuracy 75.0 %, F1 (IDC) 75.1 %, ROC AUC 0.910, PR AUC 0.874" in md
    page = render_html(blocks, "t")
    assert "F1 (IDC) 75.1 %" in page


def test_patient_groups_are_named_in_the_data_section():
    blocks = dataset_blocks({"root": "idc", "layout": "idc", "group_by": "patient", "classes": ["no IDC", "IDC"]})
    assert "Groups here are patients" in blocks[0].text


def test_cv_table_shows_mean_sd_and_range_of_the_folds():
    from bloodcell.report.sections import cv_table

    sp = {"mean": 0.8123, "sd": 0.0311, "min": 0.78, "max": 0.85, "n": 3, "values": [0.78, 0.8069, 0.85]}
    r = row("cnn2x32", None)
    assert cv_table([r], {}) is None  # no model cross-validated: no table
    r.update(folds=3, chosen_fold=2, cv={"val": {"accuracy": sp}, "test": {"accuracy": sp, "macro_f1": sp}},
             out_of_fold={"accuracy": 0.801})
    c = cells(cv_table([r], {}), "cnn2x32")
    assert c["Test acc"] == "81.2 % ± 3.1 [78.0–85.0]" and c["Out-of-fold acc"] == "80.1 %"
    assert c["Folds"] == "3" and c["Chosen fold"] == "2" and c["Test cell acc"] == "–"
