"""Model registry: ``@register_model`` fills one dict, ``get_model(name, ...)`` builds from it.

Every model takes a float batch N x 3 x H x W (any H, W >= its ``min_image_size``) and returns logits
N x num_classes, for any ``num_classes >= 2``.

=====================  ======  ========  ===============================================================
name                   family  min size  description
=====================  ======  ========  ===============================================================
``cnn2x32``            study   32        study Model 1: 2 conv(32), each + 2x2 max-pool; dense 64
``cnn4x64``            study   32        study Model 2: 4 conv(64), each + 2x2 max-pool; dense 256
``cnn4x32``            study   32        study Model 3: 4 conv(32), each + 2x2 max-pool; dense 64
``vgg3``               study   32        study Model 4: 3 VGG blocks of 2 conv (32/64/128); dense 128
``resnet18``           modern  32        torchvision ResNet-18; CIFAR stem (3x3/1, no max-pool) <= 64 px
``efficientnet_b0``    modern  32        torchvision EfficientNet-B0
``mobilenet_v3_small`` modern  32        torchvision MobileNetV3-Small
=====================  ======  ========  ===============================================================

The study's four ("study" family) follow the Kaggle blood-cell study: 3x3 convolutions (padding 1),
ReLU, 2x2 max-pooling. Where the study is silent or its choice ties a model to one input size, we
chose, and the builders say so:

- ``norm="batch"`` (default) puts BatchNorm after each convolution. Without it these plain stacks
  train poorly from scratch, which is the likely reason two of the study's models stayed at chance
  (25 %); ``norm="none"`` gives the study's plain stacks back.
- ``pool_first=True`` (default): a convolution followed by a max-pool is pooled straight away, then
  normalised and rectified (conv, pool, BN, ReLU), instead of conv, BN, ReLU, pool. Max-pooling
  commutes with ReLU and with any per-channel increasing map, so the layers compute the same kind
  of function (exactly the same one without BatchNorm), while BatchNorm and ReLU, which are
  memory-bound on a CPU, touch a quarter of the values: training runs 1.3-2x faster (bench/RESULTS.md,
  issue 7). Checkpoints that do not name the option load in the order their weights fit.
- The study flattened the last feature map (Keras ``Flatten``), which fixes the dense layer's size
  to one input size. We put ``AdaptiveAvgPool2d(4)`` before the flatten: at the study's kind of
  input this is a flatten of a 4 x 4 map, and the same weights accept any size >= 32 px (smaller
  maps, e.g. 2 x 2 after four pools on 32 px, are replicated up to 4 x 4).
- Each has one hidden dense layer (ReLU) whose width the builder names, then ``Dropout(dropout)``
  (default 0.3, for all four) before the output layer.

The modern baselines ("modern" family) are torchvision's, randomly initialised unless
``get_model(..., pretrained=True)``: then their ImageNet weights come through torchvision's weights
API from the torch cache, downloaded once (``bloodcell.pretrained``), a new classifier for our
classes, and resnet18 keeps its ImageNet stem at any size. They take ``norm="batch"`` or ``"group"``
(GroupNorm in place of every BatchNorm, as in the study's four; from scratch only: the ImageNet
weights are batch-norm ones). Any timm model is ``timm/<name>`` (the timm extra), pretrained through
timm and the Hugging Face cache. ``get_model(..., weights=path)`` loads a local state_dict for any
model instead (keys whose shapes differ, such as another classifier, are dropped and reported in a
warning); with ``pretrained`` that file holds the pretrained weights.

Any model can start with a stain normalisation, ``get_model(..., stain_norm="image"|"gray")``: the
``StainNorm`` layer standardises each image's colour channels (``image``) or its grey level
(``gray``) before the first convolution, so a lab's stain and lighting cast is gone before the
model sees the cells. Being part of the model, it travels in the checkpoint and the exported
files, and predict, serve and evaluate apply it without knowing it is there.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from bloodcell import pretrained as pre
from bloodcell.config import CHOICES

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


class StainNorm(nn.Module):
    """Per-image standardisation of the input: each colour channel (``image``) or the grey level,
    the channels' mean, repeated on all three (``gray``), shifted to mean 0 and scaled to spread 1.

    Invariant to any per-channel gain and offset of the input (a stain's or a lamp's cast, and the
    dataset-wide mean/std normalisation before it). Computed in float32 whatever the autocast.
    """

    def __init__(self, mode: str = "image", eps: float = 1e-3):
        super().__init__()
        if mode not in STAIN_NORMS[1:]:
            raise ValueError(f"stain_norm must be one of {', '.join(STAIN_NORMS)}, got '{mode}'")
        self.mode, self.eps = mode, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
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
    ``pretrained`` starts from the weights' own pretrained weights (bloodcell.pretrained: the torch or
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
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a checkpoint dict rather than a bare state_dict
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in mismatched}
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


# --- the study's four ------------------------------------------------------------------------


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


def conv_block(in_ch: int, out_ch: int, norm: str = "batch") -> nn.Sequential:
    """3x3 convolution (padding 1), then BatchNorm (``batch``), GroupNorm (``group``: statistics of
    each image alone, the same in training and at test time, in any lab) or nothing, then ReLU."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got '{norm}'")
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=norm == "none")]
    if norm != "none":
        layers.append(norm_layer(norm)(out_ch))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def plain_cnn(
    blocks: list[list[int]], hidden: int, num_classes: int, norm: str, dropout: float,
    pool_first: bool = True,
) -> nn.Sequential:
    """Conv blocks (channel lists), 2x2 max-pool after each block, then pool-4 / flatten / dense head.

    ``pool_first`` puts each block's max-pool straight after its last convolution (conv, pool, BN,
    ReLU); otherwise after the ReLU (conv, BN, ReLU, pool).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    features: list[nn.Module] = []
    in_ch = 3
    for block in blocks:
        for out_ch in block:
            features.append(conv_block(in_ch, out_ch, norm))
            in_ch = out_ch
        if pool_first:
            features[-1].insert(1, nn.MaxPool2d(2))
        else:
            features.append(nn.MaxPool2d(2))
    # Adaptive pool to 4x4 instead of the study's bare Flatten: same head at every input size.
    head = [
        nn.Flatten(),
        nn.Linear(in_ch * 16, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    ]
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(*features),
            pool=nn.AdaptiveAvgPool2d(4),
            classifier=nn.Sequential(*head),
        )
    )


@register_model(family="study")
def cnn2x32(
    num_classes: int, image_size: int = 64, norm: str = "batch", dropout: float = 0.3,
    pool_first: bool = True,
) -> nn.Module:
    """Study Model 1: 2 conv (32), each + max-pool; dense 64 (our choice, the study is silent)."""
    return plain_cnn([[32], [32]], 64, num_classes, norm, dropout, pool_first)


@register_model(family="study")
def cnn4x64(
    num_classes: int, image_size: int = 64, norm: str = "batch", dropout: float = 0.3,
    pool_first: bool = True,
) -> nn.Module:
    """Study Model 2: 4 conv (64), each + max-pool; dense 256."""
    return plain_cnn([[64]] * 4, 256, num_classes, norm, dropout, pool_first)


@register_model(family="study")
def cnn4x32(
    num_classes: int, image_size: int = 64, norm: str = "batch", dropout: float = 0.3,
    pool_first: bool = True,
) -> nn.Module:
    """Study Model 3: 4 conv (32), each + max-pool; dense 64."""
    return plain_cnn([[32]] * 4, 64, num_classes, norm, dropout, pool_first)


@register_model(family="study")
def vgg3(
    num_classes: int, image_size: int = 64, norm: str = "batch", dropout: float = 0.3,
    pool_first: bool = True,
) -> nn.Module:
    """Study Model 4: 3 VGG blocks of 2 conv (32/64/128), max-pool per block; dense 128 (our choice)."""
    return plain_cnn([[32, 32], [64, 64], [128, 128]], 128, num_classes, norm, dropout, pool_first)


# --- modern baselines (torchvision; random init unless get_model(..., pretrained=True)) --------
# ``pretrained`` only shapes the architecture (the weights are loaded by get_model), so a checkpoint
# rebuilds the model with it and never downloads. ``norm="group"`` builds them with GroupNorm in
# place of every BatchNorm (torchvision's ``norm_layer``).


def baseline_norm(norm: str, pretrained: bool) -> dict:
    """torchvision's ``norm_layer`` argument for a norm choice ({} for its own batch norm)."""
    if norm == "batch":
        return {}
    if pretrained:
        raise ValueError(f"norm '{norm}' cannot start from pretrained weights (they are batch-norm ones)")
    return {"norm_layer": norm_layer(norm)}


