#!/usr/bin/env python
"""Usage: python bench/train_speed.py [--data PATH] [--configs cnn4x32@64,vgg3@64,resnet18@64,resnet18@128]
                                   [--rounds 3] [--steps 10] [--min-seconds 5] [--warmup 2] [--no-compile]
                                   [--no-layer-order] [--quick]

Training throughput of bloodcell's engine against a plain PyTorch loop, on the Kaggle blood cells.

- bloodcell: ``load_dataset(path, image_size=S)`` decodes every image once into the memory-mapped
  uint8 cache (timed on its own, in a fresh temporary cache folder, and reported as images/s), then
  ``BatchLoader(train, 64, shuffle=True, augment="strong", seed=0, drop_last=True)`` feeds
  ``engine.train_one_epoch`` with a ``Step``: AdamW from ``make_optimizer``, precision
  ``resolve_precision("auto")`` (bf16 autocast where the CPU has native bf16), channels-last.
- reference, written the plain way: torchvision ``ImageFolder`` on TRAIN with PIL transforms
  (Resize((S, S)), RandomHorizontalFlip, RandomVerticalFlip, ToTensor, Normalize), a
  ``DataLoader(batch_size=64, shuffle=True, num_workers=2, drop_last=True)`` that decodes the JPEGs
  every epoch, fp32 eager, NCHW; the same model (``get_model``, same seed), the same AdamW
  (``make_optimizer`` with the training defaults) and cross-entropy.

Both run in this process, one after the other, interleaved: for each configuration, ``--rounds``
rounds of (reference, bloodcell) -- the order alternates between rounds -- each round ``--warmup``
steps not timed, then timed steps of batch 64: at least ``--steps`` and at least ``--min-seconds``.
The reference's DataLoader is started afresh every round and shut down at its end, so its workers
never run during bloodcell's turn.
Reported: median images/s over rounds [min-max] and the ratio bloodcell / reference.

A third contender (unless ``--no-compile``): the same engine with ``torch.compile(model)`` (inductor,
default mode), its own model and batches, its compile time (the first two steps) and the images a
run must train before compiling pays back, so the engine's default (eager) rests on a measurement.

FLOP rate: the training FLOPs per image are counted by ``torch.utils.flop_counter.FlopCounterMode``
around one forward + backward pass (convolutions and matrix products; a multiply-add is 2 FLOPs),
times the images/s, as a share of this machine's dense matmul peak measured here (a square
``torch.mm`` loop, fp32 and bf16, at the physical core count, best of several, before and after).

A fourth (unless ``--no-layer-order``), for the study's models: the same engine with the model in
its earlier layer order (``pool_first=False``: conv, BN, ReLU, max-pool), so the default's
pool-first order rests on a measurement too.

Writes bench/out/train_speed.md and .json (bench/out/train_speed-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (
    OUT,
    default_data,
    endless,
    machine_info,
    machine_md,
    md_table,
    sample_items,
    write_outputs,
)
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets
from torchvision import transforms as T

from bloodcell.catalog import MEAN, STD
from bloodcell.config import TrainConfig
from bloodcell.data import BatchLoader, discover_grouped, load_dataset
from bloodcell.models import get_model, model_info
from bloodcell.runtime import resolve_precision, set_threads
from bloodcell.training.engine import Step, make_optimizer, train_one_epoch

DEFAULT_CONFIGS = "cnn4x32@64,vgg3@64,resnet18@64,resnet18@128"
QUICK_CONFIGS = "cnn4x32@32,vgg3@32"  # resnet18 alone takes ~20 s of CPU per round
BATCH = 64
REF_WORKERS = 2


def parse_configs(text: str) -> list[tuple[str, int]]:
    """'cnn4x32@64,resnet18@128' -> [('cnn4x32', 64), ('resnet18', 128)]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("@")
        if not size.isdigit():
            raise SystemExit(f"--configs: expected MODEL@SIZE, got {part!r}")
        out.append((name, int(size)))
    return out


# ---------------------------------------------------------------------------------------------
# the machine's peak and the models' FLOPs


