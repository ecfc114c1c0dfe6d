"""cam: Grad-CAM for every registered model, at the right layer, pointing at the evidence; the overlay PNG."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bloodcell.cam import GradCAM, grad_cam, last_conv, overlay_png
from bloodcell.data.images import load_image
from bloodcell.models import get_model, list_models

FAST = ("cnn2x32", "cnn4x32", "cnn4x64", "vgg3")


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in list_models()])
def test_grad_cam_works_for_every_registered_model(name) -> None:
    torch.manual_seed(0)
    model = get_model(name, num_classes=4, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    layer_name, layer = last_conv(model, x)
    assert isinstance(layer, nn.Conv2d)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert layer_name in convs
    heat = grad_cam(model, x)
    assert heat.shape == (2, 32, 32) and np.isfinite(heat).all()
    assert heat.min() >= 0 and heat.max() <= 1 + 1e-6
    with torch.no_grad():
        before = model(x)
    assert torch.equal(before, model(x))  # the model itself is untouched (no hooks left, same output)


def test_last_conv_of_a_study_model_is_its_fourth_conv() -> None:
    model = get_model("cnn4x32", num_classes=4, image_size=32)
    assert last_conv(model, torch.zeros(1, 3, 32, 32))[0] == "features.3.0"  # block 4's conv
    old = get_model("cnn4x32", num_classes=4, image_size=32, pool_first=False)
    assert last_conv(old, torch.zeros(1, 3, 32, 32))[0] == "features.6.0"  # pools between blocks


def test_grad_cam_points_at_the_evidence() -> None:
    # A model whose class 0 score is the mean brightness: the map must peak where the image is bright.
    model = nn.Sequential(nn.Conv2d(3, 1, 1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
        model[4].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model[4].bias.zero_()
    x = torch.zeros(1, 3, 32, 32)
    x[..., 20:28, 4:12] = 1.0
    heat = GradCAM(model, x)(x, target=0)[0]
    assert heat[20:28, 4:12].mean() > 0.9 and heat[:16, 16:].max() < 0.1
    assert np.unravel_index(heat.argmax(), heat.shape)[0] in range(18, 30)


def test_overlay_png_is_a_png_of_the_original_shape(images) -> None:
    arr = load_image(str(images[0]), 32)
    png = overlay_png(arr, np.linspace(0, 1, 32 * 32).reshape(32, 32), original=images[0].read_bytes())
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert abs(im.width / im.height - 48 / 36) < 0.05  # squash: back to the file's aspect ratio


# --- CLI -----------------------------------------------------------------------------------------
