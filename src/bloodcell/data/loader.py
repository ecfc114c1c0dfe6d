"""BatchLoader: shuffled, augmented, normalised float batches straight from the uint8 cache (labels
as class indices, or soft targets N x C where the batch is mixed).

With ``rank`` and ``world`` (several processes, torch.distributed) each process reads its own share:
a shuffled loader draws one order per epoch, the same on every rank, cuts it into batches of
``batch_size`` and gives each rank its slice of every batch (so every rank takes the same number of
steps and the optimiser sees ``batch_size`` images per step, as in one process); an ordered loader
gives each rank one contiguous block of the split (distributed.shard), every image exactly once."""

from __future__ import annotations

import numpy as np
import torch

from bloodcell.catalog import MEAN, STD
from bloodcell.data.transforms import augment, mix_batch, normalize, to_float


class BatchLoader:
    """Iterate over a split in batches; order and augmentation depend only on (seed, epoch);
    normalised with ``mean``/``std`` (info.MEAN/STD unless a pretrained model's own)."""

    def __init__(self, split, batch_size: int, shuffle: bool = False, augment: str = "none",
                 seed: int = 0, drop_last: bool = False, device: str | torch.device = "cpu", blur: float = 0.0,
                 mix: str = "none", mix_alpha: float = 1.0, num_classes: int = 0, stain_jitter: float = 0.0,
                 gray: float = 0.0, zoom: float = 0.0, rank: int = 0, world: int = 1, mean=MEAN, std=STD):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.images, self.labels = split.images, np.asarray(split.labels)
        self.rank, self.world = rank, world
        n = len(self.labels)
        # an ordered loader's block of the split: rows lo..hi (distributed.shard's bounds)
        bounds = np.linspace(0, n, world + 1).round().astype(int)
        self.block = (0, n) if shuffle else (int(bounds[rank]), int(bounds[rank + 1]))
        self.batch_size, self.shuffle, self.augment, self.blur = batch_size, shuffle, augment, blur
        self.seed, self.drop_last, self.device = seed, drop_last, torch.device(device)
        self.mix, self.mix_alpha, self.num_classes = mix, mix_alpha, num_classes
        self.stain_jitter, self.gray, self.zoom = stain_jitter, gray, zoom
        self.mean, self.std = tuple(mean), tuple(std)  # the model's normalisation (pretrained: the weights')
        if mix != "none" and num_classes < 2:
            raise ValueError("mix needs num_classes")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentation the next iteration reproduces."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.block[1] - self.block[0]
        batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        if self.world > 1 and self.shuffle and not self.drop_last and n % self.batch_size:
            batches -= n % self.batch_size < self.world  # a last batch too small to share: left out
        return batches

    def __iter__(self):
        lo, hi = self.block
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(hi - lo, generator=g).numpy() if self.shuffle else np.arange(lo, hi)
        if self.world > 1 and self.shuffle:  # the order is every rank's; the augmentation draws are its own
            g = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) * 1_009 + self.rank + 1)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            if self.world > 1 and self.shuffle:
                idx = np.array_split(idx, self.world)[self.rank]
            # Sorted reads from the memory map are sequential; the batch order is restored below.
            srt = np.sort(idx)
            pos = np.searchsorted(srt, idx)
            x = torch.from_numpy(np.ascontiguousarray(self.images[srt][pos]))
            y = torch.from_numpy(self.labels[idx].astype(np.int64))
            x = to_float(x.to(self.device, non_blocking=True))
            x = augment(x, self.augment, g, self.blur, self.stain_jitter, self.gray, self.zoom)
            y = y.to(self.device, non_blocking=True)
            if self.mix != "none":  # soft targets N x C
                x, y = mix_batch(x, y, self.num_classes, self.mix, self.mix_alpha, g)
            yield normalize(x, self.mean, self.std), y
