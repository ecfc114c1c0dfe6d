"""export: ONNX and TorchScript files with metadata, dynamic batch size, outputs equal to PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_predict import CLASSES, make_checkpoint, png_bytes, real_test_images

from bloodcell.cli import main
from bloodcell.data.images import load_image
from bloodcell.data.transforms import normalize, to_float
from bloodcell.errors import BloodcellError
from bloodcell.inference.export import (
    FixedAdaptiveAvgPool2d,
    export_model,
    read_metadata,
    run_exported,
)
from bloodcell.inference.predict import decode_image
from bloodcell.models.checkpoint import load_model

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def preprocess(arrays: np.ndarray) -> np.ndarray:
    return normalize(to_float(torch.from_numpy(np.ascontiguousarray(arrays)))).numpy()


def reference(ckpt, x: np.ndarray) -> np.ndarray:
    model, _ = load_model(ckpt)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_stores_metadata_and_matches_pytorch(ckpt, tmp_path, fmt) -> None:
    out = tmp_path / FORMATS[fmt]
    summary = export_model(ckpt, fmt, out)
    assert out.is_file() and summary["max_abs_diff"] < 1e-4
    meta = read_metadata(out)
    assert meta["classes"] == CLASSES and meta["image_size"] == 32 and meta["resize"] == "squash"
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["model"] == "cnn4x32"
    # images decoded like training, at batch sizes other than the traced one (dynamic batch)
    images = np.stack([decode_image(png_bytes(i), 32) for i in range(9)])
    for n in (1, 3, 9):
        x = preprocess(images[:n])
        got = run_exported(out, x)
        assert got.shape == (n, len(CLASSES))
        np.testing.assert_allclose(got, reference(ckpt, x), atol=1e-4, rtol=0)


def test_onnx_export_at_64_px_keeps_the_plain_adaptive_pool(tmp_path) -> None:
    ckpt = make_checkpoint(tmp_path / "m64.pt", image_size=64)
    import onnx

    export_model(ckpt, "onnx", tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "MatMul" not in ops and "AveragePool" in ops  # 4 x 4 -> 4 x 4 needs no rewriting


def test_fixed_adaptive_pool_equals_pytorch() -> None:
    x = torch.randn(3, 5, 2, 3)
    pool = FixedAdaptiveAvgPool2d((2, 3), (4, 4))
    torch.testing.assert_close(pool(x), torch.nn.AdaptiveAvgPool2d(4)(x))
    x = torch.randn(2, 4, 7, 5)
    torch.testing.assert_close(FixedAdaptiveAvgPool2d((7, 5), (3, 2))(x), torch.nn.AdaptiveAvgPool2d((3, 2))(x))


def test_cli_export_and_bad_format(ckpt, tmp_path, capsys) -> None:
    assert main(["export", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    assert "max |difference| vs PyTorch" in capsys.readouterr().out
    with pytest.raises(BloodcellError, match="unknown export format"):
        export_model(ckpt, "tflite", tmp_path / "m.tflite")
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x.onnx")]) == 2


@pytest.mark.realdata
@pytest.mark.parametrize("fmt", FORMATS)
def test_export_parity_on_real_images(kaggle_root, tmp_path, fmt) -> None:
    ckpt = make_checkpoint(tmp_path / "m64.pt", image_size=64, seed=1)
    out = tmp_path / FORMATS[fmt]
    export_model(ckpt, fmt, out)
    x = preprocess(np.stack([load_image(str(p), 64) for p in real_test_images(kaggle_root, 4)]))
    np.testing.assert_allclose(run_exported(out, x), reference(ckpt, x), atol=1e-4, rtol=0)


def calibration_run(run):
    """A run folder: a checkpoint and a predictions_val.csv of synthetic cells (regenerated on read)."""
    from bloodcell.runfiles import write_csv

    run.mkdir(parents=True)
    make_checkpoint(run / "best.pt")
    write_csv(run / "predictions_val.csv", [{"path": f"synthetic://0/{k}", "label": CLASSES[k % 4],
                                             "pred": CLASSES[k % 4], "confidence": 0.5} for k in range(64)])
    return run


def test_int8_export_is_smaller_keeps_metadata_and_agrees_with_pytorch(tmp_path) -> None:
    from bloodcell.inference.onnx import OnnxPredictor

    run = calibration_run(tmp_path / "run")
    fp32 = export_model(run / "best.pt", "onnx", tmp_path / "fp32.onnx")
    s = export_model(run / "best.pt", "onnx", tmp_path / "int8.onnx", quantize="int8")
    assert s["quantize"] == "int8" and s["agreement"] >= 0.95 and s["bytes"] < 0.6 * fp32["bytes"]
    meta = read_metadata(tmp_path / "int8.onnx")
    assert meta["quantize"] == "int8" and meta["classes"] == CLASSES and meta["image_size"] == 32
    onnx_model = __import__("onnx").load(str(tmp_path / "int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in onnx_model.graph.node)  # really 8-bit inside
    p = OnnxPredictor(tmp_path / "int8.onnx")
    images = np.stack([decode_image(png_bytes(i), 32) for i in range(4)])
    assert p.probs(images).shape == (4, len(CLASSES))


def test_int8_needs_onnx_and_validation_images(tmp_path, ckpt) -> None:
    with pytest.raises(BloodcellError, match="needs --format onnx"):
        export_model(ckpt, "torchscript", tmp_path / "m.pt", quantize="int8")
    with pytest.raises(BloodcellError, match="predictions_val.csv"):
        export_model(ckpt, "onnx", tmp_path / "m.onnx", quantize="int8")
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(BloodcellError, match="unknown quantisation"):
        export_model(ckpt, "onnx", tmp_path / "m.onnx", quantize="int4")


def test_export_metadata_carries_the_checkpoints_normalisation(tmp_path) -> None:
    from bloodcell.models import get_model
    from bloodcell.models.checkpoint import save_checkpoint

    net = get_model("cnn2x32", num_classes=len(CLASSES), image_size=32)
    save_checkpoint(tmp_path / "m.pt", net, model_name="cnn2x32",
                    model_kwargs={"num_classes": len(CLASSES), "image_size": 32}, classes=CLASSES,
                    image_size=32, resize="squash", mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 0.5))
    export_model(tmp_path / "m.pt", "onnx", tmp_path / "m.onnx")
    meta = read_metadata(tmp_path / "m.onnx")
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.25, 0.5, 0.5]
