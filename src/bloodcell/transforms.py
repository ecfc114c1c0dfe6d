"""Batch-level augmentation and normalisation, as tensor operations on whole batches.

Presets (``augment``):
- ``none``: nothing;
- ``light``: horizontal and vertical flips and 90-degree rotations (a cell has no up or down);
- ``strong``: light, plus a small random affine (any-angle rotation, scale 0.9-1.1, shift up to 8 %)
  and colour/stain jitter (brightness, contrast, saturation and per-channel stain gain).
Every random draw comes from the generator passed in, so a (seed, epoch) pair fixes the result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bloodcell.config import CHOICES
from bloodcell.info import MEAN, STD

AUGMENT_PRESETS = CHOICES["augment"]


def to_float(x_uint8_nhwc: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float32 N x 3 x H x W in [0, 1], channels-last in memory."""
    return x_uint8_nhwc.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Subtract the mean and divide by the standard deviation of info.MEAN/STD."""
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def flips_rot90(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal/vertical flips and 90-degree rotations, drawn per image."""
    n = x.shape[0]
    hflip = torch.rand(n, generator=g) < 0.5
    vflip = torch.rand(n, generator=g) < 0.5
    x = torch.where(hflip.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    x = torch.where(vflip.view(-1, 1, 1, 1).to(x.device), x.flip(2), x)
    if x.shape[2] == x.shape[3]:
        rot = torch.rand(n, generator=g) < 0.5  # flips + one optional rot90 give all 8 symmetries
        x = torch.where(rot.view(-1, 1, 1, 1).to(x.device), x.transpose(2, 3), x)
    return x


def random_affine(x: torch.Tensor, g: torch.Generator, degrees: float = 180.0, scale=(0.9, 1.1),
                  shift: float = 0.08) -> torch.Tensor:
    """Rotate, scale and shift each image by its own random amount (reflection padding)."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=g) * 2 - 1) * math.radians(degrees)
    s = scale[0] + torch.rand(n, generator=g) * (scale[1] - scale[0])
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * shift * 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(x: torch.Tensor, g: torch.Generator, brightness: float = 0.15, contrast: float = 0.15,
                 saturation: float = 0.15, stain: float = 0.05) -> torch.Tensor:
    """Per-image brightness, contrast, saturation and per-channel stain gain, on [0, 1] images."""
    n = x.shape[0]

    def draw(a: float, k: int = 1) -> torch.Tensor:
        return (1 + (torch.rand(n, k, generator=g) * 2 - 1) * a).view(n, k, 1, 1).to(x.device, x.dtype)

    x = x * draw(brightness)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * draw(contrast) + mean
    gray = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)).sum(
        1, keepdim=True)
    x = (x - gray) * draw(saturation) + gray
    x = x * draw(stain, 3)
    return x.clamp_(0, 1)


def augment(x: torch.Tensor, preset: str, g: torch.Generator) -> torch.Tensor:
    """Apply an augmentation preset to a float [0, 1] N x 3 x H x W batch."""
    if preset == "none":
        return x
    if preset not in AUGMENT_PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; known: {', '.join(AUGMENT_PRESETS)}")
    x = flips_rot90(x, g)
    if preset == "strong":
        x = random_affine(x, g)
        x = color_jitter(x, g)
    return x
