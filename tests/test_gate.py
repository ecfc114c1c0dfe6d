"""gate: a colour run and a grey-level run joined by a colour gate, and the gated run in every command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import quiet, tiny, write_image

from bloodcell.cli import main
from bloodcell.data import BatchLoader, load_dataset
from bloodcell.data.images import decode_image
from bloodcell.inference.cam import GradCAM
from bloodcell.inference.export import export_model, run_exported
from bloodcell.models.checkpoint import load_model, read_checkpoint
from bloodcell.models.gate import ColourGate, fit_gate
from bloodcell.models.registry import get_model
from bloodcell.studies.finetune import learnable
from bloodcell.studies.gate import join
from bloodcell.training.train import train

CLASSES = ("alpha", "beta", "gamma")


def lab(root, tint, seed: int):
    """Three classes of twelve images, each class its own shade of the lab's tint."""
    for c, cls in enumerate(CLASSES):
        for i in range(12):
            colour = tuple(min(255, t + 40 * c) for t in tint)
            write_image(root / cls / f"{cls}_{i}.png", size=(40, 40), color=colour, seed=seed + 100 * c + i)
    return root


@pytest.fixture(scope="module")
def labs(tmp_path_factory):
    base = tmp_path_factory.mktemp("labs")
    return {"a": lab(base / "lab_a", (150, 40, 150), 0), "b": lab(base / "lab_b", (200, 170, 60), 1000),
            "unseen": lab(base / "unseen", (20, 200, 20), 2000)}


@pytest.fixture(scope="module")
def pair(labs, tmp_path_factory):
    base = tmp_path_factory.mktemp("pair")
    data = [str(labs["a"]), str(labs["b"])]
    for name, stain in (("colour", "lab"), ("grey", "gray")):
        train(tiny(data=data, stain_norm=stain, epochs=1), base / name, log=quiet, progress=False)
    join(base / "colour", base / "grey", base / "gated", log=quiet)
    return base


def batch(root, meta) -> torch.Tensor:
    ds = load_dataset(str(root), image_size=meta["image_size"], resize=meta["resize"])
    return torch.cat([x for s in ds.splits.values() for x, _ in BatchLoader(s, 64)])


def test_a_known_lab_is_read_in_colour_and_an_unseen_one_in_grey(pair, labs) -> None:
    info = json.loads((pair / "gated" / "gate.json").read_text())
    assert set(info["labs"]) == {str(labs["a"]), str(labs["b"])}
    assert all(r["to_colour"] >= 0.9 for r in info["labs"].values()), info
    model, meta = load_model(pair / "gated")
    assert isinstance(model, ColourGate)
    known, unseen = batch(labs["a"], meta), batch(labs["unseen"], meta)
    assert model.routes(known).float().mean() >= 0.9
    assert not model.routes(unseen).any()
    x = torch.cat([known, unseen])
    with torch.no_grad():
        got, c, g = model(x), model.colour(x), model.grey(x)
    use = model.routes(x)
    torch.testing.assert_close(got[use], c[use])
    torch.testing.assert_close(got[~use], g[~use])
    # the branches are the two runs' own models, weights unchanged
    for branch, run in (("colour", "colour"), ("grey", "grey")):
        own = read_checkpoint(pair / run)["state_dict"]
        assert all(torch.equal(v, getattr(model, branch).state_dict()[k]) for k, v in own.items())


