"""Every registered model builds and runs at several sizes; the registry refuses what it should."""

import pytest
import torch
from torch import nn

from bloodcell.models import (
    StainNorm,
    StainNormed,
    count_parameters,
    get_model,
    list_models,
    model_info,
    register_model,
)

STUDY = ["cnn2x32", "cnn4x64", "cnn4x32", "vgg3"]


def test_registry_lists_the_expected_models() -> None:
    names = list_models()
    assert set(STUDY + ["resnet18", "efficientnet_b0", "mobilenet_v3_small", "mobilenet_v2"]) <= set(names)
    for name in names:
        info = model_info(name)
        assert set(info) == {"name", "description", "min_image_size", "family", "options"}
        assert info["name"] == name and info["description"] and info["min_image_size"] >= 1
    assert {model_info(n)["family"] for n in STUDY} == {"study"}


@pytest.mark.slow
@pytest.mark.parametrize("num_classes", [4, 8])
@pytest.mark.parametrize("image_size", [32, 64, 128])
@pytest.mark.parametrize("name", list_models())
def test_forward(name: str, image_size: int, num_classes: int) -> None:
    torch.manual_seed(0)
    model = get_model(name, num_classes=num_classes, image_size=image_size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, image_size, image_size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_models())
def test_channels_last_and_non_square(name: str) -> None:
    torch.manual_seed(0)
    model = get_model(name, num_classes=4, image_size=64).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'nope'; known: .*cnn2x32.*resnet18"):
        get_model("nope", num_classes=4)
    with pytest.raises(ValueError, match="known:"):
        model_info("nope")


def test_duplicate_registration_raises() -> None:
    def cnn2x32(num_classes: int, image_size: int = 64) -> nn.Module:
        """An impostor."""
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="already registered"):
        register_model(cnn2x32)
    assert model_info("cnn2x32")["description"].startswith("Study Model 1")


@pytest.mark.parametrize("name", list_models())
def test_too_small_image_or_too_few_classes_raise(name: str) -> None:
    min_size = model_info(name)["min_image_size"]
    with pytest.raises(ValueError, match=f"image_size >= {min_size}"):
        get_model(name, num_classes=4, image_size=min_size - 1)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        get_model(name, num_classes=1)


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="norm"):
        get_model("cnn4x32", num_classes=4, norm="layer")
    with pytest.raises(ValueError, match="baselines need batch or group"):
        get_model("resnet18", num_classes=4, norm="none")
    with pytest.raises(TypeError):
        get_model("resnet18", num_classes=4, dropout=0.1)


@pytest.mark.parametrize("name", list_models())
def test_norm_group_replaces_every_batchnorm(name: str) -> None:
    """--norm group in every registered model: no BatchNorm left, GroupNorm in its place, and the
    output of an image does not depend on the other images of its batch (per-image statistics)."""
    torch.manual_seed(0)
    model = get_model(name, num_classes=4, image_size=64, norm="group").train()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    model.eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)


def test_norm_none_has_no_batchnorm() -> None:
    plain = get_model("vgg3", num_classes=4, norm="none")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in get_model("vgg3", num_classes=4).modules())


def test_parameter_counts() -> None:
    counts = {name: count_parameters(get_model(name, 4, 64)) for name in list_models()}
    assert all(c > 0 for c in counts.values())
    assert counts["cnn2x32"] < counts["cnn4x64"]


def test_local_weights_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    source = get_model("resnet18", num_classes=4, image_size=64)
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="shape differs.*fc.weight, fc.bias"):
        target = get_model("resnet18", num_classes=8, image_size=64, weights=path)
    src, tgt = source.state_dict(), target.state_dict()
    for key in src:
        if not key.startswith("fc."):
            assert torch.equal(src[key], tgt[key]), key
    assert tgt["fc.weight"].shape == (8, 512)
    torch.manual_seed(1)
    fresh = get_model("resnet18", num_classes=8, image_size=64)
    assert torch.equal(fresh.state_dict()["fc.weight"], tgt["fc.weight"])


def test_training_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    model = get_model("cnn4x32", num_classes=4, image_size=32, dropout=0.0).train()
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        before = loss_fn(model(x), y).item()
    for _ in range(5):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        after = loss_fn(model(x), y).item()
    assert after < before * 0.9


def _copy_by_kind(src: nn.Module, dst: nn.Module) -> None:
    """Copy weights between the two layer orders, matching layers of one kind in module order."""
    for kind in (nn.Conv2d, nn.BatchNorm2d, nn.Linear):
        pairs = zip([m for m in src.modules() if isinstance(m, kind)],
                    [m for m in dst.modules() if isinstance(m, kind)], strict=True)
        for a, b in pairs:
            b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("name", STUDY)
