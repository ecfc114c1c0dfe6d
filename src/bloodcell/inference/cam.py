"""Grad-CAM (Selvaraju et al. 2017) at the feature map a model's head reads, and the overlay PNG.

Where: the output of the model's last feature block, after its nonlinearity, which is what the
classifier head pools and reads (``target_layer``): ``features`` for the study's four and for
EfficientNet-B0 and MobileNetV3-Small, ``layer4`` for ResNet-18, under ``net.`` behind a stain
normalisation. It is found, not configured: the last module to return a spatial map (larger than
1 x 1) other than an adaptive pool, which is where every registered model's head begins
(``tests/test_cam.py`` checks the layer of each). Before, the map was taken at the raw output
of the last ``nn.Conv2d``, before its max-pool, batch norm and activation (and, in ResNet-18,
before the residual sum). Measured on the Kaggle TEST cells each trained model got right, those
maps were empty for up to 25 % of them; at the head's map none is, and for six of the seven
registered models 81-100 % peak on the stained cell (51-97 % before). MobileNetV3-Small peaks on
the cell for 59 % (before: the same), for 14 % of its right lymphocytes: it calls them from the
background, with Grad-CAM++ or one block earlier too.
bench/RESULTS.md, "Grad-CAM at the layer the head reads".

How: captum's ``LayerGradCam`` (PyTorch's own interpretability library), chosen over
pytorch-grad-cam (``grad-cam``) and over our own hook code by measurement (``bench/cam_libraries.py``):
at the same layer captum's maps equal ours exactly (difference 0 on every registered model tried)
and take the same time given the class (one forward and one backward pass; without one, a no-grad
forward finds the predicted class first), and captum is a 4 MB pure-Python install whose
dependencies bloodcell already has. ``grad-cam`` adds about 150 MB (OpenCV, and SciPy and
scikit-learn at run time), takes about 6 s to import, is 1.5-3x slower per map here, and rescales
each map by its own minimum, so a map positive everywhere is stretched (up to 0.77 from ours on
a [0, 1] scale; equal to 1e-6 after the same shift). A second method is not offered: at this layer no
Grad-CAM map of a right call is empty, and Grad-CAM++ (``bench/cam_methods.py``) moves the share of
peaks on the cell by -8 to +8 points depending on the model.
captum is imported on first use: its import costs about a second that ``predict`` and ``serve``
need not pay when no map is asked for.
"""

from __future__ import annotations

import copy
import io
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from bloodcell.data.images import to_rgb
from bloodcell.models.gate import BRANCHES, ColourGate

HEAD_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def spatial_outputs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, int]]]:
    """(name, output H x W) of every module that returns a 4-D map for input x, in the order they finish."""
    seen: list[tuple[str, tuple[int, int]]] = []

    def record(name: str):
        def hook(_m, _i, out):
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                seen.append((name, tuple(out.shape[2:])))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return seen


