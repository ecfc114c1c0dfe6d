"""int8 against float32: ``export --quantize int8`` of a trained run, its TEST accuracy and its speed.

Usage:
    python bench/quantize.py --run runs/kaggle-cnn4x32 --data ../shared/data/blood-cells --json out.json

Both files are exported from the run here (``export_model``; int8 calibrated on the run's
validation images). Accuracy: every image of the Kaggle TEST split, decoded once as training does
and scored by both files (``OnnxPredictor``). Speed: ONNX Runtime on one thread, one image at a time
and in batches of 16, forward pass only, measured interleaved over rounds (medians reported).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import default_data  # noqa: E402

from bloodcell.data.images import decode_image  # noqa: E402
from bloodcell.inference.export import export_model  # noqa: E402
from bloodcell.inference.onnx import OnnxPredictor  # noqa: E402


def per_image_ms(p: OnnxPredictor, x: np.ndarray, seconds: float) -> float:
    """Milliseconds of forward pass per image for batches like x, over about ``seconds``."""
    p.logits(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        p.logits(x)
        n += len(x)
    return 1e3 * (time.perf_counter() - t0) / n


def main(argv: list[str] | None = None) -> dict:
    """python bench/quantize.py --run RUN_DIR"""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a trained run folder (Kaggle blood cells)")
    ap.add_argument("--data", default=None, help="the Kaggle blood-cells folder (default: shared data)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    test = Path(args.data or default_data()) / "dataset2-master" / "images" / "TEST"
    with tempfile.TemporaryDirectory() as tmp:
        files = {q: Path(tmp) / f"{q}.onnx" for q in ("fp32", "int8")}
        summaries = {q: export_model(args.run, "onnx", f, quantize="int8" if q == "int8" else "none")
                     for q, f in files.items()}
        preds = {q: OnnxPredictor(f, threads=1) for q, f in files.items()}
    p = preds["fp32"]
    paths = sorted(test.glob("*/*.jpeg"))
    labels = np.array([p.classes.index(f.parent.name) for f in paths])
    images = np.stack([decode_image(f, p.image_size, p.resize) for f in paths])
    acc = {q: float((np.concatenate([pr.probs(images[i:i + 256]) for i in range(0, len(images), 256)])
                     .argmax(1) == labels).mean()) for q, pr in preds.items()}
    x = {n: pr_x for n, pr_x in ((1, p.preprocess(images[:1])), (16, p.preprocess(images[:16])))}
    speed: dict[str, dict[int, list[float]]] = {q: {1: [], 16: []} for q in preds}
    for r in range(args.rounds):
        for q in (("fp32", "int8") if r % 2 == 0 else ("int8", "fp32")):
            for n in (1, 16):
                speed[q][n].append(per_image_ms(preds[q], x[n], args.seconds))
    med = {q: {n: statistics.median(v) for n, v in s.items()} for q, s in speed.items()}
    result = {"run": str(args.run), "test_images": len(paths), "accuracy": acc,
              "accuracy_drop_points": 100 * (acc["fp32"] - acc["int8"]),
              "bytes": {q: s["bytes"] for q, s in summaries.items()},
              "int8_agreement_calibration": summaries["int8"]["agreement"],
              "ms_per_image": med, "speedup": {n: med["fp32"][n] / med["int8"][n] for n in (1, 16)},
              "ms_per_image_all": speed}
    print(f"TEST ({len(paths)} images): fp32 {100 * acc['fp32']:.2f} %, int8 {100 * acc['int8']:.2f} % "
          f"(drop {result['accuracy_drop_points']:.2f} points); files {summaries['fp32']['bytes']:,} / "
          f"{summaries['int8']['bytes']:,} bytes")
    for n in (1, 16):
        print(f"batch {n:2d}: fp32 {med['fp32'][n]:.3f} ms/img, int8 {med['int8'][n]:.3f} ms/img, "
              f"int8 speed-up {result['speedup'][n]:.2f}x (median of {args.rounds} interleaved rounds)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