def test_pool_first_is_the_same_function_where_pooling_commutes(name: str) -> None:
    """conv-pool-BN-ReLU equals conv-BN-ReLU-pool in eval mode when every BatchNorm scale is positive
    (max-pooling commutes with a per-channel increasing map), and always without BatchNorm; with a
    negative scale it does not, so the check can fail."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, 64, 64)
    for norm in ("batch", "none"):
        late = get_model(name, num_classes=4, norm=norm, pool_first=False).eval()
        early = get_model(name, num_classes=4, norm=norm).eval()
        for m in late.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
        _copy_by_kind(late, early)
        with torch.no_grad():
            torch.testing.assert_close(early(x), late(x), rtol=1e-4, atol=1e-5)
    bns = [m for m in early.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not bns  # the last loop ran with norm="none"
    late = get_model(name, num_classes=4, pool_first=False).eval()
    for m in late.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(-1.0)
    early = get_model(name, num_classes=4).eval()
    _copy_by_kind(late, early)
    with torch.no_grad():
        assert not torch.allclose(early(x), late(x), atol=1e-3)


def test_pool_first_pools_before_normalising() -> None:
    kinds = [type(m) for m in get_model("cnn4x32", num_classes=4).features.modules()
             if not isinstance(m, nn.Sequential)]
    assert kinds[:4] == [nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU]
    kinds = [type(m) for m in get_model("vgg3", num_classes=4).features.modules()
             if not isinstance(m, nn.Sequential)]
    # a block's first convolution is not followed by a pool; its last is, before the BatchNorm
    assert kinds[:7] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU]
    old = [type(m) for m in get_model("cnn4x32", num_classes=4, pool_first=False).features.modules()
           if not isinstance(m, nn.Sequential)]
    assert old[:4] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]


def test_stain_norm_removes_a_per_channel_cast() -> None:
    """image: a gain and an offset per colour channel (a stain's or a lamp's cast) leave the output
    as it was, and each channel comes out at mean 0, spread 1; gray: one grey level on all three
    channels, unchanged by a common gain and offset."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 24, 20) * torch.tensor([0.8, 1.1, 0.9]).view(1, 3, 1, 1)
    gain = torch.tensor([0.6, 1.3, 0.9]).view(1, 3, 1, 1)
    offset = torch.tensor([0.4, -0.7, 0.1]).view(1, 3, 1, 1)
    image = StainNorm("image")
    y = image(x)
    torch.testing.assert_close(image(x * gain + offset), y, atol=5e-3, rtol=0)
    torch.testing.assert_close(y.mean((2, 3)), torch.zeros(4, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std((2, 3), unbiased=False), torch.ones(4, 3), atol=5e-3, rtol=0)
    gray = StainNorm("gray")
    g = gray(x)
    assert g.shape == x.shape and torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 0], g[:, 2])
    torch.testing.assert_close(gray(x * 0.5 + 0.3), g, atol=1e-3, rtol=1e-2)
    flat = image(torch.full((1, 3, 8, 8), 0.7))  # no spread at all: finite, near 0, no NaN
    assert torch.isfinite(flat).all() and flat.abs().max() < 1e-3


def test_stain_norm_wraps_any_model_and_refuses_unknown_modes() -> None:
    for name in ("cnn4x32", "resnet18"):
        net = get_model(name, num_classes=4, image_size=32, stain_norm="image").eval()
        assert isinstance(net, StainNormed) and isinstance(net.stain, StainNorm)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(net(x * 2.0 - 1.0), net(x), atol=1e-3, rtol=1e-3)
    assert not isinstance(get_model("cnn4x32", num_classes=4), StainNormed)
    with pytest.raises(ValueError, match="stain_norm"):
        get_model("cnn4x32", num_classes=4, stain_norm="macenko")


def test_group_norm_uses_each_images_own_statistics() -> None:
    torch.manual_seed(0)
    net = get_model("cnn4x32", num_classes=4, image_size=32, norm="group", dropout=0.0).eval()
    assert any(isinstance(m, nn.GroupNorm) for m in net.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        alone = torch.cat([net(x[i:i + 1]) for i in range(6)])
        # in training mode too, an image's output does not depend on the batch it is in (batch norm's does)
        net.train()
        torch.testing.assert_close(net(x), alone)
    bn = get_model("cnn4x32", num_classes=4, image_size=32, dropout=0.0).train()
    with torch.no_grad():
        assert not torch.allclose(bn(x)[:1], bn(x[:1].repeat(6, 1, 1, 1))[:1])


def test_lab_stain_norm_gives_every_image_the_reference_colour_statistics() -> None:
    """Reinhard's transfer: two renderings of one image under different lamps (a gain per cone
    channel, von Kries) come out alike, at the reference l-alpha-beta statistics, colour kept."""
    from bloodcell.models.registry import LAB_REFERENCE_MEAN, LOG_LMS_TO_LAB, RGB_TO_LMS, reinhard

    torch.manual_seed(0)
    base = torch.rand(2, 3, 32, 32) * 0.3 + 0.35
    gain = torch.diag(torch.tensor([0.9, 1.0, 1.08]))
    cast = torch.einsum("ij,njhw->nihw", torch.linalg.inv(RGB_TO_LMS) @ gain @ RGB_TO_LMS, base)
    assert 0 <= cast.min() and cast.max() <= 1
    a, b = reinhard(base), reinhard(cast)
    assert a.shape == base.shape and torch.isfinite(a).all() and (a >= 0).all() and (a <= 1).all()
    torch.testing.assert_close(a, b, atol=1e-3, rtol=0)  # a gain in LMS is a shift in log LMS
    lab = torch.einsum("ij,njhw->nihw", LOG_LMS_TO_LAB, torch.einsum("ij,njhw->nihw", RGB_TO_LMS, a).log10())
    torch.testing.assert_close(lab.mean((2, 3)), torch.tensor([LAB_REFERENCE_MEAN] * 2), atol=0.02, rtol=0)
    assert (a[:, 0] - a[:, 2]).abs().mean() > 0.01  # colour kept, not grey
    net = get_model("cnn4x32", num_classes=4, image_size=32, stain_norm="lab").eval()
    from bloodcell.catalog import MEAN, STD
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(net((base - m) / s), net((cast - m) / s), atol=0.05, rtol=0.05)
