"""Model registry: ``@register_model`` fills one dict, ``get_model(name, ...)`` builds from it.

The registered architectures live in ``study`` (the study's four) and ``baselines`` (torchvision's);
``bloodcell.models`` imports both, so the registry is full whichever module is imported first.
Also here: the ``StainNorm`` input layer, the ``norm`` choice's layers, ``load_weights``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bloodcell.catalog import MEAN, STD
from bloodcell.config import CHOICES
from bloodcell.errors import BloodcellError
from bloodcell.models import pretrained as pre
from bloodcell.runfiles import shown

Builder = Callable[..., nn.Module]

_MODELS: dict[str, Builder] = {}
_INFO: dict[str, dict] = {}


def register_model(
    fn: Builder | None = None, *, family: str = "other", min_image_size: int = 32
) -> Builder | Callable[[Builder], Builder]:
    """Register a builder ``fn(num_classes, image_size, **kwargs)`` under its function name."""

    def add(builder: Builder) -> Builder:
        name = builder.__name__
        if name in _MODELS:
            raise ValueError(f"model '{name}' is already registered")
        doc = (builder.__doc__ or "").strip().splitlines()
        _MODELS[name] = builder
        _INFO[name] = {
            "name": name,
            "description": doc[0] if doc else "",
            "min_image_size": min_image_size,
            "family": family,
            "options": tuple(
                k for k in inspect.signature(builder).parameters if k not in ("num_classes", "image_size")
            ),
        }
        return builder

    return add(fn) if fn is not None else add


STAIN_NORMS = CHOICES["stain_norm"]


# Reinhard et al. 2001, "Color transfer between images": RGB -> LMS cone space -> log10 -> the
# decorrelated l-alpha-beta space of Ruderman et al. 1998, and back.
RGB_TO_LMS = torch.tensor([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
LOG_LMS_TO_LAB = torch.diag(torch.tensor([3 ** -0.5, 6 ** -0.5, 2 ** -0.5])) @ torch.tensor(
    [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]])
LAB_TO_LOG_LMS = torch.linalg.inv(LOG_LMS_TO_LAB)
LMS_TO_RGB = torch.linalg.inv(RGB_TO_LMS)
# The reference each image is given: the mean of each image's l-alpha-beta mean and spread over the
# 181 white cells of Raabin-WBC's train fields (smears/raabin, cropped as count crops them, 64 px):
# a lab outside the four that leave-one-lab-out measures, so no held-out lab sets it.
LAB_REFERENCE_MEAN = (-0.4405, -0.0069, 0.0181)
LAB_REFERENCE_STD = (0.2124, 0.0674, 0.0149)


def lab_channels(rgb: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """N x 3 x H x W RGB in [0, 1] -> its l-alpha-beta channels (Ruderman et al.), N x 3 x H x W."""
    lms = torch.einsum("ij,njhw->nihw", RGB_TO_LMS.to(rgb), rgb).clamp_min(eps).log10()
    return torch.einsum("ij,njhw->nihw", LOG_LMS_TO_LAB.to(rgb), lms)


def lab_moments(rgb: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reinhard's statistics of N x 3 x H x W RGB in [0, 1]: its l-alpha-beta channels, and each
    image's per-channel mean and spread (N x 3 x 1 x 1 each)."""
    lab = lab_channels(rgb, eps)
    mean = lab.mean((2, 3), keepdim=True)
    return lab, mean, (lab - mean).pow(2).mean((2, 3), keepdim=True).sqrt()


