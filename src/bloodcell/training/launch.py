"""``--nproc N``: a run on N processes of this machine through torch's own elastic launcher, as
``torchrun --standalone --nproc-per-node N`` runs it; the parent's side (the workers' side is
``bloodcell.training.distributed``).

>>> from bloodcell.training.launch import launch
>>> launch(["train", "--config", "cfg.yaml", "--out", "runs/r"], 2, Path("runs/r"))
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from bloodcell.errors import BloodcellError
from bloodcell.runtime import Interrupted
from bloodcell.training.distributed import PARENT_ENV, SPLITS_ENV, Reported


def launch(argv: list[str], nproc: int, out: Path, on_row: Callable[[dict], None] | None = None,
           resume: bool = False, log: Callable[[str], None] | None = None,
           splits: list[str] | None = None) -> None:
    """Run ``python -m bloodcell *argv`` as nproc processes on this machine and wait for them.

    ``on_row(row)`` is called here, in this process, for each new row of ``out/history.csv`` (a
    tuner's pruning check); if it raises, the workers are stopped and that is raised. The workers
    print to this process's stdout and stderr; with ``log``, rank 0's stdout goes to ``log``
    instead, line by line, once the run has ended (a tuner's trial log). ``splits``: the only
    splits the workers load (a tuner's trials have no test split). Ctrl-C or
    SIGTERM stops every worker at its next batch; one that dies ends the others; either way one
    line says so (a BloodcellError or Interrupted) and the run folder stays resumable.
    """
    # lazy: torch.distributed.elastic is only needed by a launching process
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logs = tempfile.mkdtemp(prefix="bloodcell-nproc-logs-")  # the launcher's own folder, removed below
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"bloodcell-{uuid.uuid4().hex}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          logs_specs=DefaultLogsSpecs(log_dir=logs, redirects=Std.OUT if log else Std.NONE))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("torch.distributed")]
    levels = [lg.level for lg in loggers]
    env_before = {k: os.environ.get(k) for k in (PARENT_ENV, SPLITS_ENV, "TORCHELASTIC_SIGNALS_TO_HANDLE")}
    watcher = HistoryWatcher(out / "history.csv", on_row, resume) if on_row is not None else None
    hint = f"finished epochs are saved in {out}: 'bloodcell train --resume {out}' continues"
    try:
        for lg in loggers:  # the agent's own log lines; the line raised below says what happened
            lg.setLevel(logging.CRITICAL)
        os.environ[PARENT_ENV] = str(os.getpid())
        os.environ.pop(SPLITS_ENV, None)
        if splits is not None:
            os.environ[SPLITS_ENV] = ",".join(splits)
        if watcher is not None:
            watcher.start()
        elastic_launch(config, sys.executable)("-m", "bloodcell", *argv)
    except SignalException as e:
        if watcher is not None and watcher.failed:
            raise watcher.failed[0] from None
        raise Interrupted(e.sigval) from None
    except ChildFailedError as e:
        if watcher is not None and watcher.failed:
            raise watcher.failed[0] from None
        rank, f = e.get_first_failure()
        if f.exitcode in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # a worker was asked to stop
            raise Interrupted(f.exitcode - 128) from None
        if f.exitcode == 2:  # a BloodcellError: that worker (or rank 0) has printed it
            raise Reported(f"process {rank} of {nproc} stopped on an error (printed above)") from None
        how = f"was killed by {f.signal_name()}" if f.exitcode < 0 else f"failed (exit code {f.exitcode})"
        raise BloodcellError(f"process {rank} of {nproc} {how}; the others were stopped; {hint}") from None
    finally:
        if log is not None:
            for f in sorted(Path(logs).glob("*/attempt_*/0/stdout.log")):
                for line in f.read_text(errors="replace").splitlines():
                    log(line)
        shutil.rmtree(logs, ignore_errors=True)
        if watcher is not None:
            watcher.stop()
        for s, h in handlers.items():
            signal.signal(s, h)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if watcher is not None:
        if watcher.failed:
            raise watcher.failed[0]
        watcher.poll()  # the last epoch's row, if the run ended before the thread saw it


class HistoryWatcher:
    """The launcher's watcher thread: each new row of a run's history.csv to on_row (numbers as
    numbers); if on_row raises, the workers are stopped (a SIGTERM to this process, which the
    elastic agent passes on to them) and the launcher raises it."""

    def __init__(self, path: Path, on_row: Callable[[dict], None], resume: bool):
        self.path, self.on_row = path, on_row
        self.failed: list[BaseException] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        # A resumed run's earlier rows were reported by the run that wrote them; a replaced run's
        # file is not this run's until rank 0 writes a new one (a new file: atomic_write renames).
        self.old = None if resume or not path.is_file() else path.stat().st_ino
        self.seen = len(self._rows()) if resume else 0

    def _rows(self) -> list[dict]:
        from bloodcell.runfiles import read_csv  # lazy: only a watching launcher reads the history

        try:
            if not self.path.is_file() or self.path.stat().st_ino == self.old:
                return []
            return read_csv(self.path) or []
        except (OSError, ValueError):  # replaced between the stat and the read: next time
            return []

    def poll(self) -> None:
        """on_row for the rows not seen yet."""
        for row in self._rows()[self.seen:]:
            self.seen += 1
            self.on_row({k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()})

    def _run(self) -> None:
        while not self._done.wait(0.3):
            try:
                self.poll()
            except BaseException as e:  # noqa: BLE001 - handed to the launching thread
                self.failed.append(e)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def start(self) -> None:
        """Start watching."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (the thread ends within a poll)."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
