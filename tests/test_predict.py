"""predict: decoding like training, backends that agree, error rows, TTA, top-k, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import png_bytes
from PIL import Image
from torch import nn

from bloodcell.cli import main
from bloodcell.data.images import load_image
from bloodcell.data.transforms import normalize, to_float, tta_view
from bloodcell.inference.cam import overlay_png
from bloodcell.inference.predict import ImageError, Predictor, decode_image, expand_inputs
from bloodcell.models import get_model
from bloodcell.models.checkpoint import save_checkpoint

CLASSES = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]


def make_checkpoint(path: Path, model: str = "cnn4x32", image_size: int = 32, seed: int = 0,
                    **options) -> Path:
    """An untrained but non-trivial checkpoint (random BatchNorm statistics too), in seconds;
    ``options`` are more model arguments (``stain_norm``)."""
    torch.manual_seed(seed)
    net = get_model(model, num_classes=len(CLASSES), image_size=image_size, **options)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    save_checkpoint(path, net, model_name=model, model_kwargs={"num_classes": len(CLASSES),
                                                               "image_size": image_size, **options},
                    classes=CLASSES, image_size=image_size, resize="squash")
    return path


def real_test_images(kaggle_root: Path, per_class: int = 3) -> list[Path]:
    """A few real images of each class from the Kaggle TEST split."""
    base = kaggle_root / "dataset2-master" / "images" / "TEST"
    return [f for c in CLASSES for f in sorted((base / c).glob("*.jpeg"))[:per_class]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def predictor(ckpt) -> Predictor:
    return Predictor(ckpt, backend="torch")


def reference_probs(predictor: Predictor, arrays: np.ndarray) -> np.ndarray:
    """What training's pipeline gives: to_float, normalize, the PyTorch model, softmax."""
    x = normalize(to_float(torch.from_numpy(arrays.copy())))
    with torch.no_grad():
        return torch.softmax(predictor.model(x), 1).numpy()


def test_bytes_decode_like_training_files(images) -> None:
    for p in images:
        assert np.array_equal(decode_image(p.read_bytes(), 32, "squash"), load_image(str(p), 32, "squash"))
        assert np.array_equal(decode_image(p.read_bytes(), 40, "pad"), load_image(str(p), 40, "pad"))


@pytest.mark.parametrize(("data", "kind"), [(b"", "empty"), (b"hello, not an image", "unsupported"),
                                            (png_bytes(fmt="JPEG")[:300], "corrupt")])
def test_bad_bytes_raise_image_error(data, kind) -> None:
    with pytest.raises(ImageError) as e:
        decode_image(data, 32)
    assert e.value.kind == kind and str(e.value)


