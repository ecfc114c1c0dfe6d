"""Reports from saved results: a compare folder's report.html and report.md, and a study's report.html.

Usage:
    bloodcell report runs/compare        # rebuilds runs/compare/report.html and report.md

>>> from bloodcell.report import build_report
>>> html_path, md_path = build_report("runs/compare")

Reads only what `bloodcell compare` saved (results.json, runs/<model>/history.csv and
predictions_test.csv) and never trains: a report can be rebuilt, restyled or extended long after the
runs. Both files are built from one list of blocks, so their tables are the same. The HTML opens
offline: CSS inline, every figure a base64 PNG, no script and no external resource. The Markdown
links the same figures as PNG files in figures/. The tuning report (``write_tune_report``, which
``bloodcell tune`` calls) is built from the same blocks and renderer.

Each model keeps one colour (Okabe-Ito, colour-blind safe) in every figure, by its order in the
protocol, so it can be followed from plot to plot. Models are ranked by test accuracy for reading
only; the compare protocol selects each model's epoch on validation and nothing on test.

Modules: ``document`` (the blocks and the HTML/Markdown renderer), ``format`` (numbers as shown),
``figures`` (every figure), ``compare`` (the compare report), ``tune`` (the tuning report), ``count``
(the differential count's report, which ``bloodcell count`` writes).
"""

from bloodcell.report.compare import build_report
from bloodcell.report.format import ci_text, fixed, params, pct, pct_ci, setting
from bloodcell.report.tune import TuneData, write_tune_report

__all__ = ["TuneData", "build_report", "ci_text", "fixed", "params", "pct", "pct_ci", "setting",
           "write_tune_report"]
