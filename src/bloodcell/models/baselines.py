"""The modern baselines (the "modern" family): torchvision's ResNet-18, EfficientNet-B0,
MobileNetV3-Small and MobileNetV2, randomly initialised unless ``get_model(..., pretrained=True)``."""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from bloodcell.models.registry import norm_layer, register_model

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


@register_model(family="modern")
def mobilenet_v2(num_classes: int, image_size: int = 64, pretrained: bool = False,
                 norm: str = "batch") -> nn.Module:
    """MobileNetV2 (torchvision)."""
    return tvm.mobilenet_v2(weights=None, num_classes=num_classes, **baseline_norm(norm, pretrained))
