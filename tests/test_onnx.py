"""inference.onnx: an exported file predicts what the checkpoint predicts, TTA too, without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_predict import CLASSES, make_checkpoint, png_bytes

from bloodcell.data.images import decode_image
from bloodcell.errors import BloodcellError
from bloodcell.inference.export import export_model
from bloodcell.inference.onnx import OnnxPredictor
from bloodcell.inference.predict import Predictor

SRC = Path(__file__).parents[1] / "src"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    ckpt = make_checkpoint(d / "tiny.pt")
    export_model(ckpt, "onnx", d / "tiny.onnx")
    return ckpt, d / "tiny.onnx"


def test_same_probabilities_as_the_checkpoint_with_and_without_tta(files) -> None:
    ckpt, path = files
    lean, full = OnnxPredictor(path), Predictor(ckpt, backend="torch")
    assert lean.classes == CLASSES and lean.image_size == 32 and lean.resize == "squash"
    assert lean.parameters == sum(p.numel() for p in full.model.parameters())
    images = np.stack([decode_image(png_bytes(i), 32) for i in range(6)])
    for tta in (False, True):
        np.testing.assert_allclose(lean.probs(images, tta), full.probs(images, tta), atol=2e-5, rtol=0)
    rows = lean.rows(images, top_k=2)
    assert [r["class"] for r in rows] == [r["class"] for r in full.rows(images)]
    assert all(len(r["top_k"]) == 2 and sum(r["probs"].values()) == pytest.approx(1) for r in rows)
    # TTA averages 8 different views: for an untrained net it changes the answer a little
    assert not np.allclose(lean.probs(images, True), lean.probs(images, False), atol=1e-6)


def test_a_file_without_metadata_or_not_onnx_is_one_clear_error(files, tmp_path) -> None:
    _, path = files
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(BloodcellError, match="no bloodcell metadata.*bloodcell export"):
        OnnxPredictor(bare)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(BloodcellError, match="not a usable ONNX model"):
        OnnxPredictor(junk)
    with pytest.raises(BloodcellError, match="no ONNX file"):
        OnnxPredictor(tmp_path / "missing.onnx")


def test_predicting_loads_no_torch(files) -> None:
    _, path = files
    code = f"""
import sys, json
from bloodcell.inference.onnx import OnnxPredictor
from bloodcell.data.images import decode_image
p = OnnxPredictor({str(path)!r})
import io
from PIL import Image
buf = io.BytesIO(); Image.new("RGB", (40, 30), (200, 100, 150)).save(buf, "PNG")
row = p.rows(decode_image(buf.getvalue(), p.image_size)[None])[0]
print(json.dumps({{"torch": "torch" in sys.modules, "class": row["class"]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, timeout=60)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"torch": False, "class": got["class"]} and got["class"] in CLASSES
