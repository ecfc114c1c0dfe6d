"""Batch-level augmentation and normalisation, as tensor operations on whole batches.

Presets (``augment``):
- ``none``: nothing;
- ``light``: horizontal and vertical flips and 90-degree rotations (a cell has no up or down);
- ``strong``: light, plus a small random affine (any-angle rotation, scale 0.9-1.1, shift up to 8 %)
  and colour/stain jitter (brightness, contrast, saturation and per-channel stain gain), applied in
  two passes over the pixels: one resampling and one colour map per image (``strong``).
On top of any preset, ``stain_jitter`` (training config) jitters each image's stains in the
haematoxylin-eosin-DAB space of colour deconvolution (``hed_jitter``, Tellez et al. 2018: each stain's
optical density scaled by 1 +- sigma and shifted by +- sigma, drawn per image), ``gray`` turns a share
of the images grey (``random_gray``), ``zoom`` (training config) magnifies each image by its own
factor, as another microscope's objective would (``random_zoom``; inside ``strong``'s affine), and ``blur`` (training config) blurs each image by a Gaussian of its own random
width, as another microscope's focus and resolution would (``gaussian_blur``).
``mix`` (training config) then blends pairs of images and their labels: ``mixup`` (a weighted
average of two images) or ``cutmix`` (a box of one pasted into the other), the label mix in
proportion (``mix_batch``).
Every random draw comes from the generator passed in, so a (seed, epoch) pair fixes the result.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from bloodcell.catalog import MEAN, STD
from bloodcell.config import CHOICES

AUGMENT_PRESETS = CHOICES["augment"]


def to_float(x_uint8_nhwc: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float32 N x 3 x H x W in [0, 1], channels-last in memory."""
    return x_uint8_nhwc.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """Subtract the mean and divide by the standard deviation per channel: info.MEAN/STD unless the
    model's pretrained weights were trained with their own (a checkpoint's ``mean``/``std``)."""
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def draw_dihedral(n: int, g: torch.Generator, square: bool) -> torch.Tensor:
    """Per image, whether to flip horizontally, flip vertically and transpose (N x 3 bool): with
    the transpose (square images only) the three draw all 8 symmetries of the square."""
    hflip = torch.rand(n, generator=g) < 0.5
    vflip = torch.rand(n, generator=g) < 0.5
    rot = torch.rand(n, generator=g) < 0.5 if square else torch.zeros(n, dtype=torch.bool)
    return torch.stack([hflip, vflip, rot], 1)


