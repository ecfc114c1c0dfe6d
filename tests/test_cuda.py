"""The CUDA path: skipped without a GPU, run where one is lent (bench/RESULTS.md names the run).

Everything else in the suite runs on whichever device `auto` picks; these check what only a GPU
run can: that batches, augmentation, training, checkpoints and prediction agree with the CPU's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bloodcell.config import TrainConfig, make_config
from bloodcell.data.build import config_dataset
from bloodcell.data.loader import BatchLoader
from bloodcell.data.transforms import augment
from bloodcell.inference.cam import GradCAM
from bloodcell.inference.predict import Predictor
from bloodcell.models.checkpoint import load_model
from bloodcell.training.engine import evaluate
from bloodcell.training.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

CUDA = torch.device("cuda")
TINY = dict(data="synthetic:400", image_size=32, batch_size=16, epochs=4, model="cnn2x32", threads=1)


def quiet(msg: str) -> None:
    pass


@pytest.mark.parametrize("channels_last", [True, False])
def test_strong_on_the_gpu_equals_the_cpu(channels_last):
    torch.manual_seed(0)
    x = torch.rand(16, 3, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    cpu = augment(x, "strong", torch.Generator().manual_seed(3), blur=1.5)
    gpu = augment(x.to(CUDA), "strong", torch.Generator().manual_seed(3), blur=1.5)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4)


def test_loader_on_the_gpu_yields_the_cpu_batches():
    ds = config_dataset(make_config(TrainConfig, TINY))
    kw = dict(batch_size=16, shuffle=True, augment="strong", seed=1)
    on_cpu, on_gpu = BatchLoader(ds.splits["train"], **kw), BatchLoader(ds.splits["train"], **kw, device=CUDA)
    for (xc, yc), (xg, yg) in zip(on_cpu, on_gpu, strict=True):
        assert xg.device.type == "cuda" and yg.device.type == "cuda"
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-4)
        assert torch.equal(yg.cpu(), yc)


def test_a_gpu_run_learns_and_its_checkpoint_serves_on_the_cpu(tmp_path):
    cfg = make_config(TrainConfig, TINY, {"device": "cuda"})
    m = train(cfg, tmp_path / "r", log=quiet, progress=False)
    assert m["run"]["device"] == "cuda"
    assert m["run"]["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert m["test"]["accuracy"] > 0.5  # four synthetic classes: chance is 1/4

    # The checkpoint holds CPU tensors, so the CPU reads it and scores the same images alike.
    ds = config_dataset(cfg)
    model, _ = load_model(tmp_path / "r" / "best.pt", torch.device("cpu"))
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    cpu = evaluate(model, BatchLoader(ds.splits["test"], 256), torch.device("cpu"), "fp32")
    gpu = evaluate(model.to(CUDA), BatchLoader(ds.splits["test"], 256, device=CUDA), CUDA, "fp32")
    np.testing.assert_allclose(gpu["probs"], cpu["probs"], atol=1e-2)  # cuDNN may use TF32
    assert cpu["accuracy"] == pytest.approx(m["test"]["accuracy"], abs=0.05)  # bf16 vs fp32 scores


def test_predictor_and_saliency_on_the_gpu(tmp_path):
    train(make_config(TrainConfig, TINY, {"device": "cuda", "epochs": 1}), tmp_path / "r", log=quiet,
          progress=False)
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    on_cpu = Predictor(tmp_path / "r" / "best.pt", device="cpu", backend="torch")
    on_gpu = Predictor(tmp_path / "r" / "best.pt", device="cuda")
    assert on_gpu.backend == "torch"
    np.testing.assert_allclose(on_gpu.probs(images), on_cpu.probs(images), atol=1e-2)  # TF32
    x = on_cpu.preprocess(images[:1])
    heat_cpu = GradCAM(on_cpu.model, x)(x, 0)
    heat_gpu = GradCAM(on_gpu.model, x.to(CUDA))(x.to(CUDA), 0)
    assert heat_gpu.shape == heat_cpu.shape == (1, 32, 32)
    np.testing.assert_allclose(heat_gpu, heat_cpu, atol=5e-2)
    assert on_gpu.cam_png(images[0])[:8] == b"\x89PNG\r\n\x1a\n"