def matmul_gflops(n: int, dtype: torch.dtype, seconds: float, repeats: int) -> float:
    """Best GFLOP/s of an n x n x n torch.mm loop over ``repeats`` timings of about ``seconds`` each."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    c = torch.empty(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=c)
    best = 0.0
    for _ in range(repeats):
        k, t0 = 0, time.perf_counter()
        while (el := time.perf_counter() - t0) < seconds or k < 2:
            torch.mm(a, b, out=c)
            k += 1
        best = max(best, 2 * n**3 * k / el / 1e9)
    return best


def measure_peak(n: int, seconds: float, repeats: int, bf16: bool = True) -> dict[str, float]:
    """Dense matmul peak in GFLOP/s, fp32 and bf16 (bf16 timings interleaved with fp32 ones); bf16
    is NaN on a CPU without native bf16 (emulated, it takes minutes and is no one's peak)."""
    peak = {"fp32": 0.0, "bf16": 0.0 if bf16 else float("nan")}
    for _ in range(repeats):
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            if name == "fp32" or bf16:
                peak[name] = max(peak[name], matmul_gflops(n, dt, seconds, 1))
    return peak


def pct(rate: float, peak: float) -> str:
    """``rate`` as a share of ``peak`` ("-" where that peak was not measured)."""
    return "-" if math.isnan(peak) else f"{100 * rate / peak:.1f} %"


def train_flops_per_image(name: str, size: int, classes: int, batch: int = 4) -> tuple[float, float]:
    """(training, forward) FLOPs per image: forward + backward counted directly, fp32, train mode."""
    torch.manual_seed(0)
    model = get_model(name, num_classes=classes, image_size=size).train()
    x, y = torch.randn(batch, 3, size, size), torch.arange(batch) % classes
    with FlopCounterMode(display=False) as fwd:
        logits = model(x)
    with FlopCounterMode(display=False) as bwd:
        F.cross_entropy(logits, y).backward()
    f, b = fwd.get_total_flops(), bwd.get_total_flops()
    return (f + b) / batch, f / batch



# Where a bloodcell training step spends its time, by kind of operation (self CPU time of the
# profiler's ATen ops). First match wins; everything else is "other".
OP_KINDS = (
    ("convolution", ("convolution", "conv2d", "mkldnn_conv")),
    ("matmul", ("addmm", "aten::mm", "aten::bmm", "linear")),
    ("batch norm", ("batch_norm",)),
    ("activation, pooling", ("relu", "clamp_min", "threshold", "pool", "hardswish", "hardsigmoid", "silu",
                             "sigmoid")),
    ("optimizer", ("addcdiv", "addcmul", "lerp", "sqrt", "_foreach", "mul_", "div_", "zero_")),
    ("augmentation", ("grid_sampler", "affine_grid", "flip", "aten::where")),
)


def time_breakdown(model, step: Step, batches, steps: int = 5) -> dict[str, float]:
    """Seconds per step by kind of operation, over ``steps`` profiled bloodcell steps."""
    from torch.profiler import ProfilerActivity, profile

    train_one_epoch(model, itertools.islice(batches, 1), step)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        train_one_epoch(model, itertools.islice(batches, steps), step)
        wall = time.perf_counter() - t0
    kinds = dict.fromkeys([k for k, _ in OP_KINDS] + ["other"], 0.0)
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        kind = next((k for k, pats in OP_KINDS if any(pt in ev.key for pt in pats)), "other")
        kinds[kind] += ev.self_cpu_time_total / 1e6 / steps
    # what no ATen op accounts for: Python, the data loader's numpy reads, profiler overhead
    kinds["other"] += max(0.0, wall / steps - sum(kinds.values()))
    return kinds


# ---------------------------------------------------------------------------------------------
# the two training loops


def reference_loader(train_dir: Path, size: int, keep: set[str] | None, seed: int):
    """ImageFolder on TRAIN + PIL transforms + DataLoader(64, shuffle, 2 workers): the plain way."""
    tf = T.Compose([T.Resize((size, size)), T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
                    T.ToTensor(), T.Normalize(MEAN, STD)])
    data = datasets.ImageFolder(str(train_dir), transform=tf)
    if keep is not None:
        data = torch.utils.data.Subset(
            data, [i for i, (p, _) in enumerate(data.samples) if os.path.realpath(p) in keep])
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True, num_workers=REF_WORKERS,
                                       drop_last=True, generator=torch.Generator().manual_seed(seed))


