"""Export a trained model to ONNX or TorchScript, with what a user needs stored in the file.

Both formats take a normalised float batch ``input`` N x 3 x S x S (any N) and return ``logits``
N x C. The metadata (ONNX ``metadata_props``; TorchScript extra file ``bloodcell.json``) holds the
class names, image size, resize mode, normalisation mean/std and model name as JSON values, so a
consumer needs nothing else. Every export is checked against PyTorch before it is reported done.

``quantize="int8"`` (ONNX only) writes weights and activations as 8-bit integers (ONNX Runtime's
static QDQ quantisation, per-channel weights), calibrated on up to CALIBRATION_IMAGES images of the
run's validation split (its predictions_val.csv; never the test split); the check is then the top-1
agreement with PyTorch on those images, which must reach MIN_INT8_AGREEMENT.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from bloodcell import __version__
from bloodcell.config import EXPORT_FORMATS
from bloodcell.data.images import ImageError, saved_image
from bloodcell.errors import BloodcellError
from bloodcell.inference.onnx import _value
from bloodcell.models.checkpoint import load_model
from bloodcell.models.onnx import OPSET, FixedAdaptiveAvgPool2d, exportable, onnx_graph  # noqa: F401 - re-exported
from bloodcell.runfiles import atomic_write, check_out_file

META_FILE = "bloodcell.json"
CALIBRATION_IMAGES = 256
MIN_INT8_AGREEMENT = 0.95
QUANTIZE = ("none", "int8")


def metadata(meta: dict) -> dict:
    """The facts stored in an exported file (from a checkpoint's meta)."""
    return {"classes": list(meta["classes"]), "image_size": int(meta["image_size"]),
            "resize": meta.get("resize", "squash"), "mean": list(meta["mean"]), "std": list(meta["std"]),
            "model": meta["model"]["name"], "input": "input: float32 N x 3 x S x S, normalised RGB",
            "output": "logits: float32 N x C (softmax gives probabilities)",
            "parameters": meta.get("parameters"), "quantize": meta.get("quantize", "none"),
            "bloodcell_version": __version__}


def onnx_bytes(model: torch.nn.Module, image_size: int, meta: dict | None = None) -> bytes:
    """The model as an ONNX file in memory (dynamic batch size), with metadata if given."""
    data = onnx_graph(model, image_size)
    if not meta:
        return data
    proto = onnx.load_from_string(data)
    for k, v in metadata(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, json.dumps(v)
    return proto.SerializeToString()


def torchscript_module(model: torch.nn.Module, image_size: int) -> torch.jit.ScriptModule:
    """The model traced to TorchScript (these CNNs have no data-dependent control flow)."""
    model = model.cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(model, torch.zeros(2, 3, image_size, image_size))


def _format_of(path: Path, fmt: str | None) -> str:
    return fmt or ("onnx" if path.suffix.lower() == ".onnx" else "torchscript")


def read_metadata(path: str | os.PathLike, fmt: str | None = None) -> dict:
    """The bloodcell metadata of an exported file (format from the suffix unless given)."""
    path = Path(path)
    if _format_of(path, fmt) == "onnx":
        proto = onnx.load(str(path), load_external_data=False)
        return {p.key: _value(p.value) for p in proto.metadata_props}
    files = {META_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return json.loads(files[META_FILE])


def run_exported(path: str | os.PathLike, x: np.ndarray, fmt: str | None = None) -> np.ndarray:
    """Logits of an exported file for a normalised float32 batch (ONNX Runtime or TorchScript)."""
    path = Path(path)
    if _format_of(path, fmt) == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"input": np.ascontiguousarray(x, np.float32)})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()


def calibration_images(meta: dict, n: int = CALIBRATION_IMAGES) -> np.ndarray:
    """Up to ``n`` validation images of the checkpoint's run folder (predictions_val.csv), decoded
    as training decodes them; uint8 N x S x S x 3. No such file, or none readable: an error."""
    from bloodcell.runfiles import read_csv

    run = Path(meta["path"]).parent
    rows = read_csv(run / "predictions_val.csv") or []
    step = max(1, len(rows) // n)  # spread over the classes (the file is in class order)
    images = []
    for r in rows[::step][:n]:
        try:
            images.append(saved_image(r["path"], int(meta["image_size"]), meta.get("resize", "squash"), (run,)))
        except ImageError:
            continue
    if not images:
        raise BloodcellError(f"--quantize int8 calibrates on the run's validation images, and {run} "
                             "has no readable predictions_val.csv images")
    return np.stack(images)


def quantize_int8(fp32: bytes, calib: np.ndarray) -> bytes:
    """A static int8 (QDQ, per-channel weights) copy of an ONNX model, calibrated on ``calib``
    (normalised float32 N x 3 x S x S); the metadata is kept."""
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calib[i:i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.batches, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser's notes ("Axis 1 is out-of-range...") go to the root logger
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = (Path(tmp) / f for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        proto = onnx.load(str(dst))
    root.setLevel(level)
    have = {p.key for p in proto.metadata_props}
    for p in onnx.load_from_string(fp32).metadata_props:
        if p.key not in have:
            proto.metadata_props.add(key=p.key, value=p.value)
    return proto.SerializeToString()


def export_model(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike,
                 check: bool = True, quantize: str = "none") -> dict:
    """Write the model of a run folder/checkpoint as ONNX or TorchScript; returns a summary.

    With ``check``, random batches of two sizes go through the file and through PyTorch and the
    largest absolute difference of the logits must stay below 1e-4.
    """
    if fmt not in EXPORT_FORMATS:
        raise BloodcellError(f"unknown export format {fmt!r}; known: {', '.join(EXPORT_FORMATS)}")
    if quantize not in QUANTIZE:
        raise BloodcellError(f"unknown quantisation {quantize!r}; known: {', '.join(QUANTIZE)}")
    if quantize != "none" and fmt != "onnx":
        raise BloodcellError("--quantize int8 needs --format onnx (ONNX Runtime's quantisation)")
    out = check_out_file(out)
    model, meta = load_model(checkpoint)
    meta = {**meta, "parameters": sum(p.numel() for p in model.parameters())}
    size = int(meta["image_size"])
    out.parent.mkdir(parents=True, exist_ok=True)
    calib = None
    if quantize == "int8":
        from bloodcell.data.transforms import normalize, to_float

        calib = normalize(to_float(torch.from_numpy(calibration_images(meta))), meta["mean"], meta["std"]).contiguous()
        meta = {**meta, "quantize": "int8"}
    if fmt == "onnx":
        data = onnx_bytes(model, size, meta)
        atomic_write(out, data if calib is None else quantize_int8(data, calib.numpy()))
    else:
        module = torchscript_module(model, size)
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(module, buf, _extra_files={META_FILE: json.dumps(metadata(meta))})
        atomic_write(out, buf.getvalue())
    summary = {"path": str(out), "format": fmt, "bytes": out.stat().st_size, "max_abs_diff": None,
               "metadata": metadata(meta), "quantize": quantize, "agreement": None}
    if check and calib is not None:
        with torch.no_grad():
            ref = model(calib).argmax(1).numpy()
        agree = float((run_exported(out, calib.numpy()).argmax(1) == ref).mean())
        summary["agreement"] = agree
        if agree < MIN_INT8_AGREEMENT:
            raise BloodcellError(f"the int8 model agrees with PyTorch on {100 * agree:.1f} % of "
                                 f"{len(calib)} validation images (< {100 * MIN_INT8_AGREEMENT:.0f} %)")
    elif check:
        g = torch.Generator().manual_seed(0)
        diff = 0.0
        for n in (1, 5):
            x = torch.randn(n, 3, size, size, generator=g)
            with torch.no_grad():
                ref = model(x).numpy()
            diff = max(diff, float(np.abs(run_exported(out, x.numpy(), fmt) - ref).max()))
        summary["max_abs_diff"] = diff
        if not diff < 1e-4:
            raise BloodcellError(f"exported {fmt} model differs from PyTorch by {diff:.2e} (> 1e-4)")
    return summary