def test_predictor_preprocesses_exactly_like_training(predictor, images) -> None:
    arrays = np.stack([load_image(str(p), 32) for p in images])
    rows = predictor.predict_paths([str(p) for p in images], top_k=4)
    got = np.array([[r["probs"][c] for c in CLASSES] for r in rows])
    np.testing.assert_allclose(got, reference_probs(predictor, arrays), atol=1e-5)
    for r in rows:
        assert r["class"] == max(r["probs"], key=r["probs"].get)
        assert [t["probability"] for t in r["top_k"]] == sorted(r["probs"].values(), reverse=True)
        assert abs(sum(r["probs"].values()) - 1) < 1e-5


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_backends_agree_with_pytorch(ckpt, predictor, images, backend) -> None:
    other = Predictor(ckpt, backend=backend)
    arrays = np.stack([load_image(str(p), 32) for p in images])
    np.testing.assert_allclose(other.probs(arrays), predictor.probs(arrays), atol=1e-4)
    np.testing.assert_allclose(other.probs(arrays, tta=True), predictor.probs(arrays, tta=True), atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_stain_norm_travels_in_the_checkpoint(tmp_path, images, backend) -> None:
    """A model trained with stain_norm=image is rebuilt with it: predict (PyTorch and the exported
    ONNX graph alike) gives a colour-cast image (a gain and offset per channel, as another stain
    or lamp would) the probabilities of the original, while the same weights without it do not."""
    arrays = np.stack([load_image(str(p), 32) for p in images])
    cast = np.rint(arrays * np.array([0.8, 0.55, 0.7]) + np.array([30, 60, 12])).astype(np.uint8)
    moved = {}
    for norm in ("image", "none"):
        pred = Predictor(make_checkpoint(tmp_path / f"{norm}.pt", seed=3, stain_norm=norm), backend=backend)
        moved[norm] = np.abs(pred.probs(cast) - pred.probs(arrays)).max()
    assert moved["image"] < 0.01 and moved["none"] > 5 * moved["image"], moved


def test_auto_backend_is_onnx_runtime_on_cpu(ckpt) -> None:
    assert Predictor(ckpt).backend == "onnx"  # the fastest measured (bench/infer_speed.py)


def test_tta_averages_the_eight_views(predictor, images) -> None:
    arrays = np.stack([load_image(str(p), 32) for p in images])
    x = normalize(to_float(torch.from_numpy(arrays.copy())))
    with torch.no_grad():
        want = np.mean([torch.softmax(predictor.model(tta_view(x, k)), 1).numpy() for k in range(8)], 0)
    got = predictor.probs(arrays, tta=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got, predictor.probs(arrays), atol=1e-4)  # the views do differ


def test_a_corrupt_file_gets_an_error_row_and_the_rest_go_on(predictor, images, tmp_path) -> None:
    bad = tmp_path / "imgs" / "broken.jpeg"
    bad.write_bytes(images[1].read_bytes()[:200])
    text = tmp_path / "imgs" / "notes.png"
    text.write_text("not an image")
    paths = [str(images[0]), str(bad), str(images[2]), str(text), str(tmp_path / "missing.png"),
             str(images[3])]
    rows = predictor.predict_paths(paths, batch_size=2)
    assert [r["path"] for r in rows] == paths
    assert [bool(r["error"]) for r in rows] == [False, True, False, True, True, False]
    assert "truncated" in rows[1]["error"] and "not an image" in rows[3]["error"]
    assert "not found" in rows[4]["error"]
    good = predictor.predict_paths([paths[0], paths[2], paths[5]])
    for r, i in zip(good, (0, 2, 5), strict=True):  # the same answers as without the bad files
        assert r["class"] == rows[i]["class"]
        assert r["probs"] == pytest.approx(rows[i]["probs"], abs=1e-6)


def test_expand_inputs_files_folders_globs(images, tmp_path) -> None:
    folder = str(tmp_path / "imgs")
    (tmp_path / "imgs" / "readme.txt").write_text("x")
    assert expand_inputs([folder]) == sorted(str(p) for p in images)
    assert expand_inputs([str(tmp_path / "imgs" / "*.png")]) == [str(images[0]), str(images[3])]
    assert expand_inputs(["nope/*.png", str(images[1])]) == ["nope/*.png", str(images[1])]


# --- Grad-CAM ------------------------------------------------------------------------------------


def test_cli_predict_formats_and_exit_codes(ckpt, images, tmp_path, capsys) -> None:
    folder = str(tmp_path / "imgs")
    assert main(["predict", str(ckpt), folder, "--format", "json", "--top-k", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(images) and all(len(r["top_k"]) == 2 and r["error"] is None for r in rows)

    (tmp_path / "imgs" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    cams = tmp_path / "cams"
    assert main(["predict", str(ckpt), folder, "--format", "csv", "--cam", str(cams), "--tta"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("path,class,probability,p_EOSINOPHIL")
    assert len(lines) == 1 + len(images) + 1
    broken = [ln for ln in lines if "broken.jpeg" in ln]
    assert len(broken) == 1 and ",," in broken[0]
    pngs = sorted(cams.glob("*.png"))
    assert len(pngs) == len(images)
    with Image.open(pngs[0]) as im:
        assert im.format == "PNG"
    for png in pngs:  # beside each overlay, the raw map it shows, at the model's input size
        heat = np.load(png.with_suffix(".npy"))
        assert heat.shape == (32, 32) and heat.dtype == np.float32 and heat.min() >= 0

    assert main(["predict", str(ckpt), str(images[0])]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[1] in CLASSES
    assert main(["predict", str(tmp_path / "nothing.pt"), str(images[0])]) == 2


# --- real data -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.realdata
def test_predict_real_images_with_a_corrupt_one_in_the_batch(kaggle_root, ckpt, predictor, tmp_path) -> None:
    real = real_test_images(kaggle_root)
    corrupt = tmp_path / "corrupt.jpeg"
    corrupt.write_bytes(real[0].read_bytes()[: len(real[0].read_bytes()) // 3])
    paths = [str(p) for p in real[:6]] + [str(corrupt)] + [str(p) for p in real[6:]]
    rows = Predictor(ckpt).predict_paths(paths, cam_dir=tmp_path / "cams")
    assert [r["path"] for r in rows] == paths
    assert [r["error"] is not None for r in rows] == [p == str(corrupt) for p in paths]
    arrays = np.stack([load_image(p, 32) for p in paths if p != str(corrupt)])
    got = np.array([[r["probs"][c] for c in CLASSES] for r in rows if not r["error"]])
    np.testing.assert_allclose(got, reference_probs(predictor, arrays), atol=1e-4)
    assert len(list((tmp_path / "cams").glob("*.png"))) == len(real)
    for r in rows:  # the .npy is the map the overlay shows, on the original file's pixels
        if r["error"] is None:
            heat = np.load(Path(r["cam"]).with_suffix(".npy"))
            want = overlay_png(load_image(r["path"], 32), heat / max(float(heat.max()), 1e-12),
                               original=r["path"])
            assert Path(r["cam"]).read_bytes() == want


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_predict_normalises_with_the_checkpoints_mean_and_std(tmp_path, backend) -> None:
    """A model trained with its weights' own normalisation (a timm model's 0.5/0.5, say) is fed
    that, not ImageNet's: the probabilities are the model's on the input so normalised."""
    torch.manual_seed(0)
    net = get_model("cnn2x32", num_classes=len(CLASSES), image_size=32).eval()
    save_checkpoint(tmp_path / "m.pt", net, model_name="cnn2x32",
                    model_kwargs={"num_classes": len(CLASSES), "image_size": 32}, classes=CLASSES,
                    image_size=32, resize="squash", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    pred = Predictor(tmp_path / "m.pt", backend=backend)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x = to_float(torch.from_numpy(images))
    with torch.no_grad():
        own = torch.softmax(net(normalize(x, (0.5,) * 3, (0.5,) * 3)), 1).numpy()
        imagenet = torch.softmax(net(normalize(x)), 1).numpy()
    assert np.allclose(pred.probs(images), own, atol=1e-4)
    assert not np.allclose(own, imagenet, atol=1e-3)  # the test can tell the two apart
