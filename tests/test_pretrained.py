"""Pretrained weights from the torch and Hugging Face caches, filled here with locally generated
weights under the file names the libraries look for; nothing is ever downloaded (a download attempt
fails the test), and the offline lines name the file to put where."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import fill_hf_cache, fill_torch_cache

from bloodcell.errors import BloodcellError
from bloodcell.models import get_model, model_info
from bloodcell.models import pretrained as pre

timm = pytest.importorskip("timm")

LITE0 = "timm/tf_efficientnet_lite0"


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenet_v3_small", "mobilenet_v2"])
def test_torchvision_weights_come_from_the_torch_cache(torch_home, name):
    state = fill_torch_cache(name)
    model = get_model(name, num_classes=5, image_size=64, pretrained=True)
    own = model.state_dict()
    new = pre.new_parameters(model)
    assert new and all(own[k].shape[0] == 5 for k in new if k.endswith("weight"))  # the new classifier
    assert not any(own[k].any() for k in new)  # at zero
    kept = [k for k in state if k not in new]
    assert len(kept) > 10 and all(torch.equal(own[k], state[k]) for k in kept)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_pretrained_resnet18_keeps_its_imagenet_stem_at_small_sizes(torch_home):
    fill_torch_cache("resnet18")
    assert get_model("resnet18", 4, 32).conv1.kernel_size == (3, 3)  # from scratch: the small stem
    assert get_model("resnet18", 4, 32, pretrained=True).conv1.kernel_size == (7, 7)


def test_offline_torchvision_weights_are_one_line_naming_the_file(torch_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BloodcellError) as e:
        get_model("resnet18", 4, 64, pretrained=True)
    msg = str(e.value)
    target = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg
    assert f"put resnet18-f37072fd.pth (from https://download.pytorch.org/models/resnet18-f37072fd.pth) at {target}" in msg


def test_a_failed_download_is_one_line_naming_the_file(torch_home, monkeypatch):
    def unreachable(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(BloodcellError, match=r"resnet18-f37072fd.pth could not be downloaded \(URLError\): put "):
        get_model("resnet18", 4, 64, pretrained=True)


def test_pretrained_weights_from_a_file(tmp_path, torch_home):
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "mine.pth")
    model = get_model("resnet18", 4, 64, pretrained=True, weights=tmp_path / "mine.pth")
    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert not pre.cache_file("resnet18").exists()


def test_weights_info_is_the_weights_own_normalisation_and_size():
    tv = pre.weights_info("resnet18")
    assert tv["mean"] == pytest.approx([0.485, 0.456, 0.406]) and tv["input_size"] == 224
    lite = pre.weights_info(LITE0)
    assert lite["mean"] == [0.5, 0.5, 0.5] and lite["std"] == [0.5, 0.5, 0.5] and lite["input_size"] == 224
    assert lite["file"] == "hf.co/timm/tf_efficientnet_lite0.in1k/model.safetensors"
    with pytest.raises(BloodcellError, match="cnn4x32 has no pretrained weights"):
        pre.weights_info("cnn4x32")


def test_timm_weights_come_from_the_hub_cache_offline(hf_cache):
    state = fill_hf_cache(hf_cache)
    model = get_model(LITE0, num_classes=3, image_size=32, pretrained=True)
    assert torch.equal(model.conv_stem.weight, state["conv_stem.weight"])
    assert torch.equal(model.blocks[3][0].conv_pw.weight, state["blocks.3.0.conv_pw.weight"])
    assert model.classifier.out_features == 3
    assert pre.new_parameters(model) == {"classifier.weight", "classifier.bias"}
    assert not model.classifier.weight.any() and not model.classifier.bias.any()  # starts at zero
    with torch.no_grad():
        assert torch.equal(model.eval()(torch.randn(2, 3, 32, 32)), torch.zeros(2, 3))
    assert model_info(LITE0)["family"] == "timm"


def test_timm_weights_from_a_file(tmp_path, hf_cache):
    torch.manual_seed(4)
    state = timm.create_model("tf_efficientnet_lite0").state_dict()
    torch.save(state, tmp_path / "lite0.pth")
    model = get_model(LITE0, num_classes=3, image_size=32, pretrained=True, weights=tmp_path / "lite0.pth")
    assert torch.equal(model.conv_stem.weight, state["conv_stem.weight"])
    with pytest.raises(BloodcellError, match="no such file"):
        get_model(LITE0, 3, 32, pretrained=True, weights=tmp_path / "missing.pth")


def test_offline_timm_weights_are_one_line_naming_the_file(hf_cache):
    with pytest.raises(BloodcellError) as e:
        get_model(LITE0, num_classes=3, image_size=32, pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{LITE0} --pretrained: model.safetensors of hf.co/timm/tf_efficientnet_lite0.in1k "
                          f"is not in the Hugging Face cache ({hf_cache}) and HF_HUB_OFFLINE is set")
    assert "--weights FILE" in msg


def test_timm_from_scratch_and_unknown_names():
    torch.manual_seed(0)
    model = get_model(LITE0, num_classes=4, image_size=32).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="unknown timm model 'tf_efficientnet_lite99'; close: tf_efficientnet"):
        get_model("timm/tf_efficientnet_lite99", num_classes=4)


def test_without_timm_one_line_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(BloodcellError) as e:
        get_model("timm/resnet18", num_classes=4)
    assert str(e.value) == "timm/resnet18 needs the timm extra: pip install 'bloodcell[timm]'"


@pytest.mark.slow
def test_cli_offline_is_one_line_and_writes_nothing(tmp_path):
    """The user's path: a real process with the hub's own offline setting and an empty cache."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
           "BLOODCELL_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = tmp_path / "run"
    for model in (LITE0, "resnet18"):
        r = subprocess.run([sys.executable, "-m", "bloodcell", "train", "--data", "synthetic:60", "--model", model,
                            "--pretrained", "--epochs", "1", "--image-size", "32", "--out", str(out), "--quiet"],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 2, r.stderr
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and "HF_HUB_OFFLINE is set" in lines[0] and "Traceback" not in r.stderr
        assert ("model.safetensors of hf.co/timm/tf_efficientnet_lite0.in1k" if model == LITE0
                else "resnet18-f37072fd.pth") in lines[0]
        assert not (out / "config.yaml").exists()
        assert "data:" not in r.stdout  # refused before reading any data


def test_a_bad_weights_file_is_one_line(tmp_path, torch_home):
    (tmp_path / "bad.pth").write_bytes(b"not a torch file")
    with pytest.raises(BloodcellError, match=r"--weights .*bad.pth: not a readable weights file"):
        get_model("resnet18", 4, 64, pretrained=True, weights=tmp_path / "bad.pth")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")  # another model's weights
    with pytest.raises(BloodcellError, match="the weights do not fit the model"):
        get_model("resnet18", 4, 64, pretrained=True, weights=tmp_path / "other.pth")


def test_preflight_refuses_only_what_no_cache_holds(hf_cache, torch_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, fill in ((LITE0, lambda: fill_hf_cache(hf_cache)), ("resnet18", lambda: fill_torch_cache("resnet18"))):
        with pytest.raises(BloodcellError, match="HF_HUB_OFFLINE is set"):
            pre.preflight(name)
        fill()
        pre.preflight(name)  # now in the cache: nothing to say