@register_model(family="modern")
def resnet18(num_classes: int, image_size: int = 64, pretrained: bool = False,
             small_stem: bool | None = None, norm: str = "batch") -> nn.Module:
    """ResNet-18 (torchvision); at <= 64 px a small-input stem: one 3x3 conv, no max-pool."""
    # Pretrained weights need the ImageNet stem they were trained with, whatever the input size.
    small_stem = (image_size <= 64 and not pretrained) if small_stem is None else small_stem
    model = tvm.resnet18(weights=None, num_classes=num_classes, **baseline_norm(norm, pretrained))
    if small_stem:
        # The ImageNet stem divides by 4 before the first block: 64 px would reach layer4 at 2x2.
        # The small stem divides by 2 above 32 px (64 px meets layer1 at 32x32, as CIFAR's 32 px
        # does with stride 1) and by 1 at 32 px and under.
        stride = 1 if image_size <= 32 else 2
        model.conv1 = nn.Conv2d(3, 64, 3, stride=stride, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model


@register_model(family="modern")
def efficientnet_b0(num_classes: int, image_size: int = 64, pretrained: bool = False,
                    norm: str = "batch") -> nn.Module:
    """EfficientNet-B0 (torchvision)."""
    return tvm.efficientnet_b0(weights=None, num_classes=num_classes, **baseline_norm(norm, pretrained))


@register_model(family="modern")
def mobilenet_v3_small(num_classes: int, image_size: int = 64, pretrained: bool = False,
                       norm: str = "batch") -> nn.Module:
    """MobileNetV3-Small (torchvision)."""
    return tvm.mobilenet_v3_small(weights=None, num_classes=num_classes, **baseline_norm(norm, pretrained))