def test_the_threshold_holds_the_quantile_of_the_training_images() -> None:
    rng = np.random.default_rng(0)
    images = {"red": rng.integers(100, 255, (200, 16, 16, 3), dtype=np.uint8) // np.array([1, 3, 3], np.uint8),
              "blue": rng.integers(100, 255, (200, 16, 16, 3), dtype=np.uint8) // np.array([3, 3, 1], np.uint8)}
    model = get_model("cnn2x32", num_classes=3, image_size=32)
    for q in (0.9, 0.99):
        gate, info = fit_gate(model, model, images, q)
        share = np.mean([r["to_colour"] for r in info["labs"].values()])
        assert share == pytest.approx(q, abs=0.01)
    with pytest.raises(Exception, match="at least 10 training images per lab"):
        fit_gate(model, model, {"few": images["red"][:5]})


def test_the_gated_run_is_a_run_every_command_takes(pair, labs, tmp_path, capsys) -> None:
    run = pair / "gated"
    assert main(["evaluate", str(run), "--data", str(labs["unseen"]), "--split", "all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["all"]["n"] == 36
    img = next((labs["a"] / "alpha").iterdir())
    assert main(["predict", str(run), str(img), "--format", "json", "--cam", str(tmp_path / "cam")]) == 0
    assert capsys.readouterr().out.count(str(img)) == 1 and any((tmp_path / "cam").glob("*.png"))
    # ONNX: the gate is exported with the branches; images of both routes agree with PyTorch
    model, meta = load_model(run)
    export_model(run, "onnx", tmp_path / "g.onnx")
    x = torch.cat([batch(labs["a"], meta)[:4], batch(labs["unseen"], meta)[:4]])
    assert 0 < int(model.routes(x).sum()) < len(x)
    with torch.no_grad():
        np.testing.assert_allclose(run_exported(tmp_path / "g.onnx", x.numpy()), model(x).numpy(), atol=1e-4)
    # Grad-CAM: each image's map is the one the branch that reads it gives
    heat, use = GradCAM(model, x)(x), model.routes(x).numpy()
    assert heat.shape == (8, 32, 32)
    np.testing.assert_allclose(heat[use], GradCAM(model.colour, x)(x)[use], atol=1e-6)
    np.testing.assert_allclose(heat[~use], GradCAM(model.grey, x)(x)[~use], atol=1e-6)
    # adapt re-estimates both branches; a fine-tune from it starts from the branch its stain reads
    assert main(["adapt", str(run), "--data", str(labs["unseen"]), "--out", str(tmp_path / "ad")]) == 0
    assert isinstance(load_model(tmp_path / "ad")[0], ColourGate)
    assert main(["train", "--data", str(labs["a"]), "--image-size", "32", "--epochs", "1", "--threads", "1",
                 "--model", "cnn2x32", "--stain-norm", "gray", "--plain-finetune", "--init-from", str(run),
                 "--out", str(tmp_path / "ft"), "--quiet"]) == 0
    grey = read_checkpoint(pair / "grey")["state_dict"]
    start = read_checkpoint(tmp_path / "ft")
    assert start["model"]["name"] == "cnn2x32"
    conv = [k for k in grey if grey[k].ndim == 4]
    assert conv and all(k in start["state_dict"] for k in conv)


def test_a_labelled_fine_tune_of_the_gated_run_keeps_the_gate(pair, labs, tmp_path) -> None:
    assert main(["train", "--data", str(labs["b"]), "--init-from", str(pair / "gated"), "--labels-per-class", "5",
                 "--threads", "1", "--out", str(tmp_path / "ft"), "--quiet"]) == 0
    model, _ = load_model(tmp_path / "ft")
    assert isinstance(model, ColourGate)
    # what the fine-tune trains: each branch's classifier (and, with norm, every norm layer)
    heads = [[m for m in b.modules() if isinstance(m, torch.nn.Linear)][-1] for b in (model.colour, model.grey)]
    assert {id(p) for p in learnable(model, "head")} == {id(p) for h in heads for p in h.parameters()}


def test_bad_pairs_get_one_line_and_lose_nothing(pair, labs, tmp_path, capsys) -> None:
    out = pair / "gated"
    before = (out / "best.pt").read_bytes()
    capsys.readouterr()
    cases = [
        ([str(pair / "colour"), str(pair / "grey"), "--out", str(out)], "already holds a finished run"),
        ([str(pair / "grey"), str(pair / "grey"), "--out", str(tmp_path / "x")], "reads grey levels"),
        ([str(pair / "colour"), str(pair / "colour"), "--out", str(tmp_path / "x")], "must read grey levels"),
        ([str(out), str(pair / "grey"), "--out", str(tmp_path / "x")], "already a gated model"),
        ([str(pair / "colour"), str(tmp_path / "nope"), "--out", str(tmp_path / "x")], "not found"),
    ]
    for argv, want in cases:
        assert main(["gate", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], (argv, err)
    with pytest.raises(SystemExit) as e:
        main(["gate", str(pair / "colour"), str(pair / "grey"), "--out", str(tmp_path / "y"), "--quantile", "2"])
    assert e.value.code == 2 and "--quantile: 2 is outside" in capsys.readouterr().err
    assert (out / "best.pt").read_bytes() == before
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_images_decoded_alike_are_routed_alike(pair, labs) -> None:
    model, meta = load_model(pair / "gated")
    img = next((labs["unseen"] / "beta").iterdir())
    x = torch.from_numpy(np.array(decode_image(str(img), meta["image_size"], meta["resize"])[None])).permute(0, 3, 1, 2)
    mean, std = torch.tensor(meta["mean"]).view(1, 3, 1, 1), torch.tensor(meta["std"]).view(1, 3, 1, 1)
    x = (x.float() / 255 - mean) / std
    assert torch.equal(model.routes(x), model.routes(torch.cat([x, x.flip(3)]))[:1])
