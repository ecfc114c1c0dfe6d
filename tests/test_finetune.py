"""The never-worse fine-tune (train --init-from with few labelled cells): the adapted start against
the fine-tune, chosen by the labelled cells' own grouped cross-validation, never by the test split."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from conftest import quiet, tiny
from PIL import Image

import bloodcell.studies.finetune as ft
from bloodcell.cli import main
from bloodcell.data import BatchLoader, load_dataset
from bloodcell.data.sources import few_labels
from bloodcell.data.synthetic import CLASSES
from bloodcell.models.checkpoint import load_model, read_checkpoint
from bloodcell.runtime import set_threads
from bloodcell.studies.adapt import reestimate_bn
from bloodcell.studies.finetune import choose, finetune, paired_gain, safe_finetune
from bloodcell.training.evaluate import evaluate_checkpoint
from bloodcell.training.train import train

LAB = "synthetic:240"  # another draw of the generator: the lab's cells


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "run"
    train(tiny(data="synthetic:160", epochs=3), out, log=quiet, progress=False)
    return out


@pytest.fixture(scope="module")
def other_lab_model(run, tmp_path_factory):
    """The run's model with its classifier's rows turned by one class: a model trained where each
    class had its neighbour's name, so on this lab it reads almost every cell wrong."""
    ck = read_checkpoint(run)
    sd = ck["state_dict"]
    w = [k for k, v in sd.items() if k.endswith("weight") and v.ndim == 2][-1]
    for k in (w, w.removesuffix("weight") + "bias"):
        sd[k] = torch.roll(sd[k], 1, 0)
    path = tmp_path_factory.mktemp("other") / "other.pt"
    buf = io.BytesIO()
    torch.save(ck, buf)
    path.write_bytes(buf.getvalue())
    return path


def test_the_gain_and_its_error_count_groups() -> None:
    """Cells of one field move together: their gain's error is that of one cell each, not many."""
    start = np.zeros(40, bool)
    tuned = np.zeros(40, bool)
    tuned[:4] = True  # four cells fixed, all of one field
    alone, se_alone = paired_gain(start, tuned, np.arange(40))
    field, se_field = paired_gain(start, tuned, np.repeat(np.arange(10), 4))
    assert alone == field == pytest.approx(0.1)
    assert se_field > 1.5 * se_alone
    one = paired_gain(start, np.arange(40) == 0, np.arange(40))  # one cell of 40 fixed: 1/40 ± 1/40
    cv = {"n": 40, "folds": 5, "start": {"balanced_accuracy": 0.5}, "finetune": {"balanced_accuracy": 0.525}, "gain": one[0],
          "gain_se": one[1]}
    assert choose(cv, 1.0)[0] == "start"
    assert choose({**cv, "gain": 0.1, "gain_se": 0.03}, 1.0)[0] == "finetune"
    assert choose({**cv, "gain": -0.1, "gain_se": 0.0}, 0.0)[0] == "start"
    # a class shown once weighs as much as one shown 39 times: fixing that one cell is half the gain
    labels = (np.arange(40) == 0).astype(int)
    assert paired_gain(start, np.arange(40) == 0, np.arange(40), labels)[0] == pytest.approx(0.5)
    skewed = paired_gain(start, np.arange(40) == 0, np.arange(40), labels)
    assert skewed[1] > 5 * one[1]  # and its error with it


@pytest.mark.slow
def test_a_finetune_that_helps_is_kept_and_the_cells_are_recorded(tmp_path, other_lab_model) -> None:
    lines: list[str] = []
    m = finetune(tiny(data=LAB, init_from=str(other_lab_model), labels_per_class=10), tmp_path / "ft", given=(),
                 log=lines.append)
    cv = m["finetune"]["cv"]
    assert m["run"]["kept"] == "finetune", lines
    assert cv["finetune"]["accuracy"] > cv["start"]["accuracy"] + 0.2 and cv["n"] == 40 and cv["folds"] == 5
    assert m["run"]["labelled_cells"]["train"] == dict.fromkeys(CLASSES, 10)
    saved = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert saved["cells"] == dict.fromkeys(CLASSES, 10) and saved["kept"] == "finetune"
    assert json.loads((tmp_path / "ft" / "metrics.json").read_text())["finetune"]["cv"] == saved["cv"]
    assert any("the fine-tune is kept" in line for line in lines)
    # and it is better on the lab's test split than the model it started from
    before = evaluate_checkpoint(other_lab_model, LAB, split="test", device="cpu", log=quiet)["test"]["accuracy"]
    assert m["test"]["accuracy"] > before + 0.2


