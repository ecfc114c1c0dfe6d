"""Predict with a trained model: files, folders or globs in, one row per image out (with TTA and Grad-CAM).

``Predictor`` loads a run folder or checkpoint once and preprocesses exactly like training: decode,
resize with the run's ``resize`` mode (``data.cache``), then ``to_float`` and ``normalize``. The
forward pass runs on the fastest backend measured by ``bench/infer_speed.py``: ONNX Runtime where it
is installed (the model is exported in memory, no file), PyTorch otherwise. Grad-CAM always uses the
PyTorch model, since it needs gradients; ``predict_paths(cam_dir=DIR)`` writes, per image, the
overlay (``<n>_<stem>_cam.png``) and the raw map beside it (``<n>_<stem>_cam.npy``: float32, the
model's input size, >= 0 and not rescaled, zero where the class has no positive evidence).
"""

from __future__ import annotations

import glob
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bloodcell.catalog import IMAGE_EXTENSIONS
from bloodcell.config import BACKENDS
from bloodcell.cpu import ort_options
from bloodcell.data.images import ImageError, decode_image, saved_image  # noqa: F401 - re-exported
from bloodcell.data.transforms import TTA_VIEWS, normalize, to_float, tta_view
from bloodcell.errors import BloodcellError
from bloodcell.inference.cam import GradCAM, npy_bytes, overlay_png, showcase
from bloodcell.inference.export import onnx_bytes
from bloodcell.inference.onnx import result_rows
from bloodcell.models.checkpoint import load_model
from bloodcell.runfiles import atomic_write, check_out_dir, read_csv
from bloodcell.runtime import physical_cores


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given, folders searched recursively for image files, globs expanded; in input order.

    A path that matches nothing is kept, so that it gets an error row of its own.
    """
    out: list[str] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*")
                           if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            out.extend(found or [s])
        elif p.exists():
            out.append(s)
        elif glob.has_magic(s):
            out.extend(sorted(glob.glob(s, recursive=True)) or [s])
        else:
            out.append(s)
    return out


def select_backend(backend: str, device: torch.device) -> str:
    """auto -> ONNX Runtime on the CPU (fastest measured), PyTorch on a GPU."""
    if backend not in BACKENDS:
        raise BloodcellError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "onnx" if device.type == "cpu" else "torch"


class Predictor:
    """A loaded model that predicts class probabilities for images (paths, bytes or uint8 arrays)."""

    has_cam = True

    def __init__(self, checkpoint: str | os.PathLike, device: str = "cpu", backend: str = "auto",
                 threads: int = 0):
        self.device = torch.device(device)
        self.threads = threads if threads > 0 else physical_cores()
        torch.set_num_threads(self.threads)
        self.model, self.meta = load_model(checkpoint, self.device)
        self.classes: list[str] = list(self.meta["classes"])
        self.image_size: int = int(self.meta["image_size"])
        self.resize: str = self.meta.get("resize", "squash")
        self.model_name: str = self.meta["model"]["name"]
        self.backend = select_backend(backend, self.device)
        self._run = self._make_runner()
        # One forward pass at a time: each already uses every core, and Grad-CAM toggles hooks.
        self.lock = threading.Lock()
        self._cam = None

    # -- backends -----------------------------------------------------------------------------

    def _make_runner(self):
        example = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
        if self.backend == "onnx":
            session = ort.InferenceSession(onnx_bytes(self.model, self.image_size), ort_options(self.threads),
                                           providers=["CPUExecutionProvider"])

            def run(x: torch.Tensor) -> torch.Tensor:
                return torch.from_numpy(session.run(None, {"input": x.contiguous().numpy()})[0])

            return run
        if self.backend == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.freeze(torch.jit.trace(self.model, example))
            return traced
        self.model.to(memory_format=torch.channels_last)  # faster oneDNN convolutions on the CPU
        return lambda x: self.model(x.contiguous(memory_format=torch.channels_last))

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a normalised float batch N x 3 x H x W."""
        return self._run(x.to(self.device)).float().cpu()

    # -- prediction ---------------------------------------------------------------------------

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 N x H x W x 3 -> the normalised float batch the model was trained on."""
        x = to_float(torch.from_numpy(np.require(images, np.uint8, ["C", "W"])))
        return normalize(x, self.meta["mean"], self.meta["std"]).contiguous()

    def probs(self, images: np.ndarray, tta: bool = False) -> np.ndarray:
        """Class probabilities N x C for uint8 images N x H x W x 3 (8-view TTA averages flips/rotations)."""
        x = self.preprocess(images)
        views = TTA_VIEWS if tta else 1
        batch = torch.cat([tta_view(x, k) for k in range(views)]) if views > 1 else x
        with self.lock:
            p = torch.softmax(self.logits(batch), 1)
        return p.view(views, len(x), -1).mean(0).numpy()

    def rows(self, images: np.ndarray, top_k: int = 1, tta: bool = False) -> list[dict]:
        """One result dict per image: class, probability, top-k and every class's probability."""
        return result_rows(self.probs(images, tta), self.classes, top_k)

    def predict_bytes(self, data: bytes, top_k: int = 1, tta: bool = False,
                      cam: bool = False) -> dict:
        """Predict one image given as file bytes; raises ImageError if it is not a readable image."""
        arr = decode_image(data, self.image_size, self.resize)
        row = self.rows(arr[None], top_k, tta)[0]
        if cam:
            row["cam_png"] = self.cam_png(arr, self.classes.index(row["class"]), source=data)
        return row

    def predict_paths(self, paths: list[str], top_k: int = 1, tta: bool = False,
                      batch_size: int = 64, cam_dir: str | os.PathLike | None = None) -> list[dict]:
        """One row per path, in order; a file that cannot be read gets a row with ``error`` set."""
        results: list[dict] = []
        if cam_dir is not None:
            check_out_dir(cam_dir, "--cam")
            Path(cam_dir).mkdir(parents=True, exist_ok=True)
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            arrays, ok, rows = [], [], []
            for p in chunk:
                try:
                    arrays.append(decode_image(p, self.image_size, self.resize))
                    ok.append(True)
                except ImageError as e:
                    ok.append(False)
                    rows.append({"path": p, "error": str(e)})
            preds = iter(self.rows(np.stack(arrays), top_k, tta) if arrays else [])
            err = iter(rows)
            for i, (p, good) in enumerate(zip(chunk, ok, strict=True)):
                row = {"path": p, **next(preds), "error": None} if good else next(err)
                if good and cam_dir is not None:
                    out = Path(cam_dir) / f"{start + i:05d}_{Path(p).stem}_cam.png"
                    arr = arrays[sum(ok[:i])]
                    heat = self.cam_heat(arr, self.classes.index(row["class"]))
                    atomic_write(out, self.cam_png(arr, heat=heat, source=p))
                    atomic_write(out.with_suffix(".npy"), npy_bytes(heat))
                    row["cam"] = str(out)
                results.append(row)
        return results

    # -- Grad-CAM -----------------------------------------------------------------------------

    def cam_heat(self, image: np.ndarray, target: int | None = None) -> np.ndarray:
        """The raw Grad-CAM map (H x W at the model's input size, >= 0) of one uint8 image for a
        class index (default: the predicted class), at the layer the model's head reads."""
        x = self.preprocess(image[None]).to(self.device)
        with self.lock:
            if self._cam is None:
                self._cam = GradCAM(self.model, x)
            return self._cam(x, target, normalize=False)[0]

    def cam_png(self, image: np.ndarray, target: int | None = None,
                source: str | os.PathLike | bytes | None = None, heat: np.ndarray | None = None) -> bytes:
        """A PNG of the Grad-CAM heat map over the image (over the original file where given)."""
        heat = self.cam_heat(image, target) if heat is None else heat
        return overlay_png(image, heat / max(float(heat.max()), 1e-12), original=source, resize=self.resize)

    def examples(self, split: str = "test", n_correct: int = 2, n_wrong: int = 2,
                 bases: tuple[Path, ...] = ()) -> tuple[list[dict], list[str]]:
        """A few right and wrong calls per class from the run folder's saved predictions_<split>.csv
        (``cam.showcase``), each row with ``image`` (the model's input) and ``heat`` (the raw map for
        the predicted class); returns them and the paths that could not be read. No file: nothing."""
        run = Path(self.meta["path"]).parent
        rows = read_csv(run / f"predictions_{split}.csv") or []
        out, missing = [], []
        for r in showcase(rows, n_correct, n_wrong):
            try:
                image = saved_image(r["path"], self.image_size, self.resize, (run, *bases))
            except ImageError:
                missing.append(r["path"])
                continue
            target = self.classes.index(r["pred"]) if r.get("pred") in self.classes else None
            out.append({**r, "image": image, "heat": self.cam_heat(image, target)})
        return out, missing
