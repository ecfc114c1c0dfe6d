"""Optuna studies over the training config: resumable, prunable, and shared between machines.

>>> from bloodcell.tune import tune, tune_report
>>> summary = tune("synthetic:400", "cnn4x32", trials=8, out="runs/tune")
>>> summary["best_value"], summary["best_config"]          # best.yaml is a `train --config` file

A study lives in a storage (by default ``DIR/study.db``, SQLite); every process that opens the same
storage and study name is one more worker. Trials run `bloodcell.training.train.train` on the train and val
splits only: the test split is dropped before a trial starts, so it cannot choose anything.

Modules: ``space`` (what a study searches), ``study`` (Optuna: storage, sampler, pruner, recovery,
the report's data), ``objective`` (one trial), ``run`` (``tune``, the summary and the report).
"""

from bloodcell.tune.objective import make_objective
from bloodcell.tune.run import best_config, summarise, tune, tune_report
from bloodcell.tune.space import (
    Choice,
    Range,
    check_sizes,
    default_space_path,
    load_space,
    parse_grid,
    space_to_yaml,
    suggest,
)
from bloodcell.tune.study import open_study, read_settings

__all__ = ["Choice", "Range", "best_config", "check_sizes", "default_space_path", "load_space",
           "make_objective", "open_study", "parse_grid", "read_settings", "space_to_yaml", "suggest",
           "summarise", "tune", "tune_report"]
