#!/usr/bin/env python
"""python bench/precision_speed.py [--models a@px,b@px] [--rounds 3] [--steps 6] [--threads 0]

bf16 autocast against fp32 on this CPU, for every registered model: images/s of one training step
(forward, backward, AdamW; batch 64, channels-last) and of inference (no grad, eval mode,
batch 64), the two precisions interleaved in each round, each round a fresh model with the same
seed, 2 untimed steps first, the median step of ``--steps`` timed ones; the best round is kept.

It is the measurement behind ``runtime.resolve_precision``'s rule that ``--precision auto`` trains
a depthwise model (MobileNetV3, EfficientNet) in fp32 on a CPU without AMX (and scores every model
in bf16). Random
inputs: the speed does not depend on the pixels. Writes bench/out/precision_speed.md and .json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from _common import OUT, machine_info, machine_md, md_table, write_outputs

from bloodcell.models import get_model, list_models
from bloodcell.runtime import autocast, bf16_supported, cpu_has_amx, depthwise, set_threads

DEFAULT = "cnn2x32@64,cnn4x32@64,cnn4x64@64,vgg3@64,resnet18@64,mobilenet_v3_small@128,efficientnet_b0@128"
BATCH = 64


def rate(name: str, px: int, precision: str, train: bool, steps: int) -> float:
    """Images/s of the median timed step (after 2 untimed ones)."""
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    model = get_model(name, 4, image_size=px).to(memory_format=torch.channels_last).train(train)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(BATCH, 3, px, px).to(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (BATCH,))
    times = []
    for _ in range(2 + steps):
        t0 = time.perf_counter()
        if train:
            with autocast(cpu, precision):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.inference_mode(), autocast(cpu, precision):
                model(x)
        times.append(time.perf_counter() - t0)
    return BATCH / statistics.median(times[2:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT, help="MODEL@PX,... (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=0, help="0: the physical cores")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if not bf16_supported(torch.device("cpu")):
        print("this CPU has no native bf16: nothing to compare", file=sys.stderr)
        return 1
    specs = [spec.partition("@")[::2] for spec in args.models.split(",")]
    for name, px in specs:
        if name not in list_models() or not px.isdigit():
            ap.error(f"--models: {name}@{px} is not MODEL@PX with a registered model "
                     f"({', '.join(list_models())}) and a size in px")
    threads = set_threads(args.threads)
    rows, result = [], []
    for name, px in specs:
        best: dict[tuple[str, bool], float] = {}
        for r in range(args.rounds):
            order = ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")
            for train in (True, False):
                for prec in order:
                    v = rate(name, int(px), prec, train, args.steps)
                    best[prec, train] = max(best.get((prec, train), 0.0), v)
        dw = depthwise(get_model(name, 4, image_size=int(px)))
        res = {"model": name, "image_size": int(px), "depthwise": dw,
               **{f"{'train' if t else 'infer'}_{p}": round(v, 1) for (p, t), v in best.items()}}
        result.append(res)
        rows.append([name, px, "yes" if dw else "no",
                     f"{res['train_fp32']:.0f}", f"{res['train_bf16']:.0f}",
                     f"**{res['train_bf16'] / res['train_fp32']:.2f}**",
                     f"{res['infer_fp32']:.0f}", f"{res['infer_bf16']:.0f}",
                     f"**{res['infer_bf16'] / res['infer_fp32']:.2f}**"])
        print(" ".join(str(c) for c in rows[-1]), flush=True)
    info = machine_info() | {"amx": cpu_has_amx(), "threads": threads}
    headers = ["model", "px", "depthwise", "train fp32 img/s", "train bf16 img/s", "bf16 / fp32",
               "infer fp32 img/s", "infer bf16 img/s", "bf16 / fp32"]
    md = (machine_md(info) + f"\n\nAMX: {'yes' if info['amx'] else 'no'}; {threads} threads; batch {BATCH}; "
          f"best of {args.rounds} interleaved rounds\n\n" + md_table(headers, rows, "llrrrrrrr"))
    write_outputs(args.out, "precision_speed", md, {"machine": info, "models": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