@pytest.mark.slow
def test_random_labels_keep_the_adapted_start_and_say_so(tmp_path, run) -> None:
    """Labels that carry nothing: the fine-tune cannot show a gain on them, so best.pt is the start
    adapted to the cells' images, bit for bit, and the run says so. The rule keeps a fine-tune only
    beyond one standard error of its gain, so by chance about one draw in six still keeps one (no
    worse on average then): three of four draws must keep the start."""
    kept = []
    set_threads(1)  # as train --threads 1 would (a test before may have scored on every core)
    for seed in range(4):
        ds = few_labels(load_dataset(LAB, image_size=32), 10, seed, splits=("train",))
        cells = ds.splits["train"]
        cells.labels[:] = np.random.default_rng(seed).permutation(cells.labels)  # ten of each, on any cell
        lines: list[str] = []
        out = tmp_path / f"ft{seed}"
        m = safe_finetune(run, cells, list(CLASSES), out, recipe=ft.Recipe(seed=seed), device="cpu", log=lines.append)
        kept.append(m["run"]["kept"])
        cv = m["finetune"]["cv"]
        assert (m["run"]["kept"] == "finetune") == (cv["gain"] > cv["gain_se"])
        if m["run"]["kept"] == "start":
            assert any("the adapted start is kept" in line for line in lines)
            start, _ = load_model(run)
            reestimate_bn(start, BatchLoader(cells, 64), "cpu")
            final, _ = load_model(out)
            assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), final.state_dict().values(),
                                                          strict=True))
    assert kept.count("start") >= 3, kept


def test_a_class_no_labelled_cell_shows_keeps_the_start() -> None:
    cv = {"n": 40, "folds": 5, "start": {"balanced_accuracy": 0.5}, "finetune": {"balanced_accuracy": 0.9}, "gain": 0.4,
          "gain_se": 0.05, "unlabelled_classes": ["eosinophil"]}
    kept, why = choose(cv, 1.0)
    assert kept == "start" and "no labelled cell of eosinophil" in why


def test_labels_chosen_least_sure_first_vouch_only_for_the_doubtful_cells() -> None:
    """The lab's images the start is surer of than of any labelled cell are beyond the labels'
    reach; a fine-tune that changes many of their answers is not kept though its cross-validated
    gain is clear, one that leaves them be is; labels that reach every image change nothing."""
    from bloodcell.studies.finetune import reach

    def probs(top):  # two classes; class 0 with probability ``top``
        top = np.asarray(top, float)
        return np.stack([top, 1 - top], 1)

    images = probs(np.linspace(0.5, 0.99, 100))
    cells = probs([0.55, 0.6, 0.7])  # the labels a review shows first: the doubtful ones
    flips = images[:, ::-1].copy()  # a fine-tune that turns every answer around
    r = reach(images, cells, flips)
    assert r["threshold"] == pytest.approx(0.7) and r["beyond"] == pytest.approx(0.59, abs=0.01)
    assert r["changed"] == 1.0 and r["images"] == 100
    cv = {"n": 40, "folds": 5, "start": {"balanced_accuracy": 0.5}, "finetune": {"balanced_accuracy": 0.8}, "gain": 0.3,
          "gain_se": 0.05}
    assert choose(cv, 1.0)[0] == "finetune"
    kept, why = choose({**cv, "reach": r}, 1.0)
    assert kept == "start" and "surer than any labelled cell" in why and "changes 100.0 %" in why
    calm = images.copy()
    calm[-3:] = calm[-3:, ::-1]  # it changes 3 of the 59 sure answers
    kept, why = choose({**cv, "reach": reach(images, cells, calm)}, 1.0)
    assert kept == "finetune" and "changes 5.1 %" in why
    everywhere = reach(images, probs([0.5, 0.99]), flips)
    assert everywhere["beyond"] == 0 and choose({**cv, "reach": everywhere}, 1.0)[0] == "finetune"


class Tripwire:
    """A split's images that may be read only once the choice is on disk."""

    def __init__(self, images, choice_file):
        self.images, self.choice_file, self.reads = images, choice_file, 0
        self.shape, self.dtype = images.shape, images.dtype

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        assert self.choice_file.exists(), "the test split was read before the choice was written"
        self.reads += 1
        return self.images[key]


@pytest.mark.slow
def test_the_test_split_is_read_only_after_the_choice(tmp_path, run, monkeypatch) -> None:
    out = tmp_path / "ft"
    wires = []
    real = ft.config_dataset

    def wired(cfg):
        ds = real(cfg)
        s = ds.splits["test"]
        wires.append(Tripwire(s.images, out / "finetune.json"))
        ds.splits["test"] = type(s)(wires[-1], s.labels, s.groups, s.paths, s.sources)
        return ds

    monkeypatch.setattr(ft, "config_dataset", wired)
    m = finetune(tiny(data=LAB, init_from=str(run), labels_per_class=5), out, given=(), log=quiet)
    assert wires and wires[0].reads > 0 and m["test"]["n"] == len(wires[0])  # read, and only after
    assert m["finetune"]["test_read"] is False


