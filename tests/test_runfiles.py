"""runfiles: atomic writes (the old file or the new, never half), and the run files read back."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from bloodcell.runfiles import (
    atomic_write,
    read_history,
    read_predictions,
    write_csv,
    write_history,
    write_json,
    write_predictions,
)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch) -> None:
    path = tmp_path / "metrics.json"
    write_json(path, {"accuracy": 0.5})
    old = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        write_json(path, {"accuracy": 0.9})
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_atomic_write_takes_text_and_bytes_with_a_plain_files_permissions(tmp_path) -> None:
    atomic_write(tmp_path / "a.txt", "ünïcode\n")
    atomic_write(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "ünïcode\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    (tmp_path / "plain.txt").write_text("x")
    plain = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == plain  # not mkstemp's private 0600


def test_write_csv_writes_what_the_csv_module_writes(tmp_path) -> None:
    rows = [{"epoch": 1, "loss": 0.5, "note": None}, {"epoch": 2, "loss": 0.25, "note": "a,b"}]
    write_csv(tmp_path / "ours.csv", rows)
    with open(tmp_path / "theirs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "theirs.csv").read_bytes()


def test_predictions_and_history_read_back(tmp_path) -> None:
    classes = ["a", "b", "c"]
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=5)
    labels = np.array([0, 1, 2, 1, 0])
    paths = [f"x/{i}.png" for i in range(5)]
    write_predictions(tmp_path / "p.csv", paths, labels, probs, classes)
    got, got_labels, got_paths = read_predictions(tmp_path / "p.csv", classes)
    np.testing.assert_allclose(got, probs, atol=1e-5)
    assert got_labels.tolist() == labels.tolist() and got_paths == paths
    write_history([{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": ""}], tmp_path / "history.csv")
    h = read_history(tmp_path / "history.csv")
    assert h["epoch"].tolist() == [1.0, 2.0] and h["val_acc"][0] == 0.5 and np.isnan(h["val_acc"][1])
    assert read_history(tmp_path / "missing.csv") is None


HOLD = """
import sys, time
from bloodcell.runfiles import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_run_folder_lock_refuses_a_second_process_and_dies_with_its_holder(tmp_path) -> None:
    import signal
    import subprocess
    import sys

    from bloodcell.errors import BloodcellError
    from bloodcell.runfiles import LOCK_FILE, has_files, run_lock

    src = os.path.join(os.path.dirname(__file__), "..", "src")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": src})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BloodcellError, match=rf"in use by another bloodcell run \(pid {holder.pid}\)"):
            with run_lock(tmp_path / "run"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(tmp_path / "run"):  # the OS released it: a SIGKILL leaves no stale lock
        assert (tmp_path / "run" / LOCK_FILE).read_text() == str(os.getpid())
    assert not has_files(tmp_path / "run")  # the lock file is not a run's file
