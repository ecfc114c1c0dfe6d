#!/usr/bin/env python
"""Usage: python bench/scaling.py [--data PATH] [--subset 2000] [--sizes 32,64,96,128,160,224]
                               [--data-sizes 1000,10000,50000] [--steps 0] [--quick]

How bloodcell's training engine scales with image size and with data set size, on the Kaggle
blood cells: seconds per epoch and peak memory of cnn4x32, bf16 (where the CPU has it), batch 64,
BatchLoader(shuffle, augment="strong", drop_last) -> engine.train_one_epoch, AdamW, channels-last.

- Image size: a fixed, seeded, class-stratified sample of ``--subset`` TRAIN images (0: all of TRAIN)
  is decoded by bloodcell's cache builder at each size, and one epoch is trained on it.
- Data set size: TRAIN's decoded cache at ``--data-px`` (64) is tiled, in a seeded order, into a
  bigger uint8 .npy file on disk, written chunk by chunk (never whole in RAM), memory-mapped and
  wrapped in ``bloodcell.data.Split``; one epoch is trained on each.

Every point runs in a fresh Python process, so that its peak RSS (getrusage ru_maxrss) is its own.
Besides the peak, the largest anonymous and file-backed resident memory seen after each step
(/proc/self/status RssAnon, RssFile) are reported: pages of a memory-mapped file that have been read
count in RSS as file-backed pages (page cache the kernel can drop), while anonymous memory is what
the process really holds. An epoch is measured whole after ``--warmup`` untimed steps; with
``--steps N`` only N steps are timed and the epoch time is extrapolated (said in the output).

Writes bench/out/scaling.md, .json and .png (bench/out/scaling-quick.* with --quick). Decoded and
tiled caches live in a temporary folder that is removed at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import (
    OUT,
    default_data,
    machine_info,
    machine_md,
    md_table,
    peak_rss_mb,
    proc_status_mb,
    sample_items,
    write_outputs,
)

from bloodcell.config import TrainConfig
from bloodcell.data import BatchLoader, Split, discover_grouped
from bloodcell.data.cache import build_cache
from bloodcell.models import get_model
from bloodcell.runtime import resolve_precision, set_threads
from bloodcell.training.engine import Step, make_optimizer, train_one_epoch

FULL = {"sizes": "32,64,96,128,160,224", "subset": 2000, "data_sizes": "1000,10000,50000",
        "steps": 0, "warmup": 3}
QUICK = {"sizes": "32", "subset": 256, "data_sizes": "1000,4000", "steps": 2, "warmup": 1}


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


# ---------------------------------------------------------------------------------------------
# one point, in its own process


def watch_memory(batches, seen: dict):
    """Pass batches through, recording the largest RSS figures after each step."""
    for b in batches:
        yield b
        for k, v in proc_status_mb().items():
            seen[k] = max(seen.get(k, 0.0), v)


def run_point(spec: dict) -> dict:
    """Train one epoch (or ``steps`` steps) on a memory-mapped cache; seconds and memory figures."""
    threads = set_threads(spec["threads"])
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    images = np.load(spec["images"], mmap_mode="r")
    meta = np.load(spec["meta"])
    n = len(images)
    split = Split(images=images, labels=meta["labels"], groups=meta["groups"],
                  paths=[f"{spec['images']}#{i}" for i in range(n)])
    torch.manual_seed(0)
    cfg = TrainConfig()
    model = get_model(spec["model"], num_classes=spec["num_classes"], image_size=spec["image_size"])
    model.to(memory_format=torch.channels_last)
    step = Step(make_optimizer(model, "adamw", cfg.lr, cfg.weight_decay, cfg.momentum), None, device,
                precision, channels_last=True)
    loader = BatchLoader(split, spec["batch_size"], shuffle=True, augment="strong", seed=0, drop_last=True)
    before = proc_status_mb()
    loader.set_epoch(0)
    if spec["warmup"]:
        train_one_epoch(model, itertools.islice(loader, spec["warmup"]), step)
    loader.set_epoch(1)
    per_epoch = len(loader)
    steps = per_epoch if spec["steps"] <= 0 else min(spec["steps"], per_epoch)
    seen: dict[str, float] = {}
    r = train_one_epoch(model, watch_memory(itertools.islice(loader, steps), seen), step)
    return {"images": n, "image_size": spec["image_size"], "precision": precision, "threads": threads,
            "steps_per_epoch": per_epoch, "steps_timed": steps, "extrapolated": steps < per_epoch,
            "seconds_per_epoch": r["seconds"] * per_epoch / steps, "img_s": r["images_per_s"],
            "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before.get("VmRSS", 0.0),
            "anon_before_mb": before.get("RssAnon", 0.0), "file_before_mb": before.get("RssFile", 0.0),
            "anon_max_mb": seen.get("RssAnon", 0.0), "file_max_mb": seen.get("RssFile", 0.0),
            "cache_mb": Path(spec["images"]).stat().st_size / 2**20}


def point(spec: dict, folder: Path) -> dict:
    """run_point in a fresh interpreter (this script with --point), so peak RSS does not carry over."""
    f = folder / f"point-{spec['label']}.json"
    f.write_text(json.dumps(spec))
    res = subprocess.run([sys.executable, __file__, "--point", str(f)], stdout=subprocess.PIPE,
                         text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# caches


def decode(items, size: int, folder: Path, label: str) -> tuple[str, str, float]:
    """Decode items with bloodcell's cache builder; (images .npy, labels/groups .npz, seconds)."""
    t0 = time.perf_counter()
    images, errors, _ = build_cache(items, size, "squash", folder / "cache")
    secs = time.perf_counter() - t0
    ok = np.array([e is None for e in errors])
    if not ok.all():  # unreadable files: keep the readable rows in a cache of their own
        path = folder / f"{label}-readable.npy"
        np.save(path, images[np.flatnonzero(ok)])
        images = np.load(path, mmap_mode="r")
    kept = [it for it, k in zip(items, ok, strict=True) if k]
    group_ids = {g: i for i, g in enumerate(sorted({it.group for it in kept}))}
    meta = folder / f"{label}.meta.npz"
    np.savez(meta, labels=np.array([it.label for it in kept], dtype=np.int64),
             groups=np.array([group_ids[it.group] for it in kept], dtype=np.int64))
    return str(images.filename), str(meta), secs


