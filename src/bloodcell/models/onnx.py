"""A model as an ONNX graph in memory, for ONNX Runtime: what ``export`` writes to a file (with its
metadata, inference.export) and what scoring on a CPU runs (training.engine.predict_probs).

``exportable(model, size)`` is the model, or a copy whose adaptive pools ONNX cannot express are
matrices; ``onnx_graph(model, size)`` the ONNX file's bytes (dynamic batch size).
"""

from __future__ import annotations

import copy
import io
import warnings

import torch

OPSET = 17


class FixedAdaptiveAvgPool2d(torch.nn.Module):
    """AdaptiveAvgPool2d for one known input size, as two matrix products (exact, and exportable).

    ONNX has no adaptive pooling whose output size does not divide the input size (a 2 x 2 map
    pooled to 4 x 4, as the study models do at 32 px); the same averages as matrices export fine.
    """

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]):
        super().__init__()
        self.register_buffer("ph", self.matrix(in_hw[0], out_hw[0]))
        self.register_buffer("pw", self.matrix(in_hw[1], out_hw[1]))

    @staticmethod
    def matrix(n_in: int, n_out: int) -> torch.Tensor:
        """Row i averages inputs floor(i * n_in / n_out) .. ceil((i + 1) * n_in / n_out) - 1."""
        m = torch.zeros(n_out, n_in)
        for i in range(n_out):
            a, b = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
            m[i, a:b] = 1.0 / (b - a)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ph @ x @ self.pw.t()


def exportable(model: torch.nn.Module, image_size: int) -> torch.nn.Module:
    """The model, or a copy whose adaptive pools that ONNX cannot express are written as matrices."""
    shapes: dict[str, tuple] = {}
    pools = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.AdaptiveAvgPool2d)}
    hooks = [m.register_forward_hook(lambda _m, i, o, n=n: shapes.__setitem__(n, (i[0].shape[2:], o.shape[2:])))
             for n, m in pools.items()]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()
    bad = {n: s for n, s in shapes.items() if any(a % b for a, b in zip(*s, strict=True))}
    if not bad:
        return model
    model = copy.deepcopy(model)
    for name, (in_hw, out_hw) in bad.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, FixedAdaptiveAvgPool2d(tuple(in_hw), tuple(out_hw)))
    return model


def onnx_graph(model: torch.nn.Module, image_size: int) -> bytes:
    """The model (on the CPU, in eval mode) as an ONNX file in memory: ``input`` N x 3 x S x S,
    ``logits`` N x C, any N."""
    model = exportable(model.cpu().eval(), image_size)
    example = torch.zeros(2, 3, image_size, image_size)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter (dynamo=False) needs no onnxscript and handles these CNNs.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return buf.getvalue()
