"""Predict with an exported ``.onnx`` file alone: ONNX Runtime and numpy, no torch.

``OnnxPredictor`` reads what it needs from the file's metadata (``export.metadata``: classes, image
size, resize mode, normalisation) and preprocesses exactly as ``predict.Predictor`` does (decode and
resize with ``data.images``, scale to [0, 1], normalise, NCHW), so the two give the same
probabilities. It is what ``bloodcell serve model.onnx`` runs: a process that never imports torch
idles at a fraction of the memory (bench/RESULTS.md). Grad-CAM needs the PyTorch model and its
gradients, so it is not offered here (``has_cam`` is False); serve the run folder for it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bloodcell.cpu import ort_options, physical_cores
from bloodcell.errors import BloodcellError

TTA_VIEWS = 8  # as data.transforms.TTA_VIEWS: the flips and transpositions of the square
REQUIRED = ("classes", "image_size", "mean", "std")


def tta_view(x: np.ndarray, k: int) -> np.ndarray:
    """The k-th (0-7) of the 8 flips/transpositions of N x C x H x W, as ``transforms.tta_view``."""
    if k & 1:
        x = x[..., ::-1]
    if k & 2:
        x = x[:, :, ::-1, :]
    if k & 4:
        x = x.transpose(0, 1, 3, 2)
    return x


def _value(text: str):
    """A metadata value: bloodcell writes JSON; other tools (the quantiser) plain strings."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class OnnxPredictor:
    """An exported ONNX model that predicts class probabilities for uint8 images N x H x W x 3."""

    backend = "onnx"
    has_cam = False
    model = None  # no PyTorch model: the serve page and /model say so

    def __init__(self, path: str | os.PathLike, threads: int = 0):
        path = Path(path)
        if not path.is_file():
            raise BloodcellError(f"no ONNX file at {path}")
        self.threads = threads if threads > 0 else physical_cores()
        try:
            self.session = ort.InferenceSession(str(path), ort_options(self.threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own types for every bad file
            raise BloodcellError(f"{path.name} is not a usable ONNX model: "
                                 f"{str(e).splitlines()[0][:200]}") from None
        props = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in REQUIRED if k not in props]
        if missing:
            raise BloodcellError(f"{path.name} has no bloodcell metadata ({', '.join(missing)}); "
                                 "export it with `bloodcell export RUN --format onnx`")
        meta = {k: _value(v) for k, v in props.items()}
        self.meta = {**meta, "path": str(path)}
        self.classes: list[str] = list(meta["classes"])
        self.image_size: int = int(meta["image_size"])
        self.resize: str = meta.get("resize", "squash")
        self.model_name: str = meta.get("model", path.stem)
        self.parameters: int | None = meta.get("parameters")
        self.input_name = self.session.get_inputs()[0].name
        std = np.asarray(meta["std"], np.float32)
        # (x / 255 - mean) / std as one multiply-add per pixel
        self._scale = (1.0 / (255.0 * std)).reshape(1, 1, 1, 3)
        self._shift = (-np.asarray(meta["mean"], np.float32) / std).reshape(1, 1, 1, 3)
        self.lock = threading.Lock()

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x 3 -> the normalised float32 N x 3 x H x W batch the model was trained on."""
        x = images.astype(np.float32) * self._scale + self._shift
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits N x C for a normalised float32 batch N x 3 x H x W."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})[0]

    def probs(self, images: np.ndarray, tta: bool = False) -> np.ndarray:
        """Class probabilities N x C (8-view TTA averages the flips and rotations)."""
        x = self.preprocess(images)
        views = TTA_VIEWS if tta else 1
        batch = np.concatenate([tta_view(x, k) for k in range(views)]) if views > 1 else x
        with self.lock:
            z = self.logits(batch).astype(np.float64)
        z = np.exp(z - z.max(1, keepdims=True))
        p = z / z.sum(1, keepdims=True)
        return p.reshape(views, len(x), -1).mean(0)

    def rows(self, images: np.ndarray, top_k: int = 1, tta: bool = False) -> list[dict]:
        """One result dict per image: class, probability, top-k and every class's probability."""
        return result_rows(self.probs(images, tta), self.classes, top_k)


def result_rows(probs: np.ndarray, classes: list[str], top_k: int = 1) -> list[dict]:
    """Rows of class probabilities N x C as ``predict`` and ``serve`` report them."""
    k = max(1, min(top_k, len(classes)))
    out = []
    # plain Python on a few floats: numpy's argsort per row cost the server's event loop more
    for p in np.asarray(probs, np.float64).tolist():
        order = sorted(range(len(p)), key=lambda i, p=p: -p[i])[:k]  # stable: ties keep class order
        out.append({"class": classes[order[0]], "probability": p[order[0]],
                    "top_k": [{"class": classes[i], "probability": p[i]} for i in order],
                    "probs": dict(zip(classes, p, strict=True))})
    return out
