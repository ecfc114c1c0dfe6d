"""adapt: a trained model fitted to a new lab's images without a label; the result is a run folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import quiet, tiny

from bloodcell.cli import main
from bloodcell.data import BatchLoader, load_dataset
from bloodcell.errors import BloodcellError
from bloodcell.models.checkpoint import load_model, read_checkpoint
from bloodcell.studies.adapt import adapt, reestimate_bn
from bloodcell.training.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapt") / "run"
    train(tiny(data="synthetic:160"), out, log=quiet, progress=False)
    return out


def first_bn_input_stats(model, images) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance per channel of what the model's first BatchNorm sees."""
    seen = []
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    h = bn.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        for x, _ in BatchLoader(images, 64):
            model(x)
    h.remove()
    x = torch.cat(seen)
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)


def test_bn_statistics_are_those_of_the_new_images(tmp_path, run) -> None:
    """After adapt, the first BatchNorm's running mean is the mean of its input over the new lab's
    train images (the other layers follow), and no label was read: shuffled labels, same weights."""
    other = "synthetic:120"  # another draw of the generator: another 'lab'
    metrics = adapt(run, other, tmp_path / "a", batch_size=128, log=quiet)  # one batch: exact
    model, meta = load_model(tmp_path / "a")
    assert meta["adapted"]["images"] == 84 and meta["adapted"]["labels_read"] is False
    ds = load_dataset(other, image_size=32)
    mean, var = first_bn_input_stats(model, ds.splits["train"])
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.allclose(bn.running_mean, mean, atol=1e-4)
    assert torch.allclose(bn.running_var, var, rtol=1e-3, atol=1e-5)  # (n / (n - 1) of 21,504 values: ~1)
    several = load_model(adapt(run, other, tmp_path / "b", batch_size=16, log=quiet) and tmp_path / "b")[0]
    bn16 = next(m for m in several.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.allclose(bn16.running_mean, mean, atol=0.05)  # the average of the batches' means
    before = load_model(run)[0]
    bn0 = next(m for m in before.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(bn0.running_mean, bn.running_mean)
    assert set(metrics) == {"val", "test"} and "before" in metrics["test"]

    # labels are not read: the same images under other labels adapt to the same weights
    ds.splits["train"].labels[:] = np.roll(ds.splits["train"].labels, 1)
    again, _ = load_model(run)
    reestimate_bn(again, BatchLoader(ds.splits["train"], 128), "cpu")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(),
                                                  strict=True))


def test_the_adapted_run_is_a_run_folder_every_command_takes(tmp_path, run, capsys) -> None:
    out = tmp_path / "a"
    assert main(["adapt", str(run), "--data", "synthetic:120", "--out", str(out), "--entropy-steps", "3"]) == 0
    assert capsys.readouterr().out.strip() == f"run folder: {out}"
    rec = json.loads((out / "adapt.json").read_text())
    assert rec["entropy_steps"] == 3 and len(rec["entropy"]) == 2
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == ["DONE", "adapt.json", "best.pt", "config.yaml",
                                                                         "metrics.json"]
    assert main(["evaluate", str(out), "--data", "synthetic:120", "--split", "test", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)["test"]
    assert scored["accuracy"] == json.loads((out / "metrics.json").read_text())["test"]["accuracy"]
    assert main(["export", str(out), "--out", str(tmp_path / "m.onnx")]) == 0
    assert main(["adapt", str(out), "--data", "synthetic:100", "--out", str(tmp_path / "b")]) == 0
    assert main(["train", "--data", "synthetic:96", "--image-size", "32", "--epochs", "1", "--threads", "1",
                 "--init-from", str(out), "--out", str(tmp_path / "t"), "--quiet"]) == 0
    # entropy steps change only the normalisation layers' scale and shift
    src, got = read_checkpoint(run)["state_dict"], read_checkpoint(out)["state_dict"]
    conv = [k for k in src if src[k].ndim == 4]
    assert conv and all(torch.equal(src[k], got[k]) for k in conv)


def test_bad_adapt_input_is_one_line_and_loses_nothing(tmp_path, run, capsys) -> None:
    out = tmp_path / "a"
    assert main(["adapt", str(run), "--data", "synthetic:120", "--out", str(out)]) == 0
    before = (out / "best.pt").read_bytes()
    capsys.readouterr()
    cases = [
        (["--data", "synthetic:120", "--out", str(out)], "already holds a finished run"),
        (["--data", "/nonexistent", "--out", str(tmp_path / "x")], "does not exist"),
        (["--data", "synthetic:120", "--out", str(run)], "another folder"),
        (["--data", "synthetic:120", "--out", str(tmp_path / "y"), "--split", "nope"], "split 'nope'"),
    ]
    for argv, want in cases:
        assert main(["adapt", str(run), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], (argv, err)
    with pytest.raises(SystemExit) as e:  # a number outside its range: argparse's usage and error line
        main(["adapt", str(run), "--data", "synthetic:120", "--out", str(tmp_path / "z"), "--entropy-steps", "-1"])
    assert e.value.code == 2 and "argument --entropy-steps: -1 is outside" in capsys.readouterr().err
    assert (out / "best.pt").read_bytes() == before
    with pytest.raises(BloodcellError, match="no checkpoint"):
        adapt(tmp_path, "synthetic:120", tmp_path / "w", log=quiet)


def test_group_norm_model_has_nothing_to_reestimate_but_takes_entropy_steps(tmp_path) -> None:
    train(tiny(norm="group", data="synthetic:120"), tmp_path / "g", log=quiet, progress=False)
    logs: list[str] = []
    adapt(tmp_path / "g", "synthetic:100", tmp_path / "a", entropy_steps=2, log=logs.append)
    assert any("no batch-norm layer" in m for m in logs)
    src, got = read_checkpoint(tmp_path / "g")["state_dict"], read_checkpoint(tmp_path / "a")["state_dict"]
    changed = [k for k in src if not torch.equal(src[k], got[k])]
    assert changed and all("features" in k and src[k].ndim == 1 for k in changed)  # GroupNorm scale/shift


def test_a_folder_of_unlabelled_images_is_adapted_on_whole(tmp_path, run, images) -> None:
    """What a lab has before anyone labels a cell: a flat folder of images; a corrupt one is skipped
    with a line; nothing is scored."""
    (images[0].parent / "broken.png").write_bytes(b"not an image")
    logs: list[str] = []
    assert adapt(run, str(images[0].parent), tmp_path / "a", log=logs.append) == {}
    rec = json.loads((tmp_path / "a" / "adapt.json").read_text())
    assert rec["images"] == len(images) and rec["split"] == "all"
    assert any("skipped" in m and "broken.png" in m for m in logs)
    assert not torch.equal(read_checkpoint(run)["state_dict"]["features.0.2.running_mean"],
                           read_checkpoint(tmp_path / "a")["state_dict"]["features.0.2.running_mean"])
