#!/usr/bin/env python
"""python bench/step_levers.py [--size 48] [--batch 64] [--threads 2]

The training-step levers RESULTS quotes for a CPU, measured on random inputs (the model's step alone:
forward, backward, AdamW), best of 3 rounds, in the precision given (fp32 unless --bf16):
- channels-last against NCHW, for vgg3, cnn4x64 and resnet18;
- ResNet-18's stems at that size (small: one 3x3 conv, no max-pool; imagenet: torchvision's), with
  each one's training FLOPs per image (FlopCounterMode, forward + backward);
- the `strong` augmentation of one batch, from the uint8 cache's layout to a normalised float batch.
Run it under ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` to time the kernels a CPU with AVX2
alone runs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bloodcell.data.transforms import augment, normalize, to_float
from bloodcell.models.registry import get_model
from bloodcell.runtime import autocast


def step_rate(model, size: int, batch: int, channels_last: bool, precision: str, rounds: int = 3) -> float:
    """Training images/s of ``model``'s step (best of ``rounds`` rounds of a few steps)."""
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 4, (batch,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)

    def step():
        opt.zero_grad()
        with autocast(torch.device("cpu"), precision):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(3):
            step()
        best = min(best, (time.perf_counter() - t) / 3)
    return batch / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prec = "bf16" if args.bf16 else "fp32"
    print(f"{torch.backends.cpu.get_cpu_capability()} kernels, {args.threads} threads, batch {args.batch}, "
          f"{args.size} px, {prec}")
    for name in ("vgg3", "cnn4x64", "resnet18"):
        rates = {cl: step_rate(get_model(name, 4, image_size=args.size), args.size, args.batch, cl, prec)
                 for cl in (True, False)}
        print(f"{name}: channels-last {rates[True]:.0f} img/s, NCHW {rates[False]:.0f} img/s")
    for stem in (True, False):
        model = get_model("resnet18", 4, image_size=args.size, small_stem=stem)
        with FlopCounterMode(display=False) as flops:
            model(torch.randn(2, 3, args.size, args.size)).sum().backward()
        print(f"resnet18, {'small' if stem else 'imagenet'} stem: {flops.get_total_flops() / 2e9:.2f} GFLOP a "
              f"training image, {step_rate(model, args.size, args.batch, True, prec):.0f} img/s")
    x8 = torch.randint(0, 255, (args.batch, args.size, args.size, 3), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(20):
            normalize(augment(to_float(x8), "strong", g))
        best = min(best, (time.perf_counter() - t) / 20)
    print(f"strong augmentation: {1000 * best:.2f} ms a batch")


if __name__ == "__main__":
    main()
