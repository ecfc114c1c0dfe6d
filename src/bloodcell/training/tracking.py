"""Experiment logs beyond the run folder's own files: TensorBoard event files and MLflow runs.

>>> from bloodcell.training.tracking import Tracker
>>> t = Tracker(("tensorboard",), "runs/a", name="runs/a", config=cfg.to_dict())
>>> t.epoch(1, {"train_loss": 0.9, "val_acc": 0.61}); t.final({"test/accuracy": 0.7}); t.close()

One interface whatever the trackers (``--log tensorboard,mlflow``; none: every call does nothing):
the config when it opens, a row of figures per epoch, the final figures, files (metrics.json, a
report) and the end. A tracker that fails (its server gone, its disk full) is dropped with one
warning line and the run goes on: the run folder, history.csv among it, is the record that counts.

- tensorboard: ``torch.utils.tensorboard.SummaryWriter`` writing to ``RUN/tensorboard/``
  (``tensorboard --logdir RUN`` shows it; a parent folder shows its folds or models side by side);
  the config and Markdown files as text.
- mlflow: one MLflow run through the client API (``MlflowClient``), experiment ``bloodcell`` (or
  ``$MLFLOW_EXPERIMENT_NAME``) at the tracking URI given, else ``$MLFLOW_TRACKING_URI``, else
  MLflow's local store; the config as parameters, files as artifacts. Its id is kept in
  ``RUN/tracking.json``, so ``--resume`` continues the same MLflow run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import yaml

from bloodcell.config import TRACKERS
from bloodcell.errors import BloodcellError
from bloodcell.runfiles import write_json

STATE_FILE = "tracking.json"
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # tracker -> the module it needs


def check_trackers(names) -> None:
    """Raise a one-line BloodcellError where a tracker asked for is not installed (before a run
    writes anything)."""
    for n in names:
        if n not in TRACKERS:
            raise BloodcellError(f"unknown tracker {n!r}; known: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(PACKAGES[n]) is None:
            raise BloodcellError(f"--log {n} needs the {PACKAGES[n]} package: pip install 'bloodcell[{n}]'")


def _tag(key: str) -> str:
    """A history column as a tracker's name: train_loss -> train/loss, val_macro_f1 -> val/macro_f1."""
    for split in ("train_", "val_"):
        if key.startswith(split):
            return split[:-1] + "/" + key[len(split):]
    return key


def flat_metrics(metrics: dict) -> dict[str, float]:
    """A metrics.json tree's plain numbers as {"test/accuracy": ..., "run/train_minutes": ...}."""
    out = {}
    for split, m in metrics.items():
        if not isinstance(m, dict):
            continue
        for k, v in m.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and v == v:
                out[f"{split}/{k}"] = float(v)
    return out


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, name: str, config: dict, state: dict):
        from torch.utils.tensorboard import SummaryWriter  # lazy: the optional tensorboard package

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.last_step = 0
        if config:
            self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```")

    def epoch(self, step: int, row: dict) -> None:
        for k, v in row.items():
            if isinstance(v, int | float) and k != "epoch":
                self.writer.add_scalar(_tag(k), v, step)
        self.last_step = step
        self.writer.flush()

    def final(self, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"final/{k}", v, self.last_step)
        self.writer.flush()

    def artifact(self, path: Path) -> None:
        if path.suffix == ".md":  # a report as text; other files stay in the run folder
            self.writer.add_text(path.stem, path.read_text())

    def close(self, ok: bool) -> None:
        self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, run_dir: Path, name: str, config: dict, state: dict, uri: str | None = None,
                 tags: dict | None = None):
        from mlflow.entities import Param  # lazy: the optional mlflow package
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)  # None: $MLFLOW_TRACKING_URI, else the local store
        old = state.get("mlflow_run_id")
        if old and state.get("mlflow_uri") == self.client.tracking_uri:  # --resume: the same run goes on
            self.run_id = old
            self.client.update_run(old, status="RUNNING")
        else:
            exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "bloodcell"
            exp = self.client.get_experiment_by_name(exp_name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(exp_name)
            run = self.client.create_run(exp_id, run_name=name, tags={
                "bloodcell.run_dir": str(run_dir.resolve()), **(tags or {})})
            self.run_id = run.info.run_id
            params = [Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v))
                      for k, v in config.items()]
            for i in range(0, len(params), 100):  # the client's batch limit
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        state.update(mlflow_run_id=self.run_id, mlflow_uri=self.client.tracking_uri)
        self.last_step = 0

    def epoch(self, step: int, row: dict) -> None:
        from mlflow.entities import Metric  # lazy: the optional mlflow package

        now = int(time.time() * 1000)
        metrics = [Metric(_tag(k), float(v), now, step) for k, v in row.items()
                   if isinstance(v, int | float) and k != "epoch"]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.last_step = step

    def final(self, values: dict) -> None:
        from mlflow.entities import Metric  # lazy: the optional mlflow package

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, self.last_step) for k, v in values.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


class Tracker:
    """The experiment trackers of one run folder, behind one interface; a failing one is dropped
    with a warning line (``log``), never failing the run."""

    def __init__(self, names, run_dir: str | os.PathLike, *, name: str, config: dict | None = None,
                 uri: str | None = None, tags: dict | None = None, log=print):
        self.run_dir, self.log = Path(run_dir), log
        self.backends: list = []
        if not names:
            return
        check_trackers(names)
        state_file = self.run_dir / STATE_FILE
        try:
            self.state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        except ValueError:
            self.state = {}
        for n in names:
            try:
                if n == "tensorboard":
                    self.backends.append(_TensorBoard(self.run_dir, name, config or {}, self.state))
                else:
                    self.backends.append(_MLflow(self.run_dir, name, config or {}, self.state, uri, tags))
            except Exception as e:  # noqa: BLE001 - a tracker never fails the run
                self._warn(n, e)
        if any(b.name == "mlflow" for b in self.backends):
            self._save_state()

    def _save_state(self) -> None:
        try:
            write_json(self.run_dir / STATE_FILE, self.state)
        except OSError as e:
            self.log(f"warning: could not save {self.run_dir / STATE_FILE} ({e}); --resume starts a new MLflow run")

    def _warn(self, name: str, e: Exception) -> None:
        self.log(f"warning: {name} logging failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                 f"the run goes on without it (its folder and history.csv keep everything)")

    def _each(self, method: str, *args) -> None:
        for b in list(self.backends):
            try:
                getattr(b, method)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker never fails the run
                self.backends.remove(b)
                self._warn(b.name, e)

    def epoch(self, step: int, row: dict) -> None:
        """One epoch's figures (a history.csv row)."""
        self._each("epoch", step, row)

    def final(self, values: dict[str, float]) -> None:
        """The final figures (flat_metrics of metrics.json, or a summary's)."""
        self._each("final", values)

    def artifact(self, *paths: str | os.PathLike) -> None:
        """Files to keep with the tracked run (those that exist)."""
        for p in paths:
            if Path(p).is_file():
                self._each("artifact", Path(p))

    def close(self, ok: bool = True) -> None:
        """End the tracked run (finished, or failed where ``ok`` is false)."""
        self._each("close", ok)
        self.backends = []


def record(names, run_dir: str | os.PathLike, *, name: str, config: dict, values: dict[str, float],
           files=(), uri: str | None = None, tags: dict | None = None, log=print) -> None:
    """One tracked run holding a finished result (a comparison, a cross-validation): its
    config, final figures and files."""
    if not names:
        return
    t = Tracker(names, run_dir, name=name, config=config, uri=uri, tags=tags, log=log)
    t.final(values)
    t.artifact(*files)
    t.close(True)