def target_layer(model: nn.Module, x: torch.Tensor) -> tuple[str, nn.Module]:
    """(name, module) of the feature map the head reads: the last module to return a map larger
    than 1 x 1, adaptive pools aside (a container finishes after its last child, so it wins). On an
    input so small that the last block's map is 1 x 1 (EfficientNet-B0 at 32 px), which cannot
    show where, it is the last map that still has a spatial extent."""
    modules = dict(model.named_modules())
    found = [n for n, hw in spatial_outputs(model, x)
             if hw != (1, 1) and not isinstance(modules[n], HEAD_POOLS)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no layer with a spatial output")
    return found[-1], modules[found[-1]]


def _without_inplace(model: nn.Module) -> nn.Module:
    # In-place activations overwrite the saved feature map that Grad-CAM reads; use a copy without them.
    if not any(getattr(m, "inplace", False) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for m in model.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    return model


class GradCAM:
    """Grad-CAM for one model, at ``layer`` (a module name; default ``target_layer``), found once."""

    def __init__(self, model: nn.Module, example: torch.Tensor, layer: str | None = None):
        from captum.attr import LayerGradCam  # imported here: captum's import would slow start-up

        self.gate = model.eval() if isinstance(model, ColourGate) and layer is None else None
        if self.gate is not None:  # each image's map is taken in the branch that reads it
            self.parts = {b: GradCAM(getattr(model, b), example) for b in BRANCHES}
            self.layer_name = ", ".join(f"{b}.{part.layer_name}" for b, part in self.parts.items())
            return
        self.model = _without_inplace(model).eval()
        if layer is None:
            self.layer_name, self.layer = target_layer(self.model, example)
        else:
            self.layer_name, self.layer = layer, dict(self.model.named_modules())[layer]
        self._cam = LayerGradCam(self.model, self.layer)

    def __call__(self, x: torch.Tensor, target: int | list[int] | None = None,
                 normalize: bool = True) -> np.ndarray:
        """Heat maps N x H x W (input size) for a normalised batch x, each scaled to [0, 1] by its
        maximum unless ``normalize=False`` (the raw map, >= 0); target class default: predicted."""
        x = x.detach()
        if self.gate is not None:
            with torch.no_grad():
                use = self.gate.routes(x)
            targets = None if target is None else torch.as_tensor(target).reshape(-1).expand(len(x))
            heat = np.zeros((len(x), *x.shape[2:]), np.float32)
            for branch, rows in zip(BRANCHES, (use, ~use), strict=True):
                if rows.any():
                    part = None if targets is None else targets[rows.cpu()].tolist()
                    heat[rows.cpu().numpy()] = self.parts[branch](x[rows], part, normalize)
            return heat
        if target is None:
            with torch.no_grad():
                idx = self.model(x).argmax(1)
        else:
            idx = torch.as_tensor(target, device=x.device).reshape(-1).expand(len(x))
        with torch.enable_grad():
            cam = self._cam.attribute(x, target=idx, relu_attributions=True)
        cam = F.interpolate(cam.float(), size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
        cam = cam.clamp_min(0)  # bilinear interpolation of values >= 0 stays >= 0; rounding aside
        if normalize:
            cam = cam / cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
        return cam.detach().cpu().numpy()


def grad_cam(model: nn.Module, x: torch.Tensor, target: int | list[int] | None = None) -> np.ndarray:
    """Heat maps N x H x W in [0, 1] for a normalised batch x; target class (default: predicted)."""
    return GradCAM(model, x)(x, target)


# --- what a map shows -------------------------------------------------------------------------


def has_mass(heat: np.ndarray) -> bool:
    """True when the map has a positive pixel (an all-zero map overlays nothing)."""
    return bool(np.asarray(heat).max() > 0)


def peak(heat: np.ndarray) -> tuple[float, float]:
    """(row, column) of the map's maximum as fractions of the frame, pixel centres (0.5 / H ...)."""
    h, w = heat.shape
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return (r + 0.5) / h, (c + 0.5) / w


def central_peak(heat: np.ndarray) -> bool:
    """True when the map has mass and its peak lies in the central half of the frame (the middle
    half of each side: where the ``cell`` crop puts the stained cell)."""
    return has_mass(heat) and all(0.25 <= v < 0.75 for v in peak(heat))


def npy_bytes(heat: np.ndarray) -> bytes:
    """The heat map as the bytes of a .npy file (float32), for ``atomic_write``."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(heat, dtype=np.float32))
    return buf.getvalue()


def showcase(rows: list[dict], n_correct: int = 2, n_wrong: int = 2) -> list[dict]:
    """From prediction rows (path, label, pred, confidence), per true class in order of first
    appearance: n_correct right calls spread over their confidence (the surest first, the least sure
    last; the surest alone are often copies of one cell), then its n_wrong most confident errors."""
    out: list[dict] = []
    for label in dict.fromkeys(r.get("label") for r in rows):
        mine = sorted((r for r in rows if r.get("label") == label),
                      key=lambda r: -float(r.get("confidence") or 0.0))
        right = [r for r in mine if r.get("pred") == label]
        pick = sorted({round(k) for k in np.linspace(0, len(right) - 1, min(n_correct, len(right)))})
        out += [right[k] for k in pick]
        out += [r for r in mine if r.get("pred") != label][:n_wrong]
    return out


# --- the picture --------------------------------------------------------------------------------


def colormap(heat: np.ndarray) -> np.ndarray:
    """A jet-like colour map: heat H x W in [0, 1] -> uint8 H x W x 3 (blue, cyan, yellow, red)."""
    h = np.clip(heat, 0, 1)[..., None]
    rgb = np.concatenate([np.clip(1.5 - np.abs(4 * h - 3), 0, 1),
                          np.clip(1.5 - np.abs(4 * h - 2), 0, 1),
                          np.clip(1.5 - np.abs(4 * h - 1), 0, 1)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend the colour-mapped heat map over an RGB uint8 image of any size."""
    h, w = image.shape[:2]
    if heat.shape != (h, w):
        heat = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                          dtype=np.float32) / 255
    a = alpha * (0.3 + 0.7 * heat[..., None])  # cold regions stay close to the image
    return (image * (1 - a) + colormap(heat) * a).round().astype(np.uint8)


def upscale(image: np.ndarray, side: int) -> np.ndarray:
    """An RGB uint8 image resized (bilinear) to side x side px."""
    return np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR), dtype=np.uint8)


def png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def overlay_png(image: np.ndarray, heat: np.ndarray, original: str | os.PathLike | bytes | None = None,
                resize: str = "squash", max_side: int = 320) -> bytes:
    """PNG bytes of the overlay: on the original file's pixels for 'squash', else on the model input."""
    base = image
    if original is not None and resize == "squash":
        try:
            src = io.BytesIO(original) if isinstance(original, bytes | bytearray) else original
            with Image.open(src) as im:
                im = to_rgb(im)
                s = min(1.0, max_side / max(im.size))
                im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BILINEAR)
                base = np.asarray(im, dtype=np.uint8)
        except Exception:  # noqa: BLE001 - the model input is a fine fallback
            base = image
    if base is image and image.shape[0] < max_side:
        base = upscale(image, image.shape[0] * max(1, max_side // image.shape[0]))
    return png(overlay(base, heat))
