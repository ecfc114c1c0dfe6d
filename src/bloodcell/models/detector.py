"""The cell detector: a small centre-heat-map network (CenterNet's idea, Zhou et al. 2019) sized for
a CPU.

A field, scaled so its long side is ``input_size`` pixels, goes through a plain stride-32 backbone
(conv + batch norm + ReLU blocks) and a feature pyramid back up to stride 4. There, per class, a
heat map says where a cell's centre is (a peak), and two maps give its box's log width and height in
input pixels. Decoding takes the local maxima of the heat map above a threshold: no anchors, no
non-maximum suppression over boxes, which suits round cells that seldom overlap at their centres.
About 0.5 GFLOP for a 640 x 480 field at the default 320 px.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms

from bloodcell.catalog import MEAN, STD

STRIDE = 4  # the output maps' step, in input pixels


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CellDetector(nn.Module):
    """Centre heat maps (one per class) and box sizes at stride 4, from a stride-32 backbone."""

    def __init__(self, n_classes: int = 3, width: int = 32):
        super().__init__()
        w = width
        self.n_classes = n_classes
        self.stem = nn.Sequential(_conv(3, w // 2, 2), _conv(w // 2, w, 2), _conv(w, w))  # stride 4
        self.s8 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))
        self.s16 = nn.Sequential(_conv(2 * w, 3 * w, 2), _conv(3 * w, 3 * w))
        self.s32 = nn.Sequential(_conv(3 * w, 4 * w, 2), _conv(4 * w, 4 * w, dilation=2))
        p = 2 * w
        self.lat32, self.lat16 = nn.Conv2d(4 * w, p, 1), nn.Conv2d(3 * w, p, 1)
        self.lat8, self.lat4 = nn.Conv2d(2 * w, p, 1), nn.Conv2d(w, p, 1)
        self.smooth = _conv(p, w)
        self.heat = nn.Conv2d(w, n_classes, 1)
        self.size = nn.Conv2d(w, 2 * n_classes, 1)
        # Start with every heat map near 0.01 (focal loss's prior), so the first steps are not swamped
        # by the background.
        nn.init.constant_(self.heat.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.constant_(self.size.bias, math.log(32.0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: N x 3 x H x W (H, W multiples of 32) -> heat logits N x C x H/4 x W/4 and log sizes
        N x 2C x H/4 x W/4 (width, height per class)."""
        c4 = self.stem(x)
        c8 = self.s8(c4)
        c16 = self.s16(c8)
        c32 = self.s32(c16)
        p = self.lat32(c32)
        p = F.interpolate(p, size=c16.shape[-2:], mode="nearest") + self.lat16(c16)
        p = F.interpolate(p, size=c8.shape[-2:], mode="nearest") + self.lat8(c8)
        p = F.interpolate(p, size=c4.shape[-2:], mode="nearest") + self.lat4(c4)
        f = self.smooth(p)
        return self.heat(f), self.size(f)


@torch.no_grad()
def decode(heat_logits: torch.Tensor, sizes: torch.Tensor, threshold: float = 0.3, max_per_class: int = 200,
           scale: float = 1.0, nms_iou: float = 0.3) -> list[list[tuple[int, float, float, float, float, float]]]:
    """Peaks of the heat maps -> per image a list of (class, score, x0, y0, x1, y1) in input pixels
    divided by ``scale`` (so: the original image's pixels when the input was scaled by ``scale``).

    A large cell can raise two peaks; of two boxes of one class overlapping by more than ``nms_iou``
    the weaker is dropped (cells touch, but seldom overlap that much)."""
    heat = torch.sigmoid(heat_logits.float())
    peaks = heat == F.max_pool2d(heat, 3, 1, 1)
    heat = heat * peaks
    n, c, h, w = heat.shape
    out = []
    for i in range(n):
        rows = []
        for k in range(c):
            flat = heat[i, k].flatten()
            top = min(max_per_class, int((flat >= threshold).sum()))
            if not top:
                continue
            scores, idx = flat.topk(top)
            ys, xs = idx // w, idx % w
            bw = sizes[i, 2 * k].float().exp()[ys, xs]
            bh = sizes[i, 2 * k + 1].float().exp()[ys, xs]
            cx, cy = (xs.float() + 0.5) * STRIDE, (ys.float() + 0.5) * STRIDE
            boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1) / scale
            keep = nms(boxes, scores, nms_iou)
            for s, b in zip(scores[keep].tolist(), boxes[keep].tolist(), strict=True):
                rows.append((k, s, *b))
        out.append(rows)
    return out


def background(img: np.ndarray) -> np.ndarray:
    """A field's background colour (the median of a sample of its pixels): what padding is filled with."""
    h, w = img.shape[:2]
    return np.median(img.reshape(-1, 3)[:: max(1, h * w // 500)], axis=0).astype(np.uint8)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """A float batch in [0, 1] -> normalised with bloodcell's mean and std, channels last."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def field_batch(images: list[np.ndarray]) -> torch.Tensor:
    """Fields (uint8 H x W x 3, any sizes) -> one normalised batch, each padded at its right and bottom
    with its background colour to the batch's largest size rounded up to a multiple of 32."""
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    h, w = -(-h // 32) * 32, -(-w // 32) * 32
    canvas = np.empty((len(images), h, w, 3), np.uint8)
    for i, im in enumerate(images):
        canvas[i] = background(im)
        canvas[i, :im.shape[0], :im.shape[1]] = im
    x = torch.from_numpy(canvas).permute(0, 3, 1, 2).float().div_(255)
    return normalise(x)
