"""distributed: shards, the loaders' per-rank batches, the world from the environment, and real
two-process runs (gloo on the CPU): torchrun and --nproc, a killed rank, Ctrl-C, resume, and a
wrong rendezvous."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bloodcell.config import TrainConfig, make_config
from bloodcell.data import BatchLoader
from bloodcell.data.build import config_dataset
from bloodcell.data.records import Split
from bloodcell.errors import BloodcellError
from bloodcell.models.checkpoint import load_model
from bloodcell.runfiles import read_predictions
from bloodcell.training import distributed
from bloodcell.training.distributed import World
from bloodcell.training.engine import predict_probs
from bloodcell.training.train import train


def fake_split(n: int) -> Split:
    images = np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(4, 1).repeat(4, 2).repeat(3, 3)
    return Split(images=images, labels=np.arange(n) % 3, groups=np.arange(n), paths=[f"x/{i}" for i in range(n)])


@pytest.mark.parametrize("n, size", [(0, 2), (1, 2), (7, 2), (10, 3), (101, 4)])
def test_shards_cover_every_item_once(n, size):
    blocks = [np.arange(n)[distributed.shard(n, World(r, size))] for r in range(size)]
    assert np.array_equal(np.concatenate(blocks), np.arange(n))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


@pytest.mark.parametrize("n, batch, size, drop_last", [(100, 16, 2, True), (100, 16, 3, True),
                                                       (37, 8, 2, False), (33, 8, 2, False)])
def test_ranks_share_the_one_process_batches(n, batch, size, drop_last):
    """Each step, the ranks' slices together are exactly the batch one process would take."""
    split = fake_split(n)
    one = BatchLoader(split, batch, shuffle=True, seed=3, drop_last=drop_last)
    ranks = [BatchLoader(split, batch, shuffle=True, seed=3, drop_last=drop_last, rank=r, world=size)
             for r in range(size)]
    for epoch in (1, 2):
        for lo in (one, *ranks):
            lo.set_epoch(epoch)
        whole = [y.numpy() for _, y in one]
        parts = [[x[:, 0, 0, 0] for x, _ in lo] for lo in ranks]  # the image says which item it is
        assert len({len(lo) for lo in ranks}) == 1  # the same number of steps on every rank
        one_items = [x[:, 0, 0, 0] for x, _ in one]
        for b in range(len(ranks[0])):
            joined = torch.cat([p[b] for p in parts])
            assert torch.equal(joined, one_items[b])
        assert len(whole) - len(ranks[0]) <= 1  # at most a last batch too small to share is left out


def test_ordered_loaders_split_a_split_into_blocks():
    split = fake_split(23)
    got = np.concatenate([np.concatenate([y.numpy() for _, y in BatchLoader(split, 4, rank=r, world=3)])
                          for r in range(3)])
    assert np.array_equal(got, split.labels)


def test_world_from_the_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.env_world() == World() and not World().active
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    w = distributed.env_world()
    assert (w.rank, w.size, w.local_rank, w.local_size, w.main) == (3, 4, 1, 2, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(BloodcellError, match="does not fit"):
        distributed.env_world()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(BloodcellError, match="whole numbers"):
        distributed.env_world()


def test_one_process_needs_no_process_group():
    w = World()
    a = np.arange(6.0).reshape(3, 2)
    assert distributed.gather(w, a) is a
    assert distributed.broadcast(w, {"k": 1}) == {"k": 1}
    assert distributed.on_main(w, lambda: 5) == 5
    assert distributed.check_stop(w, True) is True


# ---------------------------------------------------------------------------------------------
# real runs of two processes (gloo)

ARGS = ["--data", "synthetic:320", "--image-size", "32", "--batch-size", "16", "--epochs", "4", "--model",
        "cnn2x32", "--precision", "fp32", "--threads", "1", "--lr", "0.003", "--quiet"]


def env(tmp_path: Path) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**e, "PYTHONUNBUFFERED": "1", "BLOODCELL_CACHE": str(tmp_path / "cache"),
            "PYTHONPATH": os.pathsep.join([str(Path(distributed.__file__).parents[2]), e.get("PYTHONPATH", "")])}


def bloodcell(*args, tmp_path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bloodcell", *args], env=env(tmp_path), capture_output=True,
                          text=True, timeout=600, **kw)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.slow
