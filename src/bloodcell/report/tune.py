"""The tuning report: DIR/report.html of a study, built from the same blocks and rendered by the same
renderer as the compare report.

It takes plain data (``TuneData``: the settings, counts per state, trial rows, the best trial,
importances), which ``bloodcell.tune`` reads from the study's storage; nothing here knows Optuna.
Its figures (the optimisation history, validation per epoch, parameter importances and the metric
against one parameter) are drawn here with the shared look of ``report/figures.py``.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
from bloodcell.report.figures import figure, png, style
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
    what, why = ("validation", "") if s.select != "lab-out" else (
        "left-out-lab", " Each trial trains one model per lab on the other labs and is scored on that "
        "lab's train and val images; its value is the mean over the labs.")
    return Block("html", f"Study `{s.study_name()}` in `{data.storage}`, maximising the **{what}** "
                         f"{s.metric} (the test split is never used here).{why} {how} {trials}",
                 f"<p>Study <code>{e(s.study_name())}</code> in <code>{e(data.storage)}</code>, maximising "
                 f"the <strong>{what}</strong> {e(s.metric)} (the test split is never used here).{e(why)} "
                 f"{e(how)} {e(trials)}</p>")


def best_blocks(data: TuneData) -> list:
    """The best trial's value and parameters, and its whole config folded away."""
    b = data.best
    if b is None:
        return [Block("note", "no trial has completed yet")]
    return [Block("p", f"Trial {b['number']}: {data.settings.value_name()} **{b['value']:.4f}**."),
            Table(["Parameter", "Value"], [[k, value(v)] for k, v in b["params"].items()], compact=True),
            Details("The whole configuration (`best.yaml`, for `bloodcell train --config` and "
                    "`compare --config`)", yaml.safe_dump(b["config"], sort_keys=False))]


def curves_block(data: TuneData):
    """The validation curve of every trial, or a note why there is none."""
    if any(r["_curve"] for r in data.rows):
        return Figure("curves", fig_tune_curves(data.rows, f"val {data.settings.metric}"), alt="curves")
    if data.settings.select == "lab-out":
        return Block("note", "No curve per epoch: with --select lab-out each trial trains one model per "
                             "lab and reports only its value.")
    return Block("note", "No trial has reported an epoch yet.")


def tune_blocks(data: TuneData) -> list:
    """The whole tuning report as a list of blocks, in reading order."""
    s = data.settings
    ylabel = s.value_name()
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
                             curves_block(data)]),
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


# --- the tuning report: rows are tune's trial rows (number, state, value, params, _curve) -------


def fig_tune_history(rows: list[dict], ylabel: str) -> bytes:
    """Each trial's value by trial number, pruned ones at their last report, and the best so far."""
    done = [r for r in rows if r["state"] == "complete"]
    pruned = [r for r in rows if r["state"] == "pruned" and r["value"] is not None]
    fig = figure(6.4, 3.6)
    ax = fig.subplots()
    ax.scatter([r["number"] for r in done], [r["value"] for r in done], label="completed", zorder=3)
    ax.scatter([r["number"] for r in pruned], [r["value"] for r in pruned], marker="x", c="grey",
               label="pruned (last reported value)", zorder=3)
    if done:
        order = sorted(done, key=lambda r: r["number"])
        best = np.maximum.accumulate([r["value"] for r in order])
        ax.step([r["number"] for r in order], best, where="post", c="C3", label="best so far")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="trial", ylabel=ylabel, title="Optimisation history")
    ax.legend(fontsize=8)
    return png(fig)


def fig_tune_curves(rows: list[dict], ylabel: str) -> bytes:
    """The validation metric per epoch of every trial; pruned ones dotted."""
    fig = figure(6.4, 3.6)
    ax = fig.subplots()
    for r in rows:
        if r["_curve"]:
            ax.plot(list(r["_curve"]), list(r["_curve"].values()), alpha=0.7,
                    ls="-" if r["state"] == "complete" else ":", marker=".")
    ax.set(xlabel="epoch", ylabel=ylabel, title="Validation per epoch (dotted: pruned)")
    return png(fig)


def fig_importances(importances: dict[str, float]) -> bytes:
    """Horizontal bars, the most important parameter on top."""
    names = list(importances)[::-1]
    fig = figure(6.4, 0.4 * len(names) + 1.2)
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance (share of the variance in the metric)", title="Parameter importances")
    return png(fig)


def fig_tune_param(rows: list[dict], key: str, ylabel: str) -> bytes | None:
    """The metric against one parameter: completed trials jittered, their best and median, pruned
    ones as x; None when no completed trial has the parameter."""
    done = [r for r in rows if r["state"] == "complete"]
    pruned = [r for r in rows if r["state"] == "pruned" and r["value"] is not None]
    pts = [(r[key], r["value"]) for r in done if r.get(key) is not None]
    pp = [(r[key], r["value"]) for r in pruned if r.get(key) is not None]
    if not pts:
        return None
    fig = figure(6.4, 3.6)
    ax = fig.subplots()
    xs = sorted({x for x, _ in pts + pp})
    rng = np.random.default_rng(0)
    for i, x in enumerate(xs):
        ys = [y for xx, y in pts if xx == x]
        if not ys:
            continue
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(ys)), ys, c="C0", alpha=0.7, zorder=3)
        ax.plot([i - 0.3, i + 0.3], [max(ys)] * 2, c="C3", lw=2)
        ax.plot([i - 0.3, i + 0.3], [float(np.median(ys))] * 2, c="k", lw=1)
    ax.scatter([xs.index(x) for x, _ in pp], [y for _, y in pp], marker="x", c="grey", zorder=2)
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set(xlabel=key, ylabel=ylabel, title=f"{ylabel} against {key} (red: best, black: median, x: pruned)")
    return png(fig)
