"""data.loader: BatchLoader batches."""

from __future__ import annotations

import torch

from bloodcell.data import BatchLoader, load_dataset


def test_loader_shapes_dtypes_and_determinism():
    ds = load_dataset("synthetic:120", image_size=32, seed=0)
    assert set(ds.splits) == {"train", "val", "test"}
    tr = ds.splits["train"]
    loader = BatchLoader(tr, 16, shuffle=True, augment="strong", seed=5)
    loader.set_epoch(1)
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.isfinite(x).all() and -3 < x.mean() < 3
    loader.set_epoch(1)
    x2, y2 = next(iter(loader))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    loader.set_epoch(2)
    x3, _ = next(iter(loader))
    assert not torch.equal(x, x3)
    plain = BatchLoader(tr, 16)
    total = sum(len(yb) for _, yb in plain)
    assert total == len(tr) and len(plain) == -(-len(tr) // 16)
