"""Grad-CAM (Selvaraju et al. 2017) at a model's last convolution, and a heat-map overlay PNG.

The layer is found, not configured: the last ``nn.Conv2d`` in module order whose output is still a
map (squeeze-excitation convolutions act on 1 x 1 inputs and are skipped), which is the last
feature convolution of every registered model.
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


def conv_layers(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Conv2d]]:
    """The convolutions that produce a spatial map (> 1 x 1) for input x, in module order."""
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: sizes.__setitem__(n, tuple(o.shape[2:])))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and sizes.get(n, (1, 1)) != (1, 1)]


def last_conv(model: nn.Module, x: torch.Tensor) -> tuple[str, nn.Conv2d]:
    """(name, module) of the last convolution with a spatial output."""
    convs = conv_layers(model, x)
    if not convs:
        raise ValueError(f"{type(model).__name__} has no convolution with a spatial output")
    return convs[-1]


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
    """Grad-CAM for one model, its layer found once from an example input."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        self.model = _without_inplace(model).eval()
        self.layer_name, self.layer = last_conv(self.model, example)

    def __call__(self, x: torch.Tensor, target: int | list[int] | None = None) -> np.ndarray:
        """Heat maps N x H x W in [0, 1] for a normalised batch x; target class (default: predicted)."""
        saved: dict[str, torch.Tensor] = {}
        hook = self.layer.register_forward_hook(lambda _m, _i, o: saved.__setitem__("act", o))
        try:
            with torch.enable_grad():
                logits = self.model(x.detach())
                act = saved["act"]
                if target is None:
                    idx = logits.argmax(1)
                else:
                    idx = torch.as_tensor(target, device=logits.device).reshape(-1).expand(len(x))
                score = logits.gather(1, idx.view(-1, 1)).sum()
                (grad,) = torch.autograd.grad(score, act)
        finally:
            hook.remove()
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * act).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
        hi = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
        return (cam / hi).detach().cpu().numpy()


def grad_cam(model: nn.Module, x: torch.Tensor, target: int | list[int] | None = None) -> np.ndarray:
    """Heat maps N x H x W in [0, 1] for a normalised batch x; target class (default: predicted)."""
    return GradCAM(model, x)(x, target)


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
        k = max(1, max_side // image.shape[0])
        base = np.asarray(Image.fromarray(image).resize((image.shape[1] * k, image.shape[0] * k),
                                                        Image.BILINEAR), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(overlay(base, heat)).save(buf, format="PNG")
    return buf.getvalue()