def reference_round(model, optimizer, loader, warmup: int, steps: int, min_seconds: float) -> float:
    """Images/s of the plain loop over at least ``steps`` steps and ``min_seconds`` after ``warmup``;
    fresh DataLoader workers."""
    model.train()
    batches = endless(loader)
    for x, y in itertools.islice(batches, warmup):
        plain_step(model, optimizer, x, y)
    done, t0 = 0, time.perf_counter()
    while done < steps or time.perf_counter() - t0 < min_seconds:
        plain_step(model, optimizer, *next(batches))
        done += 1
    secs = time.perf_counter() - t0
    batches.close()  # ends the DataLoader iterator: its workers exit before bloodcell's turn
    return done * BATCH / secs


def plain_step(model, optimizer, x, y) -> None:
    """One step of the plain loop."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    loss.item()  # a plain loop logs its running loss, as the engine does


def bloodcell_round(model, step: Step, batches, warmup: int, steps: int, min_seconds: float) -> float:
    """Images/s of engine.train_one_epoch over at least ``steps`` steps and ``min_seconds`` (in
    chunks of ``steps``) after ``warmup`` untimed ones."""
    if warmup:
        train_one_epoch(model, itertools.islice(batches, warmup), step)
    images, secs = 0, 0.0
    while images < steps * BATCH or secs < min_seconds:
        r = train_one_epoch(model, itertools.islice(batches, steps), step)
        images, secs = images + steps * BATCH, secs + r["seconds"]
    return images / secs


def bench_config(name: str, size: int, ds, train_dir: Path, keep, args, precision: str) -> dict:
    """Interleaved rounds of reference and bloodcell (and bloodcell + torch.compile) for one model."""
    classes, cfg = len(ds.classes), TrainConfig()

    def bloodcell_setup(compiled: bool, **model_kw):
        torch.manual_seed(0)
        model = get_model(name, num_classes=classes, image_size=size, **model_kw)
        model = model.to(memory_format=torch.channels_last)
        step = Step(make_optimizer(model, "adamw", cfg.lr, cfg.weight_decay, cfg.momentum), None,
                    torch.device("cpu"), precision, channels_last=True)
        loader = BatchLoader(ds.splits["train"], BATCH, shuffle=True, augment="strong", seed=0, drop_last=True)
        batches = endless(loader)
        compile_s = None
        if compiled:  # the compiled module shares its parameters with ``model``; the first steps compile
            model = torch.compile(model)
            t0 = time.perf_counter()
            train_one_epoch(model, itertools.islice(batches, 2), step)
            compile_s = time.perf_counter() - t0
        return model, step, batches, compile_s

    torch.manual_seed(0)
    ref_model = get_model(name, num_classes=classes, image_size=size)
    ref_opt = make_optimizer(ref_model, "adamw", cfg.lr, cfg.weight_decay, cfg.momentum)
    ref_loader = reference_loader(train_dir, size, keep, seed=0)
    bc = bloodcell_setup(False)
    contenders = {"reference": [], "bloodcell": []}
    comp = None
    if args.compile:
        comp = bloodcell_setup(True)
        contenders["compiled"] = []
        print(f"  torch.compile: first two steps (compilation) {comp[3]:.1f} s", flush=True)
    late = None
    if args.layer_order and "pool_first" in model_info(name)["options"]:
        late = bloodcell_setup(False, pool_first=False)  # the study models' earlier layer order
        contenders["pool-last"] = []

    for r in range(args.rounds):
        order = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
        for who in order:
            if who == "reference":
                rate = reference_round(ref_model, ref_opt, ref_loader, args.warmup, args.steps, args.min_seconds)
            else:
                model, step, batches, _ = {"bloodcell": bc, "compiled": comp, "pool-last": late}[who]
                rate = bloodcell_round(model, step, batches, args.warmup, args.steps, args.min_seconds)
            contenders[who].append(rate)
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:,.1f} img/s" for k, v in contenders.items()),
              flush=True)
    flops, fwd = train_flops_per_image(name, size, classes)
    kinds = time_breakdown(bc[0], bc[1], bc[2])
    ref, bcs = contenders["reference"], contenders["bloodcell"]
    row = {"config": f"{name}@{size}", "model": name, "image_size": size,
           "reference_img_s": statistics.median(ref), "bloodcell_img_s": statistics.median(bcs),
           "reference_all": ref, "bloodcell_all": bcs,
           "ratio": statistics.median(bcs) / statistics.median(ref),
           "train_gflop_per_img": flops / 1e9, "forward_gflop_per_img": fwd / 1e9,
           "seconds_per_step_by_kind": kinds}
    if comp is not None:
        c = statistics.median(contenders["compiled"])
        saved_per_img = 1 / row["bloodcell_img_s"] - 1 / c  # seconds saved per image once compiled
        row.update({"compiled_img_s": c, "compiled_all": contenders["compiled"], "compile_s": comp[3],
                    "compiled_vs_eager": c / row["bloodcell_img_s"],
                    "break_even_images": comp[3] / saved_per_img if saved_per_img > 0 else None})
    if late is not None:
        p = statistics.median(contenders["pool-last"])
        row.update({"pool_last_img_s": p, "pool_last_all": contenders["pool-last"],
                    "pool_first_vs_last": row["bloodcell_img_s"] / p})
    return row


# ---------------------------------------------------------------------------------------------
# report


def spread(values: list[float]) -> str:
    return f" [{min(values):,.0f}-{max(values):,.0f}]" if len(values) > 1 else ""


def render(rows: list[dict], caches: list[dict], peak: dict, info: dict, args, precision: str,
           discover_s: float, n_items: int) -> str:
    """The Markdown report: setup, throughput table, cache build table, machine."""
    table = []
    for r in rows:
        g = r["train_gflop_per_img"]
        ref_rate, bc_rate = g * r["reference_img_s"], g * r["bloodcell_img_s"]
        table.append([
            r["config"],
            f"{r['reference_img_s']:,.1f}{spread(r['reference_all'])}",
            f"{r['bloodcell_img_s']:,.1f}{spread(r['bloodcell_all'])}",
            f"{r['ratio']:.2f}x",
            f"{g:.3f}",
            f"{ref_rate:,.1f} / {bc_rate:,.1f}",
            f"{pct(ref_rate, peak['fp32'])} / {pct(bc_rate, peak['fp32'])}",
            f"{pct(ref_rate, peak['bf16'])} / {pct(bc_rate, peak['bf16'])}",
        ])
    headers = ["config (model@px)", "reference img/s", "bloodcell img/s", "ratio", "GFLOP/img (train)",
               "achieved GFLOP/s (ref / bc)", "% of fp32 peak (ref / bc)", "% of bf16 peak (ref / bc)"]
    compile_rows = [[r["config"], f"{r['bloodcell_img_s']:,.1f}{spread(r['bloodcell_all'])}",
                     f"{r['compiled_img_s']:,.1f}{spread(r['compiled_all'])}", f"{r['compiled_vs_eager']:.2f}x",
                     f"{r['compile_s']:.0f}",
                     "never" if r["break_even_images"] is None else f"{r['break_even_images']:,.0f} images"]
                    for r in rows if "compiled_img_s" in r]
    compile_md = "" if not compile_rows else f"""
