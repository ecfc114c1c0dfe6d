"""Inference speed through PyTorch, TorchScript and ONNX Runtime: batch throughput and single-image latency.

Usage:
    python bench/infer_speed.py                          # cnn4x32, 64 px, batch 256, untrained weights
    python bench/infer_speed.py --checkpoint runs/cnn4x32 --rounds 7 --json out.json

The backends are measured interleaved (round 1: torch, torchscript, onnx; round 2: ...) and the median
over rounds is reported, so that a noisy, shared machine biases no backend. Throughput is the forward
pass over normalised batches; latency is one image, forward pass only and end to end (JPEG bytes ->
decode -> normalise -> forward -> probabilities, as ``predict`` and ``serve`` do it).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bloodcell.inference.predict import Predictor
from bloodcell.models import get_model
from bloodcell.models.checkpoint import save_checkpoint
from bloodcell.runtime import physical_cores

BACKENDS = ("torch", "torchscript", "onnx")


def make_checkpoint(folder: Path, model: str, image_size: int, classes: int = 4) -> Path:
    """An untrained checkpoint: speed does not depend on the weights' values."""
    net = get_model(model, num_classes=classes, image_size=image_size)
    path = folder / "bench.pt"
    save_checkpoint(path, net, model_name=model, model_kwargs={"num_classes": classes,
                                                               "image_size": image_size},
                    classes=[f"c{i}" for i in range(classes)], image_size=image_size, resize="squash")
    return path


def jpeg_bytes(size: tuple[int, int] = (320, 240), seed: int = 0) -> bytes:
    """A JPEG of the Kaggle frames' size (noise plus a blob; the content does not matter for speed)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(120, 220, (size[1], size[0], 3), dtype=np.uint8)
    arr[80:160, 120:200] = (90, 40, 140)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def throughput(p: Predictor, x: torch.Tensor, seconds: float) -> float:
    """Images per second of the forward pass on batch x, over about ``seconds``."""
    p.logits(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        p.logits(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def latency_ms(fn, seconds: float) -> float:
    """Median milliseconds of fn() over about ``seconds`` of calls."""
    fn()
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    """python bench/infer_speed.py --model cnn4x32 --image-size 64 --batch-size 256"""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="run folder or checkpoint (default: an untrained --model)")
    ap.add_argument("--model", default="cnn4x32")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.5, help="per measurement")
    ap.add_argument("--threads", type=int, default=0, help="0: the physical cores")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or make_checkpoint(Path(tmp), args.model, args.image_size)
        preds = {b: Predictor(ckpt, backend=b, threads=args.threads) for b in BACKENDS}
    first = preds["torch"]
    size = first.image_size
    x = torch.randn(args.batch_size, 3, size, size)
    x1 = x[:1].clone()
    data = jpeg_bytes()
    figures: dict[str, dict[str, list[float]]] = {b: {"batch_img_s": [], "single_ms": [], "end_to_end_ms": []}
                                                  for b in BACKENDS}
    for r in range(args.rounds):
        for b in BACKENDS if r % 2 == 0 else BACKENDS[::-1]:
            p = preds[b]
            figures[b]["batch_img_s"].append(throughput(p, x, args.seconds))
            figures[b]["single_ms"].append(latency_ms(lambda p=p: p.logits(x1), args.seconds / 2))
            figures[b]["end_to_end_ms"].append(latency_ms(lambda p=p: p.predict_bytes(data), args.seconds / 2))

    result = {"model": first.model_name, "image_size": size, "batch_size": args.batch_size,
              "threads": first.threads, "physical_cores": physical_cores(), "rounds": args.rounds,
              "torch": torch.__version__, "backends": {}}
    print(f"{first.model_name} at {size} px, batch {args.batch_size}, {first.threads} threads, "
          f"median of {args.rounds} interleaved rounds (min-max in brackets)")
    print(f"{'backend':12s} {'batch img/s':>22s} {'1 image, forward ms':>24s} {'1 JPEG end to end ms':>24s}")
    for b in BACKENDS:
        f = figures[b]
        med = {k: statistics.median(v) for k, v in f.items()}
        result["backends"][b] = {**med, **{k + "_all": v for k, v in f.items()}}
        print(f"{b:12s} {med['batch_img_s']:>10,.0f} [{min(f['batch_img_s']):,.0f}-{max(f['batch_img_s']):,.0f}]"
              f" {med['single_ms']:>12.3f} [{min(f['single_ms']):.3f}-{max(f['single_ms']):.3f}]"
              f" {med['end_to_end_ms']:>12.3f} [{min(f['end_to_end_ms']):.3f}-{max(f['end_to_end_ms']):.3f}]")
    best = max(BACKENDS, key=lambda b: result["backends"][b]["batch_img_s"])
    fastest_1 = min(BACKENDS, key=lambda b: result["backends"][b]["single_ms"])
    result["fastest_batch"], result["fastest_single"] = best, fastest_1
    print(f"fastest: batch {best}, single image {fastest_1}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
