"""The study's four CNNs (the "study" family), as short builders over one ``plain_cnn``."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from bloodcell.models.registry import NORMS, norm_layer, register_model


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