## torch.compile (inductor) against eager, same engine, same run

Each configuration also ran `torch.compile(model)` (default mode) through the same engine, interleaved \
with the two above. Compile time is the wall time of its first two steps. Break-even: the images a \
run must train before the compiled model has repaid its compile time ("never" when it is not faster).

{md_table(["config", "eager img/s", "compiled img/s", "compiled / eager", "compile s", "break-even"],
          compile_rows)}
"""
    order_rows = [[r["config"], f"{r['pool_last_img_s']:,.1f}{spread(r['pool_last_all'])}",
                   f"{r['bloodcell_img_s']:,.1f}{spread(r['bloodcell_all'])}", f"{r['pool_first_vs_last']:.2f}x"]
                  for r in rows if "pool_last_img_s" in r]
    order_md = "" if not order_rows else f"""
## The study models' layer order, same engine, same run

bloodcell's study models pool straight after a block's last convolution (conv, max-pool, BN, ReLU; \
`pool_first=True`, the default), so batch norm and ReLU run on a quarter of the values. The \
earlier order (conv, BN, ReLU, max-pool; `pool_first=False`) ran interleaved with the others:

{md_table(["config", "conv-BN-ReLU-pool img/s", "conv-pool-BN-ReLU img/s (default)", "speed-up"], order_rows)}
"""
    kind_names = list(rows[0]["seconds_per_step_by_kind"]) if rows else []
    kind_rows = []
    for r in rows:
        k = r["seconds_per_step_by_kind"]
        total = sum(k.values())
        conv_s = k["convolution"] + k["matmul"]
        conv_rate = r["train_gflop_per_img"] * BATCH / conv_s if conv_s > 0 else 0.0
        kind_rows.append([r["config"], f"{1e3 * total:.0f}"] + [f"{100 * k[n] / total:.0f} %" for n in kind_names]
                         + [f"{conv_rate:,.0f} ({pct(conv_rate, peak[precision])})"])
    breakdown_md = "" if not kind_rows else f"""