def test_torchrun_two_processes_learn_into_one_folder_scored_alike_in_one(tmp_path):
    run = tmp_path / "runs" / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "bloodcell", "train", *ARGS, "--out", str(run)], env=env(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("run folder:") == 1 and r.stdout.count("test: accuracy") == 1  # rank 0 alone logs
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["ddp"]
    assert {p.name for p in run.iterdir()} == {"config.yaml", "resolved.yaml", "splits.json", "history.csv",
                                                "best.pt", "last.pt", "predictions_val.csv",
                                                "predictions_test.csv", "metrics.json", "DONE",
                                                ".lock"}  # rank 0's run-folder lock (runfiles.run_lock)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["run"]["processes"] == 2
    assert metrics["test"]["accuracy"] > 0.6  # 4 classes: chance is 0.25
    # the whole test split, each image once, scored as one process scores it from best.pt
    cfg = make_config(TrainConfig, {"data": "synthetic:320", "image_size": 32, "cache_dir": str(tmp_path / "cache")})
    ds = config_dataset(cfg)
    test = ds.splits["test"]
    probs, labels, paths = read_predictions(run / "predictions_test.csv", ds.classes)
    assert paths == list(test.paths) and len(set(paths)) == len(test)
    model, _ = load_model(run)
    mine, y = predict_probs(model, BatchLoader(test, 64), torch.device("cpu"))
    assert np.array_equal(y, labels)
    assert np.abs(mine - probs).max() < 1e-5
    assert metrics["test"]["accuracy"] == pytest.approx(float((mine.argmax(1) == y).mean()))


@pytest.mark.slow
def test_nproc_a_killed_rank_ends_the_run_in_one_line_and_resume_finishes_it(tmp_path):
    args = [*ARGS, "--epochs", "10", "--nproc", "2"]  # long enough to be killed in the middle
    full = tmp_path / "full"
    assert bloodcell("train", *args, "--out", str(full), tmp_path=tmp_path).returncode == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "bloodcell", "train", *args, "--out", str(cut)],
                            env=env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    hist = cut / "history.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not (hist.exists() and len(hist.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-f", "--", f"--out {cut} --overwrite"], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split()]
    assert len(pids) == 2
    os.kill(max(pids), signal.SIGKILL)  # one rank dies without a word
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert error_lines(err) == [line for line in error_lines(err) if line.startswith("bloodcell: error: process")]
    assert len(error_lines(err)) == 1 and "killed by SIGKILL" in err and "--resume" in err
    assert subprocess.run(["pgrep", "-f", "--", f"--out {cut}"], capture_output=True).returncode == 1  # none left
    assert not (cut / "DONE").exists()
    r = bloodcell("train", "--resume", str(cut), tmp_path=tmp_path)  # on 2 processes again: its config.yaml
    assert r.returncode == 0, r.stderr[-3000:]
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((cut / "metrics.json").read_text())
    assert b["run"]["processes"] == 2
    for split in ("val", "test"):  # the resumed run ends where the uninterrupted one did
        assert round(a[split]["loss"], 4) == round(b[split]["loss"], 4)
        assert a[split]["accuracy"] == b[split]["accuracy"]


@pytest.mark.slow
def test_nproc_ctrl_c_stops_every_rank_with_one_line(tmp_path):
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "bloodcell", "train", *ARGS, "--epochs", "30", "--nproc", "2",
                             "--out", str(cut)], env=env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    hist = cut / "history.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not hist.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert len(error_lines(err)) == 1 and err.startswith("bloodcell: interrupted"), err
    assert subprocess.run(["pgrep", "-f", "--", f"--out {cut}"], capture_output=True).returncode == 1
    assert (cut / "last.pt").is_file() and not (cut / "DONE").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_rank_with_a_wrong_rendezvous_fails_with_one_line(tmp_path):
    e = {**env(tmp_path), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), distributed.TIMEOUT_ENV: "2"}
    r = subprocess.run([sys.executable, "-m", "bloodcell", "train", *ARGS, "--out", str(tmp_path / "r")], env=e,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert error_lines(r.stderr) == [error_lines(r.stderr)[0]], r.stderr
    assert r.stderr.startswith("bloodcell: error: process 1 of 2 could not join the run's rendezvous at 127.0.0.1:")
    assert not (tmp_path / "r").exists()  # nothing written


def test_compare_refuses_to_run_under_torchrun(monkeypatch, capsys):
    from bloodcell.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["compare", "--out", "x"]) == 2
    assert "run it once, not under torchrun" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    assert main(["compare", "--out", "x"]) == 2
    assert capsys.readouterr().err == ""  # rank 0 says it