@pytest.mark.slow
def test_train_init_from_takes_the_safe_path_and_its_run_folder_works(tmp_path, run, capsys) -> None:
    out = tmp_path / "ft"
    assert main(["train", "--init-from", str(run), "--data", LAB, "--labels-per-class", "5", "--out", str(out),
                 "--quiet", "--threads", "1"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"run folder: {out}")
    rec = json.loads((out / "finetune.json").read_text())
    assert rec["cells"] == dict.fromkeys(CLASSES, 5) and rec["kept"] in ("start", "finetune")
    assert rec["recipe"]["epochs"] == ft.Recipe().epochs  # the recipe's defaults where no flag was given
    assert main(["evaluate", str(out), "--data", LAB, "--split", "test", "--json"]) == 0  # a run folder to it
    assert json.loads(capsys.readouterr().out)["test"]["n"] == 36
    scored = evaluate_checkpoint(out, LAB, split="test", precision="fp32", log=quiet)["test"]
    assert scored["accuracy"] == pytest.approx(json.loads((out / "metrics.json").read_text())["test"]["accuracy"])
    # a flag given is the recipe's; --plain-finetune is a plain training run
    assert main(["train", "--init-from", str(run), "--data", LAB, "--labels-per-class", "5", "--epochs", "2",
                 "--out", str(tmp_path / "e2"), "--quiet", "--threads", "1"]) == 0
    assert json.loads((tmp_path / "e2" / "finetune.json").read_text())["recipe"]["epochs"] == 2
    assert main(["train", "--init-from", str(run), "--data", LAB, "--labels-per-class", "5", "--plain-finetune",
                 "--epochs", "1", "--image-size", "32", "--model", "cnn2x32", "--out", str(tmp_path / "plain"),
                 "--quiet", "--threads", "1"]) == 0
    assert (tmp_path / "plain" / "history.csv").exists() and not (tmp_path / "plain" / "finetune.json").exists()
    capsys.readouterr()
    assert main(["train", "--data", LAB, "--adapt-data", LAB, "--out", str(tmp_path / "x")]) == 2
    assert "--adapt-data" in capsys.readouterr().err


@pytest.mark.slow
def test_a_review_s_labels_csv_fine_tunes_as_it_is(tmp_path, run, capsys) -> None:
    """What `bloodcell review` writes (path,label,group,split,source, every cell train) is what
    `train --init-from RUN --data DIR/labels.csv` learns from: a dozen cells, no split carved out."""
    from bloodcell.data.synthetic import generate
    from bloodcell.serve.review import LABEL_COLUMNS

    images, labels = generate(12, 48, seed=7)[:2]
    rows = []
    for i, (im, k) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(im).save(tmp_path / f"c{i}.png")
        rows.append({"path": f"c{i}.png", "label": CLASSES[k], "group": f"field{i // 2}", "split": "train",
                     "source": "review"})
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, LABEL_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "ft"
    assert main(["train", "--init-from", str(run), "--data", str(tmp_path / "labels.csv"), "--out", str(out),
                 "--quiet", "--threads", "1"]) == 0
    rec = json.loads((out / "finetune.json").read_text())
    assert sum(rec["cells"].values()) == 12 and rec["kept"] in ("start", "finetune")
    assert rec["adapted_on"]["images"] == 12  # a loose labels.csv: the start is adapted on its cells
    # in a count folder (cells.csv beside it), the start is adapted on every cell the count found
    more = generate(8, 48, seed=8)[0]
    for i, im in enumerate(more):
        Image.fromarray(im).save(tmp_path / f"u{i}.png")
    with open(tmp_path / "cells.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide", "image", "label", "prob", "crop"] + [f"p_{c}" for c in CLASSES])
        for name in [f"c{i}.png" for i in range(12)] + [f"u{i}.png" for i in range(8)]:
            w.writerow(["s", "field", CLASSES[0], 1.0, name] + [1.0] + [0.0] * (len(CLASSES) - 1))
    assert main(["train", "--init-from", str(run), "--data", str(tmp_path / "labels.csv"), "--out",
                 str(tmp_path / "ft2"), "--quiet", "--threads", "1"]) == 0
    rec = json.loads((tmp_path / "ft2" / "finetune.json").read_text())
    assert rec["adapted_on"]["images"] == 20 and "cells.csv" in rec["adapted_on"]["what"]
    assert sum(rec["cells"].values()) == 12
    capsys.readouterr()


def test_a_lopsided_set_of_labels_weighs_each_class_alike():
    from torch import nn

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    w = ft.balancing_weights(np.array([0, 0, 0, 1]), model)
    assert torch.allclose(w, torch.tensor([4 / 6, 2.0, 1.0]))  # class 2 unlabelled: no term to weigh
    counts = np.array([3, 1])
    assert np.isclose((w[:2].numpy() * counts)[0], (w[:2].numpy() * counts)[1])  # each class's total alike


def test_class_weights_of_a_train_split_count_an_absent_class_once():
    """--class-weights (every class, an absent one counted as one cell) and the fine-tune's weights
    (present classes only) come from one helper and agree where every class has labels."""
    from bloodcell.training.engine import class_balance

    w = class_balance(np.array([0, 0, 0, 1]), 3)
    assert torch.allclose(w, torch.tensor([4 / 9, 4 / 3, 4 / 3]))
    full = np.array([0, 0, 0, 1, 2, 2])
    assert torch.allclose(class_balance(full, 3), class_balance(full, 3, present_only=True))
