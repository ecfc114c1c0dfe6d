"""SIGTERM handled like Ctrl-C (runtime.stop_between_batches, runtime.worker_map) in every command
that runs for long: exit 143 with one line, no process left behind, and a rerun that ends with the
numbers of an uninterrupted run. serve shuts down gracefully and exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import png_bytes, write_image

from bloodcell.runtime import Interrupted, check_stop, exit_code, stop_between_batches

pytestmark = pytest.mark.slow

FAST = ["--image-size", "32", "--batch-size", "16", "--model", "cnn2x32", "--threads", "1",
        "--precision", "fp32", "--quiet"]


def marked_env() -> tuple[dict, str]:
    """The environment for a child command, with a marker that its own children inherit."""
    mark = uuid.uuid4().hex
    return {**os.environ, "PYTHONUNBUFFERED": "1", "BLOODCELL_TEST_MARK": mark}, mark


def processes_with(mark: str) -> list[int]:
    """Live processes whose environment holds the marker (the command and every child it started)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
            state = next(line for line in (d / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if f"BLOODCELL_TEST_MARK={mark}".encode() in env and "zombie" not in state:
            found.append(int(d.name))
    return found


def gone(mark: str, within: float = 10.0) -> bool:
    """True once no process carries the marker (waiting up to ``within`` seconds)."""
    deadline = time.monotonic() + within
    while processes_with(mark):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def bloodcell(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bloodcell", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def wait_for(cond, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def epochs_on_disk(run: Path) -> int:
    hist = run / "history.csv"
    return max(0, len(hist.read_text().strip().splitlines()) - 1) if hist.exists() else 0


def same_metrics(a: Path, b: Path) -> None:
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    for split in ("val", "test"):
        assert ma[split]["accuracy"] == mb[split]["accuracy"]
        assert round(ma[split]["loss"], 4) == round(mb[split]["loss"], 4)


# --- in this process -------------------------------------------------------------------------------


def test_sigterm_is_a_request_to_stop_and_a_second_signal_stops_at_once(terminal_sigint) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as e, stop_between_batches():
        os.kill(os.getpid(), signal.SIGTERM)  # the first: noted, the code runs on
        ran = True
        check_stop()  # the next batch boundary
    assert ran and e.value.signum == signal.SIGTERM and exit_code(e.value) == 143
    assert signal.getsignal(signal.SIGTERM) is before  # put back
    steps = []
    with pytest.raises(Interrupted) as e, stop_between_batches():
        os.kill(os.getpid(), signal.SIGTERM)
        steps.append(1)
        os.kill(os.getpid(), signal.SIGINT)  # a second signal, of the other kind: at once
        steps.append(2)
    assert steps == [1] and e.value.signum == signal.SIGINT and exit_code(e.value) == 130
    assert exit_code(KeyboardInterrupt()) == 130


WORKER_SCRIPT = """
import os, sys, time
from bloodcell.runtime import worker_map

def slow(i):
    time.sleep(60)
    return i

if __name__ == "__main__":
    for _ in worker_map(slow, range(4), 2):
        pass
"""


@pytest.mark.slow
def test_workers_end_when_their_parent_is_killed_with_sigkill(tmp_path) -> None:
    env, mark = marked_env()
    script = tmp_path / "workers.py"
    script.write_text(WORKER_SCRIPT)
    p = subprocess.Popen([sys.executable, str(script)], env=env)
    wait_for(lambda: len(processes_with(mark)) >= 3, "the two workers to start", 60)
    p.send_signal(signal.SIGKILL)
    p.wait()
    left = [] if gone(mark) else processes_with(mark)
    for pid in left:  # tidy up before failing
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers outlived their parent: {left}"


# --- the commands ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """1,200 PNG files in three classes: enough that the cache build runs in worker processes."""
    root = tmp_path_factory.mktemp("many")
    for c, cls in enumerate(("alpha", "beta", "gamma")):
        for i in range(400):
            write_image(root / cls / f"{i}.png", size=(96, 96), color=(80 * c, 90, 200 - 60 * c),
                        seed=c * 1000 + i)
    return root


@pytest.mark.slow
def test_train_sigterm_during_the_cache_build(many_images, tmp_path) -> None:
    env, mark = marked_env()
    env["BLOODCELL_CACHE"] = str(tmp_path / "cache")
    args = ["train", "--data", str(many_images), "--epochs", "1", *FAST]
    p = bloodcell(*args, "--out", str(tmp_path / "cut"), env=env)
    wait_for(lambda: any((tmp_path / "cache").glob(".*.npy")), "the cache build to start")
    p.send_signal(signal.SIGTERM)
    log = p.communicate(timeout=120)[0]
    assert p.returncode == 143, log
    assert "stopped by SIGTERM" in log and "Traceback" not in log
    assert gone(mark), "a cache-building worker outlived the command"
    assert not list((tmp_path / "cache").glob("*.npy")), "the interrupted build left a cache"
    assert not list((tmp_path / "cache").glob(".*.npy")), "the interrupted build left its temporary file"
    # the same command again finishes, with the numbers of an uninterrupted run
    again = subprocess.run([sys.executable, "-m", "bloodcell", *args, "--out", str(tmp_path / "cut")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    full = subprocess.run([sys.executable, "-m", "bloodcell", *args, "--out", str(tmp_path / "full")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    same_metrics(tmp_path / "full", tmp_path / "cut")


@pytest.mark.slow
def test_train_sigterm_during_an_epoch_then_resume(tmp_path) -> None:
    env, mark = marked_env()
    args = ["train", "--data", "synthetic:160", "--epochs", "4", *FAST]
    full = subprocess.run([sys.executable, "-m", "bloodcell", *args, "--out", str(tmp_path / "full")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    cut = tmp_path / "cut"
    p = bloodcell(*args, "--out", str(cut), env=env)
    wait_for(lambda: epochs_on_disk(cut) >= 1, "the first epoch")
    p.send_signal(signal.SIGTERM)
    log = p.communicate(timeout=120)[0]
    assert p.returncode == 143, log
    assert "stopping at the next batch" in log and "stopped by SIGTERM" in log and "Traceback" not in log
    assert gone(mark) and not (cut / "DONE").exists() and (cut / "last.pt").exists()
    r = subprocess.run([sys.executable, "-m", "bloodcell", "train", "--resume", str(cut), "--quiet"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    same_metrics(tmp_path / "full", cut)


@pytest.mark.slow
def test_compare_sigterm_then_the_same_command(tmp_path) -> None:
    env, mark = marked_env()
    args = ["compare", "--data", "synthetic:160", "--models", "cnn2x32,cnn4x32", "--epochs", "3",
            "--no-report", *[a for a in FAST if a not in ("--model", "cnn2x32")]]
    full = subprocess.run([sys.executable, "-m", "bloodcell", *args, "--out", str(tmp_path / "full")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    cut = tmp_path / "cut"
    p = bloodcell(*args, "--out", str(cut), env=env)
    wait_for(lambda: epochs_on_disk(cut / "runs" / "cnn2x32") >= 1, "the first model's first epoch")
    p.send_signal(signal.SIGTERM)
    log = p.communicate(timeout=120)[0]
    assert p.returncode == 143, log
    assert "stopped by SIGTERM" in log and gone(mark)
    r = subprocess.run([sys.executable, "-m", "bloodcell", *args, "--out", str(cut)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a, b = (json.loads((d / "results.json").read_text())["models"] for d in (tmp_path / "full", cut))
    assert [(m["model"], m["val"]["accuracy"], m["test"]["accuracy"]) for m in a] == \
        [(m["model"], m["val"]["accuracy"], m["test"]["accuracy"]) for m in b]


@pytest.mark.slow
def test_tune_sigterm_then_resume(tmp_path) -> None:
    env, mark = marked_env()
    args = ["tune", "--data", "synthetic:120", "--grid", "lr=0.001,0.003", "batch_size=16,32", "--threads", "1",
            "--pruner", "none", "--no-report", "--config"]
    base = tmp_path / "base.yaml"
    base.write_text("epochs: 2\nimage_size: 32\nprecision: fp32\n")
    full = subprocess.run([sys.executable, "-m", "bloodcell", *args, str(base), "--out", str(tmp_path / "full")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stdout + full.stderr
    cut = tmp_path / "cut"
    p = bloodcell(*args, str(base), "--out", str(cut), env=env)
    wait_for(lambda: any(epochs_on_disk(t) >= 1 for t in (cut / "trials").glob("*")), "a trial's first epoch")
    p.send_signal(signal.SIGTERM)
    log = p.communicate(timeout=120)[0]
    assert p.returncode == 143, log
    assert "stopped by SIGTERM" in log and "--resume" in log and "Traceback" not in log and gone(mark)
    r = subprocess.run([sys.executable, "-m", "bloodcell", "tune", "--resume", str(cut), "--no-report"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr

    def values(d: Path) -> list:
        import optuna

        study = optuna.load_study(study_name="bloodcell-cnn4x32", storage=f"sqlite:///{d}/study.db")
        return sorted((tuple(sorted(t.params.items())), round(t.value, 6)) for t in study.trials
                      if t.state.name == "COMPLETE")

    assert values(cut) == values(tmp_path / "full") and len(values(cut)) == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_sigterm_finishes_the_request_in_flight_and_exits_0(tmp_path) -> None:
    from bloodcell.models import get_model
    from bloodcell.models.checkpoint import save_checkpoint

    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, get_model("cnn2x32", num_classes=2, image_size=32), model_name="cnn2x32",
                    model_kwargs={"num_classes": 2, "image_size": 32}, classes=["a", "b"], image_size=32,
                    resize="squash")
    env, mark = marked_env()
    port = _free_port()
    p = bloodcell("serve", str(ckpt), "--port", str(port), "--log-level", "warning", env=env)

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_for(up, "the server to listen", 120)
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + png_bytes(0) + b"\r\n--b--\r\n")
    head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + body[:50])  # a request in flight: half its body sent
        time.sleep(0.3)
        p.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        s.sendall(body[50:])
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    log = p.communicate(timeout=30)[0]
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["class"] in ("a", "b")
    assert p.returncode == 0, log
    assert "serve stopped by SIGTERM" in log and gone(mark)
