"""Augmentation: the fused `strong` preset equals its steps done one by one, and keeps its promises."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bloodcell.data.transforms import augment, flips_rot90, gaussian_blur, mix_batch, to_float


def strong_step_by_step(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The obvious (slow) `strong`: flips and transpose as tensor ops, then the random affine, then
    each colour change in turn, drawing from the generator in the same order."""
    x = flips_rot90(x, g)
    n = x.shape[0]
    ang = (torch.rand(n, generator=g) * 2 - 1) * math.radians(180.0)
    s = 0.9 + torch.rand(n, generator=g) * 0.2
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * 0.08 * 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def draw(a: float, k: int = 1) -> torch.Tensor:
        return (1 + (torch.rand(n, k, generator=g) * 2 - 1) * a).view(n, k, 1, 1)

    x = x * draw(0.15)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * draw(0.15) + mean
    gray = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = (x - gray) * draw(0.15) + gray
    return (x * draw(0.05, 3)).clamp(0, 1)


@pytest.mark.parametrize("shape", [(16, 3, 32, 32), (5, 3, 24, 40)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_strong_equals_its_steps(shape, channels_last):
    torch.manual_seed(0)
    x = torch.rand(*shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fused = augment(x, "strong", torch.Generator().manual_seed(3))
    slow = strong_step_by_step(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(fused, slow, rtol=0, atol=2e-5)
    other = augment(x, "strong", torch.Generator().manual_seed(4))
    assert (other - slow).abs().max() > 0.1  # another seed, another augmentation: the check can fail


def test_light_draws_the_eight_symmetries_and_keeps_pixels():
    x = to_float(torch.randint(0, 256, (400, 8, 8, 3), dtype=torch.uint8))
    x[:] = x[0]  # one image, 400 times
    out = augment(x, "light", torch.Generator().manual_seed(0))
    views = {tuple(v.flatten().tolist()) for v in out}
    assert len(views) == 8  # all 8 symmetries of the square occur, and nothing else
    assert torch.equal(out.flatten(1).sort(1).values, x.flatten(1).sort(1).values)


def test_strong_stays_in_range_and_unknown_preset_raises():
    x = torch.rand(8, 3, 32, 32)
    out = augment(x, "strong", torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        augment(x, "medium", torch.Generator())


def test_gaussian_blur_is_each_images_own_gaussian():
    """Each image blurred by its own sigma equals torchvision's Gaussian blur (reflected borders);
    sigma 0 leaves an image untouched; the output is channels-last like the loader's batches."""
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    torch.manual_seed(0)
    x = torch.rand(4, 3, 20, 28)
    sigma = torch.tensor([0.0, 0.6, 1.2, 2.5])
    y = gaussian_blur(x, sigma)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y[0], x[0])
    radius = math.ceil(2 * 2.5)
    for i in (1, 2, 3):
        want = tv_blur(x[i:i + 1], kernel_size=2 * radius + 1, sigma=float(sigma[i]))
        torch.testing.assert_close(y[i:i + 1], want, rtol=0, atol=1e-5)
    assert y[3].diff(dim=-1).abs().mean() < 0.5 * x[3].diff(dim=-1).abs().mean()  # smoother


def test_blur_adds_to_a_preset_without_changing_its_draws():
    """blur=0 is the preset alone, draw for draw; blur > 0 blurs the preset's output."""
    x = torch.rand(8, 3, 32, 32)
    plain = augment(x, "strong", torch.Generator().manual_seed(5))
    torch.testing.assert_close(augment(x, "strong", torch.Generator().manual_seed(5), blur=0.0), plain)
    blurred = augment(x, "strong", torch.Generator().manual_seed(5), blur=2.0)
    assert blurred.diff(dim=-1).abs().mean() < plain.diff(dim=-1).abs().mean()
    assert blurred.min() >= 0 and blurred.max() <= 1
    assert not torch.equal(augment(x, "none", torch.Generator(), blur=2.0), x)


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mix_blends_images_and_labels_in_the_same_proportion(mode):
    """Each mixed image is its own image and one partner's, and its soft target gives each of the
    two labels the share of the image it contributed (CutMix: the share of pixels). Every image has
    its own class here, so the target names the partner."""
    n = 12
    x = torch.rand(n, 3, 24, 24)
    y = torch.arange(n)
    mixed, target = mix_batch(x, y, n, mode, 1.0, torch.Generator().manual_seed(2))
    again = mix_batch(x, y, n, mode, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(mixed, again[0]) and torch.equal(target, again[1])  # the generator fixes it
    torch.testing.assert_close(target.sum(1), torch.ones(n))
    partners = 0
    for i in range(n):
        lam = target[i, i].item()
        others = [j for j in range(n) if j != i and target[i, j] > 0]
        if not others:  # paired with itself
            assert lam == 1.0 and torch.allclose(mixed[i], x[i])
            continue
        (j,), partners = others, partners + 1
        if mode == "mixup":
            torch.testing.assert_close(mixed[i], lam * x[i] + (1 - lam) * x[j])
        else:
            own, theirs = (mixed[i] == x[i]).all(0), (mixed[i] == x[j]).all(0)
            assert (own | theirs).all() and abs(own.float().mean().item() - lam) < 1e-6
    assert partners >= n // 2


def test_mix_none_is_one_hot_and_unknown_mode_raises():
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    same, target = mix_batch(x, y, 3, "none", 1.0, torch.Generator())
    assert same is x and torch.equal(target, torch.eye(3)[y])
    with pytest.raises(ValueError, match="unknown mix"):
        mix_batch(x, y, 3, "mosaic", 1.0, torch.Generator())


def test_hed_jitter_is_the_stain_space_scaled_and_shifted():
    """Against the colour deconvolution written out with skimage's stain matrices (not its rgb2hed,
    which clips negative densities): each stain's density scaled by a and shifted by b, then
    recomposed, is what hed_jitter returns for the a and b it draws."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    from bloodcell.data.transforms import hed_jitter

    x = torch.rand(3, 3, 12, 12) * 0.8 + 0.1
    assert torch.allclose(hed_jitter(x, torch.Generator().manual_seed(0), 0.0), x, atol=1e-5)
    g = torch.Generator().manual_seed(1)
    a = 1 + (torch.rand(3, 3, generator=g) * 2 - 1) * 0.2
    b = (torch.rand(3, 3, generator=g) * 2 - 1) * 0.2
    got = hed_jitter(x, torch.Generator().manual_seed(1), 0.2)
    for i in range(3):
        od = -np.log(x[i].permute(1, 2, 0).double().numpy())  # H x W x 3 optical density
        stains = (od @ hed_from_rgb) * a[i].double().numpy() + b[i].double().numpy()
        want = torch.from_numpy(np.exp(-(stains @ rgb_from_hed))).permute(2, 0, 1).float().clamp(0, 1)
        assert torch.allclose(got[i], want, atol=1e-4), float((got[i] - want).abs().max())
    assert (got - x).abs().mean() > 0.01  # it does change the stains


def test_random_gray_turns_the_drawn_share_grey_and_joins_augment():
    from bloodcell.data.transforms import random_gray

    x = torch.rand(400, 3, 4, 4)
    y = random_gray(x, torch.Generator().manual_seed(0), 0.3)
    grey = (y[:, 0] == y[:, 1]).all(-1).all(-1) & (y[:, 1] == y[:, 2]).all(-1).all(-1)
    assert 0.2 < grey.float().mean() < 0.4
    assert torch.equal(y[~grey], x[~grey])
    assert torch.equal(random_gray(x, torch.Generator(), 0.0), x)
    a = augment(x, "none", torch.Generator().manual_seed(3), stain_jitter=0.1, gray=0.5)
    b = augment(x, "none", torch.Generator().manual_seed(3), stain_jitter=0.1, gray=0.5)
    assert torch.equal(a, b) and not torch.equal(a, x) and 0 <= a.min() and a.max() <= 1


def test_zoom_magnifies_each_image_by_its_own_factor_within_the_range():
    """A centred disk comes out larger in some images and smaller in others, its area scaled by the
    drawn magnification squared, within (1 / (1 + z))^2 .. (1 + z)^2; zoom=0 is the preset alone."""
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    disk = (((yy - 31.5) ** 2 + (xx - 31.5) ** 2) < 12 ** 2).float()
    x = disk.expand(200, 3, 64, 64).clone()
    z = 0.5
    out = augment(x, "none", torch.Generator().manual_seed(0), zoom=z)
    ratio = (out[:, 0] > 0.5).float().sum((1, 2)) / disk.sum()
    assert ratio.min() >= (1 / (1 + z)) ** 2 * 0.9 and ratio.max() <= (1 + z) ** 2 * 1.1
    assert (ratio < 0.8).sum() > 20 and (ratio > 1.25).sum() > 20  # both ways, about as often
    assert torch.equal(augment(x, "none", torch.Generator(), zoom=0.0), x)
    plain = augment(x[:8], "strong", torch.Generator().manual_seed(5))
    torch.testing.assert_close(augment(x[:8], "strong", torch.Generator().manual_seed(5), zoom=0.0), plain)
    wide = augment(x, "strong", torch.Generator().manual_seed(1), zoom=z)
    area = (wide.mean(1) > 0.5).float().sum((1, 2)) / disk.sum()
    assert area.max() > 1.5 and area.min() < 0.6  # strong's own 0.9-1.1 could not do either
