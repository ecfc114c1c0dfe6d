"""The tuning report: DIR/report.html of a study, built from the same blocks and rendered by the same
renderer as the compare report.

It takes plain data (``TuneData``: the settings, counts per state, trial rows, the best trial,
importances), which ``bloodcell.tune`` reads from the study's storage; nothing here knows Optuna.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from bloodcell.config import TrainConfig, TuneSettings
from bloodcell.report.document import (
    Block,
    Columns,
    Details,
    Figure,
    Table,
    render_html,
    stylesheet,
)
from bloodcell.report.figures import (
    fig_importances,
    fig_tune_curves,
    fig_tune_history,
    fig_tune_param,
    style,
)
from bloodcell.report.format import value
from bloodcell.runfiles import atomic_write

# The columns of the trial table (and trials.csv) around the parameters.
ROW_HEAD = ("number", "state", "value")
ROW_TAIL = ("epochs_run", "minutes", "note")
QUESTIONS = ("image_size", "batch_size")  # the study's questions: a figure each


@dataclass
class TuneData:
    """What the tuning report shows, as plain data."""

    settings: TuneSettings
    storage: str  # the storage URL, any password hidden
    counts: dict[str, int]  # complete, pruned, failed, running
    rows: list[dict]  # one per trial: number, state, value, params..., epochs_run, minutes, note, _curve
    best: dict | None  # number, value, params, config (best.yaml's content); None before a completion
    importances: dict[str, float]  # parameter -> share of the variance, most important first
    why: str = ""  # why there are no importances


def param_names(rows: list[dict]) -> list[str]:
    """The parameters of the trial rows, sorted."""
    return sorted({k for r in rows for k in r if k not in (*ROW_HEAD, *ROW_TAIL, "_curve")})


def columns(rows: list[dict]) -> list[str]:
    """The trial table's columns: number, state, value, the parameters, epochs_run, minutes, note."""
    return [*ROW_HEAD, *param_names(rows), *ROW_TAIL]


def trial_table(rows: list[dict], best: int | None) -> Table:
    """Every trial, best value first (pruned ones at their last reported value), the best marked."""
    cols = columns(rows)
    order = sorted(rows, key=lambda r: (r["value"] is None, -(r["value"] or 0)))
    numeric = {i for i, c in enumerate(cols) if c not in ("state", "note") and all(
        isinstance(r.get(c), int | float | None) and not isinstance(r.get(c), bool) for r in rows)}
    return Table(cols, [[value(r.get(c)) for c in cols] for r in order], numeric=numeric, id="trials",
                 marked={i for i, r in enumerate(order) if r["number"] == best})


def study_line(data: TuneData) -> Block:
    """What the study is and how far it got."""
    s, c = data.settings, data.counts
    how = f"{'Grid' if s.grid else 'TPE sampler'}, {s.pruner} pruner."
    trials = (f"Trials: {c['complete']} completed, {c['pruned']} pruned, {c['failed']} failed, "
              f"{c['running']} running, of {s.trials} asked for.")
    e = html.escape
    return Block("html", f"Study `{s.study_name()}` in `{data.storage}`, maximising the **validation** "
                         f"{s.metric} (the test split is never used here). {how} {trials}",
                 f"<p>Study <code>{e(s.study_name())}</code> in <code>{e(data.storage)}</code>, maximising "
                 f"the <strong>validation</strong> {e(s.metric)} (the test split is never used here). "
                 f"{e(how)} {e(trials)}</p>")


def best_blocks(data: TuneData) -> list:
    """The best trial's value and parameters, and its whole config folded away."""
    b = data.best
    if b is None:
        return [Block("note", "no trial has completed yet")]
    return [Block("p", f"Trial {b['number']}: val {data.settings.metric} **{b['value']:.4f}**."),
            Table(["Parameter", "Value"], [[k, value(v)] for k, v in b["params"].items()], compact=True),
            Details("The whole configuration (`best.yaml`, for `bloodcell train --config` and "
                    "`compare --config`)", yaml.safe_dump(b["config"], sort_keys=False))]


def tune_blocks(data: TuneData) -> list:
    """The whole tuning report as a list of blocks, in reading order."""
    s = data.settings
    ylabel = f"val {s.metric}"
    fixed = {k: v for k, v in s.space.items() if not isinstance(v, dict)}
    searched = s.grid or {k: v for k, v in s.space.items() if isinstance(v, dict)}
    questions = []
    for key in QUESTIONS:
        fig = fig_tune_param(data.rows, key, ylabel)
        questions.append(Figure(key, fig, alt=key) if fig else Block(
            "note", f"{key} was fixed at {fixed.get(key, s.base.get(key, getattr(TrainConfig, key)))}"))
    blocks: list = [study_line(data), Block("h2", "Best configuration"), *best_blocks(data),
                    Block("h2", "The study's questions"), Columns(questions),
                    Block("h2", "Optimisation"),
                    Columns([Figure("history", fig_tune_history(data.rows, ylabel), alt="history"),
                             Figure("curves", fig_tune_curves(data.rows, ylabel), alt="curves")]),
                    Block("h2", "Parameter importances")]
    blocks.append(Figure("importances", fig_importances(data.importances), alt="importances")
                  if data.importances else Block("note", "Importances " + data.why))
    blocks += [Block("h2", "Trials"), trial_table(data.rows, data.best["number"] if data.best else None),
               Block("h2", "Search space"),
               Block("pre", yaml.safe_dump({"searched": searched, "fixed": fixed, "base": s.base},
                                           sort_keys=False))]
    return blocks


def write_tune_report(data: TuneData, path: Path) -> Path:
    """The self-contained tuning report at ``path`` (DIR/report.html)."""
    with style():
        blocks = tune_blocks(data)
    s = data.settings
    page = render_html(blocks, f"Tuning {s.model} on {s.data}", doc_title=f"bloodcell tune: {s.study_name()}",
                       footer=f"Generated {time.strftime('%Y-%m-%d %H:%M')} by bloodcell tune report "
                              "from the study's storage.", css=stylesheet("tune.css"))
    return atomic_write(path, page)