## Where bloodcell's step spends its time

Five profiled steps per configuration (torch.profiler, self CPU time of the ATen ops, grouped by \
kind; "other" includes what no op accounts for: Python, the loader's reads and augmentation, the \
profiler's own cost). The last column is the FLOP rate of the convolutions and matrix products \
alone, in the time they take (GFLOP/s, share of the peak of bloodcell's precision): the ceiling of the whole step's \
rate if everything else took no time.

{md_table(["config", "ms/step (profiled)"] + kind_names + ["conv + matmul GFLOP/s (of its precision's peak)"], kind_rows)}
"""
    cache_rows = [[f"{c['image_size']} px", f"{c['images']:,}", f"{c['seconds']:.1f}",
                   f"{c['img_s']:,.0f}"] for c in caches]
    mode = "QUICK development run (tiny sizes; figures not meaningful)\n\n" if args.quick else ""
    subset = (f"a seeded, class-stratified sample of {n_items:,} TRAIN images" if args.limit
              else f"all {n_items:,} images")
    return f"""# Training throughput: bloodcell engine vs a plain PyTorch loop

{mode}Batch {BATCH}; median of {args.rounds} interleaved round(s), each timing at least {args.steps} \
steps and {args.min_seconds:g} s after {args.warmup} untimed warm-up step(s), [min-max] over rounds. Ratio = bloodcell / reference.
bloodcell: memory-mapped uint8 cache -> BatchLoader(augment="strong") -> engine.train_one_epoch, \
{precision} autocast, channels-last, AdamW (make_optimizer). Reference: ImageFolder(TRAIN) + PIL \
transforms (Resize, RandomHorizontalFlip, RandomVerticalFlip, ToTensor, Normalize) + \
DataLoader(num_workers={REF_WORKERS}) decoding JPEGs every step, fp32, NCHW, same model and AdamW. \
Both use {info['torch_threads']} torch threads in the main process.

{md_table(headers, table)}

GFLOP/img counts one forward + backward (FlopCounterMode; convolutions and matrix products, a \
multiply-add = 2 FLOPs). Dense matmul peak of this machine (torch.mm {args.peak_size}x{args.peak_size}, \
{info['torch_threads']} threads, best of several): fp32 {peak['fp32']:,.0f} GFLOP/s, bf16 \
{peak['bf16']:,.0f} GFLOP/s (nan: not native here, not measured). The reference runs in fp32, bloodcell in {precision}: compare each with \
its own precision's peak.
{order_md}{breakdown_md}{compile_md}
## Decoded cache build (bloodcell.data.load_dataset, cold, {subset})

Listing and hashing the files (discover, not included below): {discover_s:.1f} s. Decoding into a \
fresh temporary cache folder (bloodcell's decoder: one process per CPU from 512 images up):

{md_table(["image size", "images", "seconds", "images/s"], cache_rows)}

## Machine

{machine_md(info)}
"""


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    """python bench/train_speed.py --quick"""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=default_data(), help="the Kaggle blood-cells folder (default: %(default)s)")
    ap.add_argument("--configs", help=f"MODEL@SIZE,... (default: {DEFAULT_CONFIGS})")
    ap.add_argument("--rounds", type=int, help="interleaved rounds per configuration (default 3)")
    ap.add_argument("--steps", type=int, help="timed steps per round (default 10)")
    ap.add_argument("--warmup", type=int, help="untimed steps at the start of each round (default 2)")
    ap.add_argument("--min-seconds", type=float,
                    help="a round times at least this long (more steps for fast models; default 5): "
                         "10-step windows of a 50 ms step vary by 40 %% on this shared machine")
    ap.add_argument("--limit", type=int, help="use a seeded sample of this many TRAIN images (default: all)")
    ap.add_argument("--peak-size", type=int, help="matmul size for the peak (default 2048)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: the physical cores")
    ap.add_argument("--quick", action="store_true",
                    help="a development run: cnn4x32 and vgg3 at 32 px, 256 images, 2 steps, 1 round")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip the third contender, bloodcell's engine with torch.compile(model)")
    ap.add_argument("--no-layer-order", dest="layer_order", action="store_false",
                    help="skip the fourth contender: the study models in their earlier layer order "
                         "(conv-BN-ReLU-pool)")
    ap.add_argument("--out", default=str(OUT), help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    quick = {"configs": QUICK_CONFIGS, "rounds": 1, "steps": 2, "warmup": 1, "limit": 256, "peak_size": 1024,
             "min_seconds": 0.0}
    full = {"configs": DEFAULT_CONFIGS, "rounds": 3, "steps": 10, "warmup": 2, "limit": 0, "peak_size": 2048,
            "min_seconds": 5.0}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    configs = parse_configs(args.configs)

    torch.manual_seed(0)
    threads = set_threads(args.threads)
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    info = machine_info()
    print(f"{info['cpu']}: {threads} threads, bloodcell precision {precision}, torch {torch.__version__}")

    peak_args = (args.peak_size, 0.1, 2, precision == "bf16") if args.quick else (args.peak_size, 0.5, 5, precision == "bf16")
    peak = measure_peak(*peak_args)
    print(f"matmul peak ({args.peak_size}^3): fp32 {peak['fp32']:,.0f} GFLOP/s, bf16 {peak['bf16']:,.0f} GFLOP/s")

    t0 = time.perf_counter()
    src = discover_grouped(args.data)
    discover_s = time.perf_counter() - t0
    train_items = [it for it in src.items if it.split == "train"]
    if not train_items:
        raise SystemExit(f"{args.data}: no TRAIN folder found (expected the Kaggle layout)")
    train_dir = Path(train_items[0].path).parents[1]
    keep = None
    if args.limit:
        src.items = sample_items(train_items, args.limit, seed=0)
        keep = {os.path.realpath(it.path) for it in src.items}

    rows, caches, datasets_by_size = [], [], {}
    cache_root = Path(tempfile.mkdtemp(prefix="bloodcell-train-speed-"))
    try:
        for size in sorted({s for _, s in configs}):
            t0 = time.perf_counter()
            ds = load_dataset(args.data, image_size=size, source=src, cache_dir=cache_root / str(size))
            secs = time.perf_counter() - t0
            caches.append({"image_size": size, "images": len(src.items), "seconds": secs,
                           "img_s": len(src.items) / secs})
            datasets_by_size[size] = ds
            print(f"cache {size} px: {len(src.items):,} images in {secs:.1f} s ({len(src.items) / secs:,.0f} img/s); "
                  f"train split {len(ds.splits['train']):,} images", flush=True)
        for name, size in configs:
            print(f"{name} @ {size} px", flush=True)
            rows.append(bench_config(name, size, datasets_by_size[size], train_dir, keep, args, precision))
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    if not args.quick:  # a second measurement: the best of both is the peak
        again = measure_peak(*peak_args)
        peak = {k: max(peak[k], again[k]) for k in peak}

    md = render(rows, caches, peak, info, args, precision, discover_s, len(src.items))
    stem = "train_speed-quick" if args.quick else "train_speed"
    result = {"machine": info, "peak_gflop_s": peak, "precision": precision, "batch_size": BATCH,
              "reference_workers": REF_WORKERS, "rounds": args.rounds, "steps": args.steps, "min_seconds": args.min_seconds,
              "warmup": args.warmup, "discover_s": discover_s, "cache": caches, "configs": rows}
    base = write_outputs(args.out, stem, md, result)
    print(f"wrote {base}.md and .json")
    return result


if __name__ == "__main__":
    main()
