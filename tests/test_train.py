"""train(cfg): the run folder, determinism, resume, the best checkpoint, bad data, other training options."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from conftest import other_lab, quiet, tiny

from bloodcell.config import TrainConfig
from bloodcell.errors import BloodcellError, ConfigError, DataError
from bloodcell.models import StainNormed
from bloodcell.models.checkpoint import load_model, read_checkpoint
from bloodcell.training.train import train


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


def test_best_checkpoint_is_a_true_copy(tmp_path):
    train(tiny(epochs=3), tmp_path / "r", log=quiet, progress=False)
    best = read_checkpoint(tmp_path / "r" / "best.pt")
    last = read_checkpoint(tmp_path / "r" / "last.pt")
    hist = best["fit_state"]["history"]
    if best["epoch"] != last["epoch"]:  # best came earlier: its weights must differ from the last ones
        assert any(not torch.equal(best["state_dict"][k], last["state_dict"][k]) for k in best["state_dict"])
    f1 = [h["val_macro_f1"] for h in last["fit_state"]["history"]]
    assert best["epoch"] == int(np.argmax(f1)) + 1 and len(hist) == best["epoch"]


def test_nan_loss_stops_with_clear_message(tmp_path, monkeypatch):
    import bloodcell.training.engine as engine

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


@pytest.mark.slow
@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_a_mixed_run_learns_from_soft_targets(tmp_path, mix):
    """--mix trains on soft targets (the loader yields N x C), learns the synthetic classes, and
    evaluates on plain images; a non-positive --mix-alpha is refused."""
    m = train(tiny(epochs=4, mix=mix, data="synthetic:400"), tmp_path / "r", log=quiet, progress=False)
    assert m["test"]["accuracy"] > 0.5  # four classes: chance is 1/4
    with pytest.raises(ConfigError, match="mix_alpha"):
        tiny(mix=mix, mix_alpha=0)


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


@pytest.mark.slow
def test_resume_after_kill_9_equals_uninterrupted(tmp_path):
    """A real SIGKILL mid-run: last.pt is whole (atomic writes) and the resumed run ends the same."""
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


def test_several_sources_train_as_one_and_are_reported_apart(tmp_path, class_folders):
    lab2 = other_lab(tmp_path / "lab2")
    cfg = tiny(data=[str(class_folders), str(lab2)])
    assert cfg.sources == (str(class_folders), str(lab2))
    lines: list[str] = []
    m = train(cfg, tmp_path / "r", log=lines.append, progress=False)
    for split in ("val", "test"):
        per = m[split]["per_source"]
        assert list(per) == [str(class_folders), str(lab2)]
        assert sum(p["n"] for p in per.values()) == m[split]["n"]
        weighted = sum(p["accuracy"] * p["n"] for p in per.values()) / m[split]["n"]
        assert weighted == pytest.approx(m[split]["accuracy"])
    assert any(line.startswith(f"data: source {lab2} (class-folders): train ") for line in lines)
    assert any(line.startswith(f"  test of {lab2}: accuracy ") for line in lines)
    # the run folder keeps both sources: a resume (here of a finished run) reads them back
    assert train(TrainConfig(), tmp_path / "r", resume=True, log=quiet)["test"] == m["test"]


def test_stain_jitter_and_gray_reach_the_training_batches(tmp_path):
    """--stain-jitter and --gray change what training sees (same seed, other train loss); bad values
    are refused."""
    losses = []
    for name, kw in (("a", {}), ("b", {"stain_jitter": 0.2}), ("c", {"gray": 0.5})):
        train(tiny(epochs=1, **kw), tmp_path / name, log=quiet, progress=False)
        losses.append((tmp_path / name / "history.csv").read_text().splitlines()[1].split(",")[1])
    assert len(set(losses)) == 3
    for key, bad in (("stain_jitter", -0.1), ("gray", 1.5)):
        with pytest.raises(ConfigError, match=key):
            tiny(**{key: bad})


def test_labels_per_class_fine_tunes_on_k_cells_and_keeps_the_test_split(tmp_path):
    """--labels-per-class K with --init-from: K cells per class drawn from train (and val), seeded;
    the test split is the one a full run of the data has; --monitor last keeps the last epoch."""
    full = train(tiny(data="synthetic:200"), tmp_path / "full", log=quiet, progress=False)
    logs: list[str] = []
    few = train(tiny(data="synthetic:200", labels_per_class=3, monitor="last", epochs=3,
                     init_from=str(tmp_path / "full")), tmp_path / "few", log=logs.append, progress=False)
    splits = json.loads((tmp_path / "few" / "splits.json").read_text())
    assert len(splits["train"]) == len(splits["val"]) == 4 * 3  # synthetic: 4 classes, one image per cell
    assert splits["test"] == json.loads((tmp_path / "full" / "splits.json").read_text())["test"]
    assert few["test"]["n"] == full["test"]["n"]
    assert few["run"]["labelled_cells"]["train"] == {c: 3 for c in few["test"]["per_class"]}
    assert few["run"]["best_epoch"] == 3  # the last epoch, chosen by nothing
    assert any("keeps 3 labelled cells per class" in m for m in logs)
    again = train(tiny(data="synthetic:200", labels_per_class=3, monitor="last", epochs=3,
                       init_from=str(tmp_path / "full")), tmp_path / "again", log=quiet, progress=False)
    assert json.loads((tmp_path / "again" / "splits.json").read_text()) == splits  # seeded
    assert again["test"]["accuracy"] == few["test"]["accuracy"]
    with pytest.raises(ConfigError, match="labels_per_class"):
        tiny(labels_per_class=-1)


@pytest.mark.slow
def test_a_pretrained_timm_run_fine_tunes_and_keeps_the_weights_normalisation(tmp_path, hf_cache):
    """timm/<name> --pretrained from the hub cache: the backbone frozen through --freeze-epochs (its
    weights in best.pt are the cache's, bit for bit), the head trained; the weights' mean/std (0.5)
    in resolved.yaml, metrics.json and the checkpoint, and predict normalises with them."""
    import yaml
    from conftest import fill_hf_cache

    from bloodcell.inference.predict import Predictor

    state = fill_hf_cache(hf_cache)
    cfg = tiny(model="timm/tf_efficientnet_lite0", pretrained=True, epochs=1, freeze_epochs=1, backbone_lr=0.5)
    m = train(cfg, tmp_path / "r", log=quiet, progress=False)
    ck = read_checkpoint(tmp_path / "r" / "best.pt")
    assert torch.equal(ck["state_dict"]["conv_stem.weight"], state["conv_stem.weight"])
    assert torch.equal(ck["state_dict"]["blocks.6.0.conv_pwl.weight"], state["blocks.6.0.conv_pwl.weight"])
    assert ck["state_dict"]["classifier.weight"].abs().sum() > 0  # the head learnt from its zero start
    assert ck["mean"] == [0.5, 0.5, 0.5] and ck["std"] == [0.5, 0.5, 0.5]
    recipe = yaml.safe_load((tmp_path / "r" / "resolved.yaml").read_text())["resolved"]["pretrained"]
    assert recipe["source"] == "timm tf_efficientnet_lite0.in1k" and recipe["mean"] == [0.5, 0.5, 0.5]
    assert recipe["head_lr"] == cfg.lr and recipe["backbone_lr"] == cfg.lr * 0.5
    assert recipe["freeze_epochs"] == 1 and recipe["input_size"] == 224 and recipe["image_size"] == 32
    assert m["run"]["pretrained"] == recipe
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["pretrained"] is True
    pred = Predictor(tmp_path / "r", backend="torch")
    x = pred.preprocess(np.zeros((1, 32, 32, 3), np.uint8))
    assert torch.allclose(x, torch.full_like(x, -1.0))  # (0 - 0.5) / 0.5, not ImageNet's mean/std


@pytest.mark.slow
def test_a_pretrained_resnet18_checkpoint_rebuilds_without_the_cache(tmp_path, torch_home):
    from conftest import fill_torch_cache

    state = fill_torch_cache("resnet18")
    train(tiny(model="resnet18", pretrained=True, epochs=1), tmp_path / "r", log=quiet, progress=False)
    ck = read_checkpoint(tmp_path / "r" / "best.pt")
    assert ck["model"]["kwargs"]["small_stem"] is False and "pretrained" not in ck["model"]["kwargs"]
    assert not torch.equal(ck["state_dict"]["conv1.weight"], state["conv1.weight"])  # fine-tuned
    for f in torch_home.rglob("*.pth"):
        f.unlink()  # load_model must rebuild from the file alone (a download would fail the test)
    model, meta = load_model(tmp_path / "r")
    assert model.conv1.kernel_size == (7, 7) and meta["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_pretrained_refuses_a_model_without_weights():
    with pytest.raises(ConfigError, match="--pretrained: cnn2x32 has no pretrained weights"):
        tiny(pretrained=True)
    with pytest.raises(ConfigError, match="freeze_epochs must be in"):
        tiny(model="resnet18", pretrained=True, freeze_epochs=3)
