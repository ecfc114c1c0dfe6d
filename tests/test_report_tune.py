"""The tuning report: built from plain data with the report's blocks, showing what the study holds,
and never switching the caller's matplotlib backend."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys

import pytest

optuna = pytest.importorskip("optuna")

from test_tune_study import DATA, TINY  # noqa: E402

from bloodcell.config import TuneSettings  # noqa: E402
from bloodcell.report.tune import TuneData, write_tune_report  # noqa: E402
from bloodcell.tune import tune, tune_report  # noqa: E402


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A finished three-trial study, without its report yet."""
    out = tmp_path_factory.mktemp("tune") / "study"
    tune(DATA, "cnn4x32", 3, out, space={**TINY, "epochs": 1}, base={"threads": 1}, pruner="none",
         sampler_seed=0, report=False, log=lambda m: None)
    return out


@pytest.mark.slow
def test_tune_report_leaves_the_matplotlib_backend_alone(study_dir):
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a caller's own backend (a notebook's, say), not the Agg a PNG needs
    try:
        tune_report(study_dir, log=lambda m: None)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (study_dir / "report.html").read_text().count("data:image/png;base64,") >= 4


@pytest.mark.slow
def test_tune_report_shows_what_the_study_holds(study_dir):
    tune_report(study_dir, log=lambda m: None)
    summary = json.loads((study_dir / "summary.json").read_text())
    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{study_dir}/study.db")
    best = study.best_trial
    assert (summary["best_trial"], summary["best_value"]) == (best.number, best.value)

    page = (study_dir / "report.html").read_text()
    text = html.unescape(re.sub(r"<[^>]+>", "", page[page.index("</style>"):]))
    assert f"Trial {best.number}: val macro_f1 {best.value:.4f}." in text
    assert (f"Trials: {summary['complete']} completed, {summary['pruned']} pruned, {summary['failed']} failed, "
            f"{summary['running']} running, of 3 asked for.") in text
    assert summary["complete"] == 3
    # the folded config is best.yaml, word for word
    details = page[page.index("<details>"):page.index("</details>")]
    assert html.unescape(re.sub(r"<[^>]+>", "", details.split("</summary>")[1])) == \
        (study_dir / "best.yaml").read_text()
    # one row per trial, best value first, the best trial's row (and only it) marked
    table = page[page.index('<table id="trials"'):]
    table = table[:table.index("</table>")]
    rows = re.findall(r"<tr( class=\"best\")?>(.*?)</tr>", table.split("<tbody>")[1])
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r) for _, r in rows]
    assert sorted(int(c[0]) for c in cells) == [t.number for t in study.trials]
    assert [m for m, _ in rows] == [' class="best"'] + [""] * (len(rows) - 1)
    assert cells[0][:3] == [str(best.number), "complete", f"{best.value:.4g}"]
    values = [float(c[2]) for c in cells]
    assert values == sorted(values, reverse=True)


def test_tune_report_before_any_trial_says_so(tmp_path):
    settings = TuneSettings(data=DATA, space={"image_size": 48, "batch_size": {"choices": [16, 32]}})
    data = TuneData(settings=settings, storage="postgresql://me:***@db/x",
                    counts={"complete": 0, "pruned": 0, "failed": 0, "running": 1}, rows=[], best=None,
                    importances={}, why="needs at least 3 completed trials (0 so far)")
    page = write_tune_report(data, tmp_path / "report.html").read_text()
    assert "<code>postgresql://me:***@db/x</code>" in page  # the masked URL, as it is
    assert "Trials: 0 completed, 0 pruned, 0 failed, 1 running, of 20 asked for." in page
    assert '<p class="note">no trial has completed yet</p>' in page
    assert '<p class="note">image_size was fixed at 48</p>' in page
    assert "Importances needs at least 3 completed trials (0 so far)" in page
    assert "http://" not in page and "https://" not in page


@pytest.mark.slow
def test_the_report_package_does_not_import_optuna():
    code = "import sys, bloodcell.report; print('optuna' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