def tile(images_path: str, meta_path: str, n: int, folder: Path, chunk: int = 2048) -> tuple[str, str]:
    """A cache of n rows repeating the given one in a seeded order, written chunk by chunk."""
    base = np.load(images_path, mmap_mode="r")
    meta = np.load(meta_path)
    rows = np.random.default_rng(0).permutation(len(base))[np.arange(n) % len(base)]
    out = folder / f"tiled-{n}.npy"
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (n, *base.shape[1:])}
    with open(out, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for i in range(0, n, chunk):
            r = rows[i:i + chunk]
            srt = np.sort(r)  # sequential reads from the base map; the order is restored below
            f.write(np.ascontiguousarray(base[srt][np.searchsorted(srt, r)]).tobytes())
    out_meta = folder / f"tiled-{n}.meta.npz"
    np.savez(out_meta, labels=meta["labels"][rows], groups=meta["groups"][rows])
    return str(out), str(out_meta)


# ---------------------------------------------------------------------------------------------
# report


def render(by_size: list[dict], by_n: list[dict], info: dict, args, setup: dict) -> str:
    """The Markdown report."""
    how = ("one whole epoch timed" if not any(r["extrapolated"] for r in by_size + by_n)
           else f"{args.steps} steps timed, extrapolated to an epoch")
    size_rows = [[f"{r['image_size']} px", f"{r['images']:,}", r["steps_per_epoch"],
                  f"{r['seconds_per_epoch']:.1f}", f"{r['img_s']:,.0f}", f"{r['cache_mb']:,.0f}",
                  f"{r['peak_rss_mb']:,.0f}", f"{r['anon_max_mb']:,.0f}", f"{r['file_max_mb']:,.0f}"]
                 for r in by_size]
    n_rows = [[f"{r['images']:,}", f"{r['cache_mb']:,.0f}", r["steps_per_epoch"],
               f"{r['seconds_per_epoch']:.1f}", f"{r['img_s']:,.0f}",
               f"{1000 * r['seconds_per_epoch'] / r['images']:.2f}",
               f"{r['peak_rss_mb']:,.0f}", f"{r['anon_before_mb']:,.0f} -> {r['anon_max_mb']:,.0f}",
               f"{r['file_before_mb']:,.0f} -> {r['file_max_mb']:,.0f}"] for r in by_n]
    mem_head = ["peak RSS MB", "max RSS anon MB", "max RSS file MB"]
    p = by_size[0] if by_size else by_n[0]
    mode = "QUICK development run (tiny sizes; figures not meaningful)\n\n" if args.quick else ""
    subset = (f"a seeded, class-stratified sample of {args.subset:,} TRAIN images" if args.subset
              else "all of TRAIN")
    return f"""# Scaling of bloodcell's training engine

{mode}{args.model}, {p['precision']}, batch {args.batch_size}, {p['threads']} threads, \
BatchLoader(shuffle, augment="strong", drop_last) -> engine.train_one_epoch; {how} after \
{args.warmup} untimed warm-up step(s). Each point is a fresh process: peak RSS is getrusage \
ru_maxrss of that process (including Python and torch, about {p['rss_before_mb']:,.0f} MB before \
training); "RSS anon" and "RSS file" are the largest anonymous and file-backed resident memory \
seen after any step (/proc/self/status). Read pages of a memory-mapped cache count as file-backed \
RSS: page cache that the kernel can drop, not memory the process holds.

## Against image size ({subset}, decoded at each size)

{md_table(["image size", "images", "steps/epoch", "s/epoch", "img/s", "cache MB", *mem_head], size_rows)}

## Against data set size (TRAIN cache at {args.data_px} px, {setup['base_images']:,} images, tiled)

{md_table(["images", "cache MB", "steps/epoch", "s/epoch", "img/s", "s per 1k images",
           "peak RSS MB", "RSS anon MB (start -> max)", "RSS file MB (start -> max)"], n_rows)}

Cache decoding (bloodcell.data.cache.build_cache, cold): \
{'; '.join(f"{k}: {v:.1f} s" for k, v in setup['decode_s'].items())}. Discover: \
{setup['discover_s']:.1f} s. Tiling: {setup['tile_s']:.1f} s.

## Machine

{machine_md(info)}
"""


def plot(by_size: list[dict], by_n: list[dict], path: Path, title: str) -> None:
    """Three panels: s/epoch vs image size, s/epoch vs data set size, memory vs data set size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    if by_size:
        ax[0].plot([r["image_size"] for r in by_size], [r["seconds_per_epoch"] for r in by_size], "o-")
        ax[0].set(xlabel="image size (px)", ylabel="seconds per epoch",
                  title=f"image size ({by_size[0]['images']:,} images)")
    if by_n:
        n = [r["images"] for r in by_n]
        ax[1].plot(n, [r["seconds_per_epoch"] for r in by_n], "o-")
        ax[1].set(xscale="log", yscale="log", xlabel="images", ylabel="seconds per epoch",
                  title="data set size")
        ax[1].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        for key, lab in (("peak_rss_mb", "peak RSS (ru_maxrss)"), ("anon_max_mb", "RSS anonymous"),
                         ("file_max_mb", "RSS file-backed (mmap, page cache)"),
                         ("cache_mb", "cache file size")):
            ax[2].plot(n, [r[key] for r in by_n], "o-" if key != "cache_mb" else "k--", label=lab)
        ax[2].set(xscale="log", xlabel="images", ylabel="MB", title="memory vs data set size")
        ax[2].legend(fontsize=8)
    for a in ax:
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict | None:
    """python bench/scaling.py --quick"""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=default_data(), help="the Kaggle blood-cells folder (default: %(default)s)")
    ap.add_argument("--model", default="cnn4x32")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--sizes", help=f"image sizes (default {FULL['sizes']})")
    ap.add_argument("--subset", type=int, help="TRAIN images for the image-size sweep; 0: all (default 2000)")
    ap.add_argument("--data-sizes", help=f"tiled data set sizes (default {FULL['data_sizes']})")
    ap.add_argument("--data-px", type=int, default=64, help="image size of the data-size sweep")
    ap.add_argument("--steps", type=int, help="timed steps per point, extrapolated; 0: a whole epoch (default)")
    ap.add_argument("--warmup", type=int, help="untimed steps before each timing (default 3)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: the physical cores")
    ap.add_argument("--workdir", help="where the temporary caches go (default: the system's temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary caches")
    ap.add_argument("--quick", action="store_true",
                    help="a development run: 256 images at 32 px; 1k and 4k images tiled from them at 64 px; 2 steps")
    ap.add_argument("--out", default=str(OUT), help="output folder (default: %(default)s)")
    ap.add_argument("--point", help=argparse.SUPPRESS)  # internal: run one point, print JSON
    args = ap.parse_args(argv)
    if args.point:
        print(json.dumps(run_point(json.loads(Path(args.point).read_text()))))
        return None
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    torch.manual_seed(0)
    set_threads(args.threads)
    info = machine_info()

    t0 = time.perf_counter()
    src = discover_grouped(args.data)
    setup = {"discover_s": time.perf_counter() - t0, "decode_s": {}, "tile_s": 0.0}
    train_items = [it for it in src.items if it.split == "train"]
    if not train_items:
        raise SystemExit(f"{args.data}: no TRAIN folder found (expected the Kaggle layout)")
    sub = sample_items(train_items, args.subset, seed=0)
    base_spec = {"model": args.model, "num_classes": len(src.classes), "batch_size": args.batch_size,
                 "steps": args.steps, "warmup": args.warmup, "threads": args.threads}
    work = Path(tempfile.mkdtemp(prefix="bloodcell-scaling-", dir=args.workdir))
    by_size, by_n = [], []
    try:
        for size in ints(args.sizes):
            images, meta, secs = decode(sub, size, work, f"subset-{size}")
            setup["decode_s"][f"{len(sub):,} images at {size} px"] = secs
            r = point({**base_spec, "label": f"size-{size}", "images": images, "meta": meta,
                       "image_size": size}, work)
            by_size.append(r)
            print(f"{size:>4} px, {r['images']:,} images: {r['seconds_per_epoch']:.1f} s/epoch, "
                  f"{r['img_s']:,.0f} img/s, peak RSS {r['peak_rss_mb']:,.0f} MB", flush=True)
        # Quick runs tile the small sample rather than decode all of TRAIN.
        base_items = sub if args.quick else train_items
        images, meta, secs = decode(base_items, args.data_px, work, f"base-{args.data_px}")
        setup["decode_s"][f"{len(base_items):,} images at {args.data_px} px"] = secs
        setup["base_images"] = len(np.load(meta)["labels"])
        for n in ints(args.data_sizes):
            t0 = time.perf_counter()
            tiled, tiled_meta = tile(images, meta, n, work)
            setup["tile_s"] += time.perf_counter() - t0
            r = point({**base_spec, "label": f"n-{n}", "images": tiled, "meta": tiled_meta,
                       "image_size": args.data_px}, work)
            by_n.append(r)
            Path(tiled).unlink()  # the next, bigger file replaces it on disk
            print(f"{n:>7,} images at {args.data_px} px: {r['seconds_per_epoch']:.1f} s/epoch, "
                  f"{r['img_s']:,.0f} img/s, peak RSS {r['peak_rss_mb']:,.0f} MB "
                  f"(anon max {r['anon_max_mb']:,.0f}, file max {r['file_max_mb']:,.0f})", flush=True)
    finally:
        if args.keep:
            print(f"kept the caches in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    md = render(by_size, by_n, info, args, setup)
    stem = "scaling-quick" if args.quick else "scaling"
    result = {"machine": info, "setup": setup, "image_size": by_size, "data_size": by_n,
              "model": args.model, "batch_size": args.batch_size, "subset": args.subset}
    base = write_outputs(args.out, stem, md, result)
    plot(by_size, by_n, base.with_suffix(".png"),
         f"bloodcell {args.model}, batch {args.batch_size}" + (" (quick run)" if args.quick else ""))
    print(f"wrote {base}.md, .json and .png")
    return result


if __name__ == "__main__":
    main()