def flips_rot90(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal/vertical flips and 90-degree rotations, drawn per image."""
    d = draw_dihedral(x.shape[0], g, x.shape[2] == x.shape[3]).to(x.device)
    x = torch.where(d[:, 0].view(-1, 1, 1, 1), x.flip(3), x)
    x = torch.where(d[:, 1].view(-1, 1, 1, 1), x.flip(2), x)
    if x.shape[2] != x.shape[3]:
        return x
    return torch.where(d[:, 2].view(-1, 1, 1, 1), x.transpose(2, 3), x)


def dihedral_matrices(d: torch.Tensor) -> torch.Tensor:
    """N x 2 x 2 maps of normalised (x, y) sampling coordinates that apply ``draw_dihedral``'s
    flips and transposes in sampling: flip(3) negates x, flip(2) negates y, transpose swaps them."""
    n = d.shape[0]
    fh, fv, tr = (torch.diag_embed(torch.ones(n, 2)) for _ in range(3))
    fh[d[:, 0], 0, 0] = -1.0
    fv[d[:, 1], 1, 1] = -1.0
    tr[d[:, 2]] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    return fh @ fv @ tr


def affine_thetas(n: int, g: torch.Generator, degrees: float = 180.0, scale=(0.9, 1.1),
                  shift: float = 0.08, geometric: bool = False) -> torch.Tensor:
    """N x 2 x 3 sampling matrices (``F.affine_grid``'s theta) of a random rotation (any angle),
    scale and shift per image. The scale is drawn uniformly in ``scale``, or, ``geometric``,
    uniformly in its logarithm (as likely halved as doubled)."""
    ang = (torch.rand(n, generator=g) * 2 - 1) * math.radians(degrees)
    u = torch.rand(n, generator=g)
    s = scale[0] * (scale[1] / scale[0]) ** u if geometric else scale[0] + u * (scale[1] - scale[0])
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * shift * 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    return torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)


def jitter_matrices(x: torch.Tensor, g: torch.Generator, brightness: float = 0.15, contrast: float = 0.15,
                    saturation: float = 0.15, stain: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image colour jitter as one affine colour map (M: N x 3 x 3, v: N x 3), so that
    ``M @ pixel + v`` is: brightness gain b, contrast c about the image's mean m (over all channels
    and pixels), saturation s towards the luma grey, per-channel stain gain. All four are affine in
    the pixel, so they compose into one map: M = G S c b, v = G S 1 (1 - c) b m."""
    n = x.shape[0]

    def draw(a: float, k: int = 1) -> torch.Tensor:
        return 1 + (torch.rand(n, k, generator=g) * 2 - 1) * a

    b, c, s, gain = draw(brightness), draw(contrast), draw(saturation), draw(stain, 3)
    luma = torch.tensor([0.299, 0.587, 0.114])
    sat = s.view(n, 1, 1) * torch.eye(3) + (1 - s).view(n, 1, 1) * luma.view(1, 1, 3)  # S = sI + (1-s) 1 luma^T
    gs = gain.view(n, 3, 1) * sat
    mat = gs * (c * b).view(n, 1, 1)
    off = (gs.sum(2) * ((1 - c) * b)).to(x.device, x.dtype) * x.mean(dim=(1, 2, 3)).view(n, 1)
    return mat.to(x.device, x.dtype), off


def color_map(x: torch.Tensor, mat: torch.Tensor, off: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """``mat @ pixel + off`` for every pixel of each image, clamped to [0, 1] (unless not asked), in
    one pass."""
    n, ch, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        flat = x.permute(0, 2, 3, 1).reshape(n, h * w, ch)  # a view: pixels x channels
        out = torch.baddbmm(off.unsqueeze(1), flat, mat.transpose(1, 2)).view(n, h, w, ch).permute(0, 3, 1, 2)
    else:
        out = torch.baddbmm(off.unsqueeze(2), mat, x.reshape(n, ch, h * w)).view(n, ch, h, w)
    return out.clamp_(0, 1) if clamp else out


def zoom_range(zoom: float) -> tuple[float, float]:
    """The magnifications a ``zoom`` of z draws from: 1 / (1 + z) to 1 + z."""
    return 1 / (1 + zoom), 1 + zoom


def strong(x: torch.Tensor, g: torch.Generator, zoom: float = 0.0) -> torch.Tensor:
    """The ``strong`` preset in two passes over the pixels: the flips, 90-degree rotation and
    random affine composed into one sampling matrix per image (one ``grid_sample``, reflection
    padding), then colour and stain jitter as one colour map per image. ``zoom`` > 0 widens the
    affine's scale from 0.9-1.1 to ``zoom_range(zoom)``, drawn geometrically."""
    n = x.shape[0]
    d = draw_dihedral(n, g, x.shape[2] == x.shape[3])
    theta = affine_thetas(n, g) if zoom <= 0 else affine_thetas(n, g, scale=zoom_range(zoom), geometric=True)
    dm = dihedral_matrices(d)  # sampling the flipped image at p samples the image at D p
    grid = F.affine_grid((dm @ theta).to(x.device, x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return color_map(x, *jitter_matrices(x, g))


# Colour deconvolution (Ruifrok and Johnston 2001): the optical-density vectors of haematoxylin, eosin
# and DAB (rows, as in skimage's ``rgb2hed``).
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


def hed_jitter(x: torch.Tensor, g: torch.Generator, sigma: float) -> torch.Tensor:
    """Stain augmentation in the HED space: per image, each stain's density ``s`` becomes
    ``s * a + b`` with a ~ U(1 - sigma, 1 + sigma), b ~ U(-sigma, sigma) (optical density: -ln of the
    transmitted light, so b = 0.05 is about 5 % more or less of that stain's light). In optical
    density that is one affine map per image, ``od @ (H diag(a) R) + b @ R``, applied in one pass; the
    identity where sigma is 0 (the map is not clipped in stain space, so it stays invertible)."""
    n = x.shape[0]
    a = 1 + (torch.rand(n, 3, generator=g) * 2 - 1) * sigma
    b = (torch.rand(n, 3, generator=g) * 2 - 1) * sigma
    mat = HED_FROM_RGB.unsqueeze(0) * a.unsqueeze(1) @ RGB_FROM_HED  # N x 3 x 3, row-vector convention
    off = b @ RGB_FROM_HED  # N x 3
    od = -torch.log(x.clamp_min(1e-4))  # N x 3 x H x W
    # color_map computes mat @ pixel (column vectors): pass the transpose of the row-vector map
    od = color_map(od, mat.transpose(1, 2).to(x.device, x.dtype), off.to(x.device, x.dtype), clamp=False)
    return torch.exp(-od).clamp_(0, 1)


LUMA = (0.299, 0.587, 0.114)


def random_gray(x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """Each image, with probability ``p``, replaced by its luma on all three channels."""
    pick = (torch.rand(x.shape[0], generator=g) < p).to(x.device).view(-1, 1, 1, 1)
    luma = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    grey = (x * luma).sum(1, keepdim=True).expand_as(x)
    return torch.where(pick, grey, x).contiguous(memory_format=torch.channels_last)


def blur_matrices(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """N x size x size matrices that blur a row of ``size`` pixels by a Gaussian of standard deviation
    ``sigma`` (N, in pixels; 0 gives the identity), reflected at the borders: the reflect-padded
    Gaussian applied to each unit vector is one column."""
    radius = min(max(1, math.ceil(2 * float(sigma.max()))), size - 1)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.float().clamp_min(1e-3).view(-1, 1)) ** 2)
    k = k / k.sum(1, keepdim=True)
    units = F.pad(torch.eye(size).unsqueeze(1), (radius, radius), mode="reflect")  # size x 1 x (size + 2r)
    return F.conv1d(units, k.unsqueeze(1)).permute(1, 2, 0)  # [m, i, j] = (blur_m e_j)_i


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of N x C x H x W by a Gaussian of its own standard deviation ``sigma`` (N, in
    pixels; 0 leaves an image as it is), reflected at the borders: two batched matrix products
    (rows, then columns); on this project's CPU a little faster than a per-image grouped
    convolution (64 images of 64 px, one thread: 8.8 against 9.9 ms, best of 3, 2026-11-26)."""
    n, ch, h, w = x.shape
    bw = blur_matrices(sigma, w).to(x.device, x.dtype)
    bh = bw if h == w else blur_matrices(sigma, h).to(x.device, x.dtype)
    y = torch.bmm(x.reshape(n, ch * h, w), bw.transpose(1, 2))  # along each row
    y = torch.bmm(bh, y.view(n, ch, h, w).transpose(1, 2).reshape(n, h, ch * w))  # along each column
    return y.view(n, h, ch, w).permute(0, 2, 1, 3).contiguous(memory_format=torch.channels_last)


def random_zoom(x: torch.Tensor, g: torch.Generator, zoom: float) -> torch.Tensor:
    """Each image magnified by its own factor, drawn geometrically from ``zoom_range(zoom)`` (as
    another microscope's objective or camera would), about its centre; reflection padding."""
    theta = affine_thetas(x.shape[0], g, degrees=0.0, scale=zoom_range(zoom), shift=0.0, geometric=True)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def augment(x: torch.Tensor, preset: str, g: torch.Generator, blur: float = 0.0, stain_jitter: float = 0.0,
            gray: float = 0.0, zoom: float = 0.0) -> torch.Tensor:
    """Apply an augmentation preset to a float [0, 1] N x 3 x H x W batch, then, where asked, HED
    stain jitter of strength ``stain_jitter``, grey with probability ``gray``, and a Gaussian blur of
    standard deviation drawn per image from [0, blur] pixels. ``zoom`` magnifies each image by a
    factor from 1 / (1 + zoom) to 1 + zoom: inside ``strong``'s affine (no extra pass), else on its own."""
    if preset not in AUGMENT_PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; known: {', '.join(AUGMENT_PRESETS)}")
    if preset != "none":
        x = strong(x, g, zoom) if preset == "strong" else flips_rot90(x, g)
    if zoom > 0 and preset != "strong":
        x = random_zoom(x, g, zoom)
    if stain_jitter > 0:
        x = hed_jitter(x, g, stain_jitter)
    if gray > 0:
        x = random_gray(x, g, gray)
    if blur > 0:
        x = gaussian_blur(x, torch.rand(x.shape[0], generator=g) * blur)
    return x


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, mode: str, alpha: float,
              g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix over a batch: each image is blended with another of the batch (a random
    pairing), lambda ~ Beta(alpha, alpha) per batch; returns the images and soft targets N x C
    (lambda of the image's own one-hot label, 1 - lambda of its partner's; for CutMix lambda is the
    share of pixels the image keeps). ``mode`` "none" returns the batch with one-hot targets."""
    n, _, h, w = x.shape
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    if mode == "none":
        return x, onehot
    perm = torch.randperm(n, generator=g).to(x.device)
    rng = np.random.default_rng(int(torch.randint(2**31 - 1, (1,), generator=g)))
    lam = float(rng.beta(alpha, alpha))
    if mode == "mixup":
        x = x * lam + x[perm] * (1 - lam)
    elif mode == "cutmix":
        ch, cw = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        raise ValueError(f"unknown mix {mode!r}; known: {', '.join(CHOICES['mix'])}")
    return x, onehot * lam + onehot[perm] * (1 - lam)


TTA_VIEWS = 8  # test-time augmentation: the 8 flips and transpositions of a square image


def tta_view(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th (0-7) of the 8 flips/transpositions of a square image batch N x C x H x W."""
    if k & 1:
        x = x.flip(3)
    if k & 2:
        x = x.flip(2)
    if k & 4:
        x = x.transpose(2, 3)
    return x
