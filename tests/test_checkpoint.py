"""checkpoint: one format that rebuilds its model from the file alone, old layouts included."""

from __future__ import annotations

import pytest
import torch
from conftest import quiet, tiny

from bloodcell.errors import BloodcellError
from bloodcell.models import get_model
from bloodcell.models.checkpoint import load_model, read_checkpoint
from bloodcell.training.train import train


def test_checkpoint_rebuilds_model_alone(tmp_path):
    train(tiny(), tmp_path / "r", log=quiet, progress=False)
    model, meta = load_model(tmp_path / "r")
    assert meta["classes"] == ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    assert meta["image_size"] == 32 and meta["model"]["name"] == "cnn2x32"
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_checkpoints_from_before_pool_first_still_load(tmp_path):
    """A checkpoint whose kwargs do not name pool_first (written before the option) rebuilds the old
    layer order; resuming or --init-from across the two orders is refused with a clear error."""
    train(tiny(epochs=1), tmp_path / "a", log=quiet, progress=False)
    ck = read_checkpoint(tmp_path / "a" / "best.pt")
    assert ck["model"]["kwargs"]["pool_first"] is True
    old = get_model(ck["model"]["name"], **{**ck["model"]["kwargs"], "pool_first": False})
    ck["model"]["kwargs"].pop("pool_first")
    ck["state_dict"] = old.state_dict()
    torch.save(ck, tmp_path / "old.pt")
    model, _ = load_model(tmp_path / "old.pt")
    assert isinstance(model.features[1], torch.nn.MaxPool2d)  # conv-BN-ReLU, then the pool
    ck_new = read_checkpoint(tmp_path / "a" / "best.pt")
    ck_new["model"]["kwargs"].pop("pool_first")  # a hand-written checkpoint of today's order
    torch.save(ck_new, tmp_path / "new.pt")
    model, _ = load_model(tmp_path / "new.pt")
    assert isinstance(model.features[0][1], torch.nn.MaxPool2d)
    with pytest.raises(BloodcellError, match="layer order"):
        train(tiny(epochs=1, init_from=str(tmp_path / "old.pt")), tmp_path / "b", log=quiet, progress=False)
    assert not (tmp_path / "b").exists()  # refused before writing: no half-made run to clear
    train(tiny(epochs=1, init_from=str(tmp_path / "new.pt")), tmp_path / "b", log=quiet, progress=False)
    torch.save(ck, tmp_path / "a" / "last.pt")
    (tmp_path / "a" / "DONE").unlink()
    with pytest.raises(BloodcellError, match="another model layout"):
        train(tiny(epochs=2), tmp_path / "a", resume=True, log=quiet, progress=False)