@pytest.mark.slow
def test_nproc_on_epoch_runs_here_and_stops_the_workers(tmp_path, monkeypatch):
    """What a tuner's pruning does: the callback raises after epoch 2; every worker stops."""
    monkeypatch.setenv("BLOODCELL_CACHE", str(tmp_path / "cache"))
    cfg = make_config(TrainConfig, {"data": "synthetic:320", "image_size": 32, "batch_size": 16, "epochs": 20,
                                    "model": "cnn2x32", "precision": "fp32", "threads": 1, "nproc": 2})
    seen = []

    class Pruned(Exception):
        pass

    def on_epoch(epoch, row):
        seen.append((epoch, row["val_acc"]))
        if epoch == 2:
            raise Pruned

    lines = []
    with pytest.raises(Pruned):
        train(cfg, tmp_path / "r", log=lines.append, progress=False, on_epoch=on_epoch)
    assert [e for e, _ in seen] == [1, 2] and all(0 <= a <= 1 for _, a in seen)
    assert any(line.startswith("epoch   2/20") for line in lines)  # rank 0's lines reach the caller's log
    assert subprocess.run(["pgrep", "-f", "--", f"--out {tmp_path / 'r'}"], capture_output=True).returncode == 1
    assert not (tmp_path / "r" / "DONE").exists()


def _collectives(rank: int, size: int, init: str, results) -> None:
    """One rank of test_collectives_on_two_gloo_processes (module level: spawn pickles it)."""
    import torch.distributed as dist

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(size)})
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    w = distributed.env_world()
    bn = torch.nn.BatchNorm2d(2)
    bn.running_mean.fill_(float(rank))  # each rank's own statistics
    distributed.sync_buffers(w, bn)
    n = 7
    block = np.arange(n)[distributed.shard(n, w)]
    gathered = distributed.gather(w, block * 10)

    def fails_on_rank_1():
        if w.rank == 1:
            raise BloodcellError("no data here")
        return "ok"

    try:
        distributed.node_first(w, fails_on_rank_1, ordered=False)
        said = None
    except BloodcellError as e:
        said = (type(e).__name__, getattr(e, "quiet", False))
    results.put((rank, bn.running_mean.tolist(), gathered.tolist(), distributed.any_true(w, rank == 1), said))
    dist.destroy_process_group()


@pytest.mark.slow
def test_collectives_on_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init = f"file://{tmp_path / 'rdzv'}"
    procs = [ctx.Process(target=_collectives, args=(r, 2, init, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r[0], r[1:]) for r in (results.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    for rank in (0, 1):
        mean, gathered, flags, said = got[rank]
        assert mean == [0.5, 0.5]  # the average of the ranks' statistics, the same on both
        assert gathered == [0, 10, 20, 30, 40, 50, 60]  # every item once, in order
        assert flags == [True]
    assert got[1][3] == ("BloodcellError", False)  # the rank it happened on says it (rank 0 had none)
    assert got[0][3] == ("Reported", True)  # rank 0 stops too, silently


@pytest.mark.slow
def test_nproc_keeps_the_splits_of_the_dataset_given(tmp_path, monkeypatch):
    """A tuner's trial gives train a Dataset without its test split: the processes leave it out too."""
    import dataclasses

    monkeypatch.setenv("BLOODCELL_CACHE", str(tmp_path / "cache"))
    cfg = make_config(TrainConfig, {"data": "synthetic:160", "image_size": 32, "epochs": 1, "model": "cnn2x32",
                                    "precision": "fp32", "threads": 1, "nproc": 2})
    ds = config_dataset(cfg)
    ds = dataclasses.replace(ds, splits={k: ds.splits[k] for k in ("train", "val")})
    metrics = train(cfg, tmp_path / "r", log=lambda m: None, progress=False, dataset=ds)
    assert set(metrics) == {"val", "run"} and metrics["run"]["processes"] == 2
    assert not (tmp_path / "r" / "predictions_test.csv").exists()
    assert set(json.loads((tmp_path / "r" / "splits.json").read_text())) == {"train", "val"}