def reinhard(rgb: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Reinhard's colour transfer of N x 3 x H x W RGB in [0, 1]: each image's l-alpha-beta channels
    shifted and scaled to the reference mean and spread, back to RGB (clamped to [0, 1])."""
    lab, mean, std = lab_moments(rgb, eps)
    ref_mean = torch.tensor(LAB_REFERENCE_MEAN).to(rgb).view(1, 3, 1, 1)
    ref_std = torch.tensor(LAB_REFERENCE_STD).to(rgb).view(1, 3, 1, 1)
    lab = (lab - mean) / (std + 1e-6) * ref_std + ref_mean
    lms = torch.einsum("ij,njhw->nihw", LAB_TO_LOG_LMS.to(rgb), lab)
    return torch.einsum("ij,njhw->nihw", LMS_TO_RGB.to(rgb), 10 ** lms).clamp(0, 1)


class StainNorm(nn.Module):
    """Per-image standardisation of the input: each colour channel (``image``) or the grey level,
    the channels' mean, repeated on all three (``gray``), shifted to mean 0 and scaled to spread 1;
    or (``lab``) Reinhard's transfer to fixed l-alpha-beta statistics (``reinhard``), on the RGB the
    input was normalised from (catalog MEAN/STD, torchvision's), normalised again after.

    ``image`` and ``gray`` are invariant to any per-channel gain and offset of the input (a stain's
    or a lamp's cast, and the dataset-wide mean/std normalisation before it). Computed in float32
    whatever the autocast.
    """

    def __init__(self, mode: str = "image", eps: float = 1e-3):
        super().__init__()
        if mode not in STAIN_NORMS[1:]:
            raise ValueError(f"stain_norm must be one of {', '.join(STAIN_NORMS)}, got '{mode}'")
        self.mode, self.eps = mode, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.mode == "lab":
            mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
            return (reinhard((x * std + mean).clamp(0, 1)) - mean) / std
        if self.mode == "gray":
            x = x.mean(1, keepdim=True)
        mean = x.mean((2, 3), keepdim=True)
        std = (x - mean).pow(2).mean((2, 3), keepdim=True).sqrt()
        x = (x - mean) / (std + self.eps)
        return x.expand(-1, 3, -1, -1) if self.mode == "gray" else x

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


class StainNormed(nn.Module):
    """A model behind a ``StainNorm`` layer; its weights keep their own names under ``net.``."""

    def __init__(self, net: nn.Module, mode: str):
        super().__init__()
        self.stain = StainNorm(mode)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.stain(x))


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def _check_name(name: str) -> None:
    if name not in _MODELS and not pre.is_timm(name):
        raise ValueError(f"unknown model '{name}'; known: {', '.join(list_models())}")


def model_info(name: str) -> dict:
    """Name, one-line description, minimum image size and family of a registered model (or of
    ``timm/<name>``: any timm model, built by timm)."""
    _check_name(name)
    if pre.is_timm(name):
        return {"name": name, "description": f"timm {name.removeprefix(pre.TIMM_PREFIX)} (the timm extra)",
                "min_image_size": 32, "family": "timm", "options": ()}
    return dict(_INFO[name])


def get_model(
    name: str, num_classes: int, image_size: int = 64, weights: str | Path | None = None,
    stain_norm: str = "none", pretrained: bool = False, **kwargs
) -> nn.Module:
    """Build a registered model or ``timm/<name>``; ``weights`` is an optional local state_dict file;
    ``pretrained`` starts from the weights' own pretrained weights (bloodcell.models.pretrained: the torch or
    Hugging Face cache, downloaded once; with ``weights``, that file holds them) and a zero classifier;
    ``stain_norm`` other than ``none`` puts a ``StainNorm`` layer in front (``StainNormed``)."""
    _check_name(name)
    min_size = model_info(name)["min_image_size"]
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if image_size < min_size:
        raise ValueError(f"model '{name}' needs image_size >= {min_size}, got {image_size}")
    if pre.is_timm(name):
        model = pre.timm_model(name, num_classes, pretrained, weights if pretrained else None)
        if pretrained:
            weights = None  # timm loaded them
            pre.zero_head(model)
    elif pretrained:
        pre.weights_info(name)  # refuses a model without pretrained weights, in one line
        model = _MODELS[name](num_classes=num_classes, image_size=image_size, pretrained=True, **kwargs)
        state = pre.read_state(weights) if weights else pre.torchvision_state(name)
        pre.zero_head(pre.load_backbone(model, state, str(weights or pre.cache_file(name))))
        weights = None
    else:
        model = _MODELS[name](num_classes=num_classes, image_size=image_size, **kwargs)
    if weights is not None:
        load_weights(model, weights)
    return model if stain_norm == "none" else StainNormed(model, stain_norm)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local state_dict non-strictly, dropping shape-mismatched keys; warn about what differs."""
    state = pre.read_state(path)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in mismatched}
    if not any(k in own for k in state):  # nothing would load: the run would train from random weights
        raise BloodcellError(f"--weights {shown(path)}: none of its {len(state) + len(mismatched)} weights "
                             f"fits a layer of this model (names or shapes differ)")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in mismatched]
    for what, keys in (
        ("shape differs, left at random init", mismatched),
        ("missing from the file, left at random init", missing),
        ("in the file but not in the model, ignored", result.unexpected_keys),
    ):
        if keys:
            warnings.warn(f"{Path(path).name}: {what}: {', '.join(keys)}", stacklevel=2)
    return model


# --- normalisation layers (the study's four and the baselines alike) ---------------------



NORMS = CHOICES["norm"]
GROUPS = 8  # channels per GroupNorm group: out_ch / GROUPS (32 channels: 8 groups of 4)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm of ``GROUPS`` groups (fewer where the channels do not divide)."""
    return nn.GroupNorm(math.gcd(GROUPS, channels), channels)


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """The layer a ``norm`` choice builds for a number of channels (torchvision's ``norm_layer``)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got '{norm}'")
    if norm == "none":
        raise ValueError("norm 'none' is for the study's four models; the baselines need batch or group")
    return nn.BatchNorm2d if norm == "batch" else group_norm
