"""Engine and train/evaluate: determinism, resume, best checkpoint, bad input, real-data CLI run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from conftest import other_lab

from bloodcell.checkpoint import load_model, read_checkpoint
from bloodcell.cli import main
from bloodcell.config import TrainConfig, make_config
from bloodcell.engine import check_stop, stop_between_batches
from bloodcell.errors import BloodcellError, ConfigError, DataError
from bloodcell.models import StainNormed, get_model
from bloodcell.train import train

TINY = dict(data="synthetic:96", image_size=32, batch_size=16, epochs=2, model="cnn2x32", threads=1,
            precision="fp32")


def quiet(msg: str) -> None:
    pass


def tiny(**kw) -> TrainConfig:
    return make_config(TrainConfig, TINY, kw)


def test_run_folder_files_and_metrics(tmp_path):
    m = train(tiny(), tmp_path / "r", log=quiet, progress=False)
    names = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"config.yaml", "history.csv", "best.pt", "last.pt", "splits.json", "metrics.json", "DONE",
            "predictions_test.csv"} <= names
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    for split in ("val", "test"):
        for k in ("accuracy", "loss", "macro_f1", "balanced_accuracy", "group_accuracy", "ece"):
            assert math.isfinite(saved[split][k])
    assert saved["test"]["accuracy"] == m["test"]["accuracy"]
    splits = json.loads((tmp_path / "r" / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["test"])


def test_two_runs_same_seed_same_metrics(tmp_path):
    a = train(tiny(), tmp_path / "a", log=quiet, progress=False)
    b = train(tiny(), tmp_path / "b", log=quiet, progress=False)
    for split in ("val", "test"):
        assert round(a[split]["loss"], 4) == round(b[split]["loss"], 4)
        assert round(a[split]["accuracy"], 4) == round(b[split]["accuracy"], 4)


def test_resume_equals_uninterrupted(tmp_path):
    cfg = tiny(epochs=3)
    full = train(cfg, tmp_path / "full", log=quiet, progress=False)

    class Stop(Exception):
        pass

    def stop_after_2(epoch, row):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, tmp_path / "cut", log=quiet, progress=False, on_epoch=stop_after_2)
    assert read_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 2
    assert not (tmp_path / "cut" / "DONE").exists()
    resumed = train(cfg, tmp_path / "cut", resume=True, log=quiet, progress=False)
    for split in ("val", "test"):
        assert round(full[split]["loss"], 4) == round(resumed[split]["loss"], 4)
    assert resumed["run"]["epochs_run"] == 3


def test_ctrl_c_stops_at_the_next_batch_not_where_it_lands(tmp_path, terminal_sigint):
    """Under stop_between_batches the first SIGINT lets the code it lands in run to its end (a
    tuner's database write, say) and training stops at the next batch; a second one stops at once."""
    ran = []

    def bookkeeping(epoch, row):
        os.kill(os.getpid(), signal.SIGINT)  # lands here, in the middle of the caller's work
        ran.append(epoch)  # which still runs to its end

    with pytest.raises(KeyboardInterrupt), stop_between_batches():
        train(tiny(epochs=3), tmp_path / "r", log=quiet, progress=False, on_epoch=bookkeeping)
    assert ran == [1]  # stopped in epoch 2, before it finished
    assert read_checkpoint(tmp_path / "r" / "last.pt")["epoch"] == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back

    with pytest.raises(KeyboardInterrupt), stop_between_batches():
        os.kill(os.getpid(), signal.SIGINT)
        ran.append("first")
        os.kill(os.getpid(), signal.SIGINT)
        ran.append("second")
    assert ran == [1, "first"]
    with pytest.raises(KeyboardInterrupt), stop_between_batches():  # pending at the end: raised there
        os.kill(os.getpid(), signal.SIGINT)
    with stop_between_batches():  # a new block starts with no request pending
        check_stop()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job: SIGINT stays ignored
    try:
        with stop_between_batches():
            os.kill(os.getpid(), signal.SIGINT)
            check_stop()
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_best_checkpoint_is_a_true_copy(tmp_path):
    train(tiny(epochs=3), tmp_path / "r", log=quiet, progress=False)
    best = read_checkpoint(tmp_path / "r" / "best.pt")
    last = read_checkpoint(tmp_path / "r" / "last.pt")
    hist = best["fit_state"]["history"]
    if best["epoch"] != last["epoch"]:  # best came earlier: its weights must differ from the last ones
        assert any(not torch.equal(best["state_dict"][k], last["state_dict"][k]) for k in best["state_dict"])
    f1 = [h["val_macro_f1"] for h in last["fit_state"]["history"]]
    assert best["epoch"] == int(np.argmax(f1)) + 1 and len(hist) == best["epoch"]


def test_checkpoint_rebuilds_model_alone(tmp_path):
    train(tiny(), tmp_path / "r", log=quiet, progress=False)
    model, meta = load_model(tmp_path / "r")
    assert meta["classes"] == ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    assert meta["image_size"] == 32 and meta["model"]["name"] == "cnn2x32"
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_nan_loss_stops_with_clear_message(tmp_path, monkeypatch):
    import bloodcell.engine as engine

    broken = {"on": False}
    real = engine.F.cross_entropy

    def cross_entropy(*a, **kw):  # goes NaN from the second epoch on
        loss = real(*a, **kw)
        return loss * float("nan") if broken["on"] else loss

    def after(epoch, row):
        broken["on"] = True

    monkeypatch.setattr(engine.F, "cross_entropy", cross_entropy)
    with pytest.raises(BloodcellError, match="loss became nan.*epoch 2.*last good checkpoint .epoch 1"):
        train(tiny(epochs=3), tmp_path / "r", log=quiet, progress=False, on_epoch=after)
    assert read_checkpoint(tmp_path / "r" / "last.pt")["epoch"] == 1


def test_refuses_finished_run_unless_overwrite(tmp_path):
    train(tiny(epochs=1), tmp_path / "r", log=quiet, progress=False)
    with pytest.raises(BloodcellError, match="already holds a finished run"):
        train(tiny(epochs=1), tmp_path / "r", log=quiet, progress=False)
    # an overwrite that fails on its data (a wrong path) leaves the finished run whole
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}
    with pytest.raises(DataError, match="does not exist"):
        train(tiny(epochs=1, data=str(tmp_path / "nowhere")), tmp_path / "r", overwrite=True, log=quiet,
              progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == before
    train(tiny(epochs=1), tmp_path / "r", overwrite=True, log=quiet, progress=False)


@pytest.mark.parametrize("args, needle", [
    (["--model", "nope"], "unknown model 'nope'; known: "),
    (["--image-size", "16"], "needs image_size >= 32"),
    (["--batch-size", "0"], "batch_size must be at least 1"),
    (["--optimizer", "adam"], "optimizer must be one of"),
    (["--lr", "fast"], "lr must be float"),
])
def test_bad_train_flags_are_one_line(tmp_path, capsys, args, needle):
    code = main(["train", "--data", "synthetic:80", "--epochs", "1", "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_every_train_flag_says_what_it_does(capsys):
    from dataclasses import fields

    from bloodcell.config import CHOICES, FIELD_HELP

    assert {f.name for f in fields(TrainConfig)} - {"data"} == set(FIELD_HELP)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, allowed in CHOICES.items():  # the choices are shown, and each is accepted
        assert "{" + ",".join(allowed) + "}" in text, name
        for value in allowed:
            make_config(TrainConfig, {name: value})
    assert "cellfit: that square sized to the cell" in text


def test_unknown_config_key_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'epoch'"):
        make_config(TrainConfig, {"epoch": 3})
    (tmp_path / "c.yaml").write_text("image_size: 48\nbogus: 1\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")]) == 2


def test_blur_reaches_the_training_batches(tmp_path):
    """--blur changes what training sees (same seed, other train losses), and nothing else: the
    evaluation is of unblurred images; out-of-range values are refused."""
    losses = []
    for name, blur in (("a", 0.0), ("b", 2.0)):
        train(tiny(epochs=1, blur=blur), tmp_path / name, log=quiet, progress=False)
        losses.append((tmp_path / name / "history.csv").read_text().splitlines()[1].split(",")[1])
    assert losses[0] != losses[1]
    for bad in (-1, 9):
        with pytest.raises(ConfigError, match="blur"):
            tiny(blur=bad)


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_a_mixed_run_learns_from_soft_targets(tmp_path, mix):
    """--mix trains on soft targets (the loader yields N x C), learns the synthetic classes, and
    evaluates on plain images; a non-positive --mix-alpha is refused."""
    m = train(tiny(epochs=4, mix=mix, data="synthetic:400"), tmp_path / "r", log=quiet, progress=False)
    assert m["test"]["accuracy"] > 0.5  # four classes: chance is 1/4
    with pytest.raises(ConfigError, match="mix_alpha"):
        tiny(mix=mix, mix_alpha=0)


def test_evaluate_other_class_set_is_an_error(tmp_path, class_folders, capsys):
    train(tiny(epochs=1), tmp_path / "r", log=quiet, progress=False)
    code = main(["evaluate", str(tmp_path / "r"), "--data", str(class_folders)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "no class of the data" in err[-1]
    # a class map makes them comparable
    code = main(["evaluate", str(tmp_path / "r"), "--data", str(class_folders), "--json",
                 "--class-map", "alpha=eosinophil,beta=lymphocyte,gamma=monocyte"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["all"]["n"] == 30
    assert len(res["all"]["confusion"]) == 4  # the model's four classes
    # --restrict scores only the classes the data has: three columns, renormalised
    code = main(["evaluate", str(tmp_path / "r"), "--data", str(class_folders), "--json", "--restrict",
                 "--class-map", "alpha=eosinophil,beta=lymphocyte,gamma=monocyte"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and len(res["all"]["confusion"]) == 3 and set(res["all"]["per_class"]) == {
        "eosinophil", "lymphocyte", "monocyte"}
    # a file that is not an image is skipped, and said so in one line; the rest is still scored
    (class_folders / "alpha" / "broken.png").write_bytes(b"not an image")
    code = main(["evaluate", str(tmp_path / "r"), "--data", str(class_folders), "--json",
                 "--class-map", "alpha=eosinophil,beta=lymphocyte,gamma=monocyte"])
    out = capsys.readouterr()
    assert code == 0 and json.loads(out.out)["all"]["n"] == 30
    assert "data: 1 file(s) could not be decoded and were skipped" in out.err


def test_train_says_which_files_it_skipped(tmp_path, class_folders):
    """A file that is not an image is left out of the run, and the console says so after the data line."""
    (class_folders / "alpha" / "broken.png").write_bytes(b"not an image")
    lines = []
    train(tiny(epochs=1, data=str(class_folders)), tmp_path / "r", log=lines.append, progress=False)
    assert lines[0].startswith("data: ")
    assert lines[1] == (f"data: 1 file(s) could not be decoded and were skipped "
                        f"(bloodcell data check {class_folders} lists them)")
    assert sum(len(s) for s in json.loads((tmp_path / "r" / "splits.json").read_text()).values()) == 30


def test_extra_train_joins_the_other_sets_train_split_only(tmp_path, class_folders):
    """--extra-train: the other set's train images of shared classes are learnt from, said so on the
    console and listed in splits.json; validation and test are this data's."""
    lab2 = other_lab(tmp_path / "lab2")
    lines = []
    m = train(tiny(epochs=1, data=str(class_folders), extra_train=str(lab2)), tmp_path / "r", log=lines.append,
              progress=False)
    splits = json.loads((tmp_path / "r" / "splits.json").read_text())
    theirs = [p for p in splits["train"] if p.startswith(str(lab2))]
    assert theirs and all("/delta/" not in p for p in theirs)
    assert all(p.startswith(str(class_folders)) for k in ("val", "test") for p in splits[k])
    assert m["test"]["n"] == len(splits["test"])
    said = [s for s in lines if "train also holds" in s]
    n_alpha, n_beta = (sum(f"/{c}/" in p for p in theirs) for c in ("ALPHA", "Beta"))
    assert said == [f"data: train also holds {len(theirs)} images of {lab2}'s train split "
                    f"(alpha {n_alpha}, beta {n_beta})"]
    with pytest.raises(DataError, match="^--extra-train: data path does not exist"):
        train(tiny(data=str(class_folders), extra_train=str(tmp_path / "nowhere")), tmp_path / "r2", log=quiet,
              progress=False)


class CountingRows:
    """A split's images (or the memory map under them) that append the number of rows each read
    gives to ``read``; a copy of the whole counts as reading every row."""

    def __init__(self, a, read: list):
        self.a, self.read, self.shape, self.dtype = a, read, a.shape, a.dtype

    def __len__(self):
        return len(self.a)

    def __getitem__(self, k):
        out = self.a[k]
        self.read.append(len(out))
        return out

    def __array__(self, dtype=None, copy=None):
        self.read.append(len(self.a))
        return self.a


def test_evaluate_leaving_classes_out_reads_kept_images_from_the_memory_map(tmp_path, class_folders,
                                                                             monkeypatch):
    """A class map that leaves a class out keeps a memory-mapped split's other images as a view: each
    kept image is read from the map once, by the batch that scores it (the old code copied them into
    RAM first); a split already in RAM is copied, so its left-out images can be freed."""
    from bloodcell import evaluate as ev
    from bloodcell.data import _Rows

    train(tiny(epochs=1), tmp_path / "r", log=quiet, progress=False)
    cmap = "alpha=eosinophil,beta=lymphocyte"
    plain = ev.evaluate_checkpoint(tmp_path / "r", str(class_folders), class_map=cmap, log=quiet)["all"]

    loading, batches, read, scored, mapped = ev.load_dataset, ev.BatchLoader, [], [], []

    def counting(*a, **k):
        ds = loading(*a, **k)
        for s in ds.splits.values():
            if isinstance(s.images, _Rows):
                s.images.base = CountingRows(s.images.base, read)
                mapped.append(s.labels)
        return ds

    monkeypatch.setattr(ev, "load_dataset", counting)
    monkeypatch.setattr(ev, "BatchLoader", lambda split, *a, **k: scored.append((sum(read), split)) or
                        batches(split, *a, **k))
    logged = []
    counted = ev.evaluate_checkpoint(tmp_path / "r", str(class_folders), class_map=cmap, log=logged.append)["all"]
    assert counted == plain and counted["n"] == 20  # gamma's ten images left out
    assert logged == ["left out classes the model does not know: gamma"]
    assert len(mapped) == 1  # the 70 % train split is the one the loader maps rather than copies
    kept = int(np.isin(mapped[0], [0, 1]).sum())  # its images of alpha and beta
    lazy = [split for _, split in scored if isinstance(split.images, _Rows)]
    assert len(lazy) == 1 and len(lazy[0].labels) == kept
    assert all(r == 0 for r, split in scored if split is lazy[0])  # nothing read ahead of its scoring
    assert sum(read) == kept  # each kept image read once, by the batch that scores it
    assert all(isinstance(split.images, np.ndarray) for _, split in scored if split is not lazy[0])


def test_evaluate_several_splits_in_one_call(tmp_path, capsys, monkeypatch):
    """--split val,test,all: one load, each image scored once, the same figures as one split per call."""
    from bloodcell import evaluate as ev

    evaluate_checkpoint = ev.evaluate_checkpoint
    train(tiny(epochs=1), tmp_path / "r", log=quiet, progress=False)
    data = TINY["data"]
    seen = []
    scoring = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: seen.append(len(a[1].labels)) or scoring(*a, **k))
    both = evaluate_checkpoint(tmp_path / "r", data, split="val,test,all", log=quiet)
    assert list(both) == ["val", "test", "all"]
    assert sum(seen) == both["all"]["n"]  # "all" reuses the val and test scores
    monkeypatch.setattr(ev, "evaluate", scoring)
    for name in both:
        one = evaluate_checkpoint(tmp_path / "r", data, split=name, log=quiet)[name]
        assert one["accuracy"] == both[name]["accuracy"] and one["n"] == both[name]["n"]
    assert both["all"]["n"] > both["val"]["n"] + both["test"]["n"]

    loading = ev.load_dataset

    def counting(*a, **k):
        ds = loading(*a, **k)
        ds.splits = {n: dataclasses.replace(s, images=CountingRows(s.images, read))
                     for n, s in ds.splits.items()}
        return ds

    read, sources = [], []
    batches = ev.BatchLoader
    monkeypatch.setattr(ev, "load_dataset", counting)
    monkeypatch.setattr(ev, "BatchLoader", lambda split, *a, **k: sources.append(split.images) or
                        batches(split, *a, **k))
    assert evaluate_checkpoint(tmp_path / "r", data, split="all", log=quiet)["all"] == both["all"]
    assert sources and all(isinstance(s, CountingRows) for s in sources)  # scored from the memory map, not a copy
    assert sum(read) == both["all"]["n"]  # each image read once
    code = main(["evaluate", str(tmp_path / "r"), "--data", data, "--split", "val,nope",
                 "--out", str(tmp_path / "e")])
    assert code == 2 and "split 'nope' not in the data" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()  # refused before scoring or writing anything
    code = main(["evaluate", str(tmp_path / "r"), "--data", data, "--split", ","])
    assert code == 2 and "not in the data" in capsys.readouterr().err


@pytest.mark.realdata
@pytest.mark.slow
def test_cli_train_and_evaluate_on_real_subset(kaggle_subset, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", str(kaggle_subset), "--model", "cnn4x32", "--image-size", "32",
                 "--epochs", "2", "--batch-size", "16", "--out", str(out), "--quiet"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"val", "test", "test_simple"}
    assert metrics["test"]["n"] == 4 * 3 * 4 and metrics["test_simple"]["n"] == 12
    from bloodcell.data.layouts import discover

    cells = {it.group for it in discover(kaggle_subset).items if it.split == "test"}
    assert metrics["test"]["n_groups"] == len(cells) >= 4  # majority vote over each source cell
    lo, hi = metrics["test"]["group_accuracy_ci"]
    assert lo <= metrics["test"]["group_accuracy"] <= hi
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(kaggle_subset), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["test"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"])


@pytest.mark.slow
def test_resume_after_kill_9_equals_uninterrupted(tmp_path):
    """A real SIGKILL mid-run: last.pt is whole (atomic writes) and the resumed run ends the same."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["--data", "synthetic:160", "--image-size", "32", "--batch-size", "16", "--epochs", "4",
            "--model", "cnn2x32", "--threads", "1", "--precision", "fp32", "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = tmp_path / "full"
    subprocess.run([sys.executable, "-m", "bloodcell.cli", "train", *args, "--out", str(full)], check=True,
                   env=env, capture_output=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "bloodcell.cli", "train", *args, "--out", str(cut)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until two epochs are on disk, then kill without warning
        hist = cut / "history.csv"
        if hist.exists() and len(hist.read_text().strip().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "DONE").exists()
    subprocess.run([sys.executable, "-m", "bloodcell.cli", "train", "--resume", str(cut), "--quiet"], check=True,
                   env=env, capture_output=True)
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((cut / "metrics.json").read_text())
    for split in ("val", "test"):
        assert round(a[split]["loss"], 4) == round(b[split]["loss"], 4)
        assert a[split]["accuracy"] == b[split]["accuracy"]


def test_init_from_starts_from_another_runs_weights(tmp_path):
    train(tiny(epochs=1), tmp_path / "a", log=quiet, progress=False)
    src = read_checkpoint(tmp_path / "a" / "best.pt")["state_dict"]
    fresh = train(tiny(epochs=1, lr=1e-12, weight_decay=0.0, init_from=str(tmp_path / "a")), tmp_path / "b",
                  log=quiet, progress=False)
    got = read_checkpoint(tmp_path / "b" / "best.pt")["state_dict"]
    conv = [k for k in src if k.endswith("weight") and src[k].ndim == 4]
    assert conv and all(torch.allclose(src[k], got[k], atol=1e-6) for k in conv)
    assert fresh["run"]["epochs_run"] == 1


def test_stain_norm_run_and_init_from_across_it(tmp_path):
    """--stain-norm image is saved with the model and rebuilt by load_model; --init-from maps a plain
    run's weights onto it (and back) although its weights sit under net."""
    train(tiny(epochs=1), tmp_path / "a", log=quiet, progress=False)
    train(tiny(epochs=1, lr=1e-12, weight_decay=0.0, stain_norm="image", init_from=str(tmp_path / "a")),
          tmp_path / "b", log=quiet, progress=False)
    ck = read_checkpoint(tmp_path / "b" / "best.pt")
    assert ck["model"]["kwargs"]["stain_norm"] == "image"
    model, _ = load_model(tmp_path / "b")
    assert isinstance(model, StainNormed)
    src = read_checkpoint(tmp_path / "a" / "best.pt")["state_dict"]
    conv = [k for k in src if k.endswith("weight") and src[k].ndim == 4]
    assert conv and all(torch.allclose(src[k], ck["state_dict"]["net." + k], atol=1e-6) for k in conv)
    train(tiny(epochs=1, lr=1e-12, weight_decay=0.0, init_from=str(tmp_path / "b")), tmp_path / "c",
          log=quiet, progress=False)
    back = read_checkpoint(tmp_path / "c" / "best.pt")["state_dict"]
    assert all(torch.allclose(src[k], back[k], atol=1e-6) for k in conv)


def test_checkpoints_from_before_pool_first_still_load(tmp_path):
    """A checkpoint whose kwargs do not name pool_first (written before the option) rebuilds the old
    layer order; resuming or --init-from across the two orders is refused with a clear error."""
    train(tiny(epochs=1), tmp_path / "a", log=quiet, progress=False)
    ck = read_checkpoint(tmp_path / "a" / "best.pt")
    assert ck["model"]["kwargs"]["pool_first"] is True
    old = get_model(ck["model"]["name"], **{**ck["model"]["kwargs"], "pool_first": False})
    ck["model"]["kwargs"].pop("pool_first")
    ck["state_dict"] = old.state_dict()
    torch.save(ck, tmp_path / "old.pt")
    model, _ = load_model(tmp_path / "old.pt")
    assert isinstance(model.features[1], torch.nn.MaxPool2d)  # conv-BN-ReLU, then the pool
    ck_new = read_checkpoint(tmp_path / "a" / "best.pt")
    ck_new["model"]["kwargs"].pop("pool_first")  # a hand-written checkpoint of today's order
    torch.save(ck_new, tmp_path / "new.pt")
    model, _ = load_model(tmp_path / "new.pt")
    assert isinstance(model.features[0][1], torch.nn.MaxPool2d)
    with pytest.raises(BloodcellError, match="layer order"):
        train(tiny(epochs=1, init_from=str(tmp_path / "old.pt")), tmp_path / "b", log=quiet, progress=False)
    assert not any((tmp_path / "b").iterdir())  # refused before writing: no half-made run to clear
    train(tiny(epochs=1, init_from=str(tmp_path / "new.pt")), tmp_path / "b", log=quiet, progress=False)
    torch.save(ck, tmp_path / "a" / "last.pt")
    (tmp_path / "a" / "DONE").unlink()
    with pytest.raises(BloodcellError, match="another model layout"):
        train(tiny(epochs=2), tmp_path / "a", resume=True, log=quiet, progress=False)
