#!/usr/bin/env python
"""python bench/detect_lolo.py [--seeds 0,1,2] [--epochs 40] [--out runs/bench/detect_lolo]

The white-cell detector, each lab of fields held out in turn (leave one lab out): train on the
others' train splits (thresholds chosen on their val splits), then score every field of the held-out
lab, which chooses nothing. The three labs of $BLOODCELL_TEST_DATA: smears/raabin and smears/pbc
(YOLO, every WBC, RBC and platelet boxed) and BCCD (blood-cells/dataset-master: Pascal VOC boxes of
red cells only, and the white-cell type of each field in labels.csv). BCCD trains the red-cell maps
alone; held out, its white cells are scored per field against labels.csv: a field given one type
holds one white cell (two types: two), so "found" is the share of those fields where the detector
finds at least that many, and "extra" the white cells found beyond it.

IoU 0.5 asks for the box as the held-out lab's annotators drew it (Raabin's white cells are boxed
with their pale cytoplasm, PBC's tighter); "found" asks only that the detection and the true box
hold each other's centre: the same cell, which is what a count needs; "whole cells" is the recall of
the cells not cut by the field's edge (a differential types only those).

Prints a Markdown table (mean and spread over seeds) and writes OUT/results.json; a fold whose
detector.pt exists is scored again, not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(os.environ.get("BLOODCELL_TEST_DATA", "../shared/data"))
LABS = {"raabin": ROOT / "smears" / "raabin", "pbc": ROOT / "smears" / "pbc",
        "bccd": ROOT / "blood-cells" / "dataset-master"}


def bccd_fields(detector, bs) -> dict:
    """White cells per BCCD field against labels.csv's number of types (its only white-cell truth)."""
    from bloodcell.data.images import decode_field

    n = found = exact = extra = 0
    for path, types in bs.field_types.items():
        img, s, wh = decode_field(path, detector.input_size)
        k = sum(1 for c in detector.detect_scaled([img], [s], [wh])[0] if c["class"] == "wbc")
        n += 1
        found += k >= len(types)
        exact += k == len(types)
        extra += max(0, k - len(types))
    return {"fields": n, "found": found / n, "exact": exact / n, "extra_per_field": extra / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--out", default="runs/bench/detect_lolo")
    args = ap.parse_args()
    from bloodcell.data.boxes import discover_boxes
    from bloodcell.inference.detect import Detector, evaluate_boxes
    from bloodcell.training.detect import DetectConfig, train_detector

    out = Path(args.out)
    results = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for held, path in LABS.items():
            key = f"{held}/{seed}"
            run = out / held / str(seed)
            t0 = time.perf_counter()
            if not (run / "detector.pt").is_file():
                train_detector([str(p) for k, p in LABS.items() if k != held], run,
                               DetectConfig(epochs=args.epochs, seed=seed), progress=False)
            det = Detector(run)
            bs = discover_boxes(path)
            r = {"per_class": evaluate_boxes(det, bs.fields, bs.classes), "fields": len(bs.fields),
                 "seconds": round(time.perf_counter() - t0)}
            if held == "bccd":
                r["wbc_per_field"] = bccd_fields(det, bs)
            results[key] = r
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))
            print(key, json.dumps({c: {k: v for k, v in m.items() if k in ("ap50", "precision", "recall",
                                                                            "found_precision", "found_recall", "whole_recall")}
                                   for c, m in r["per_class"].items()}), flush=True)
    print(table(results))


def _ms(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict) -> str:
    lines = ["| held-out lab | class | true | AP50 | precision | recall | found: precision | found: recall | "
             "whole cells: recall | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for held in LABS:
        runs = [v for k, v in results.items() if k.split("/")[0] == held]
        if not runs:
            continue
        for c in runs[0]["per_class"]:
            ms = [r["per_class"][c] for r in runs]
            lines.append(f"| {held} | {c} | {ms[0]['true']} | {_ms([m['ap50'] for m in ms])} | "
                         f"{_ms([m['precision'] for m in ms])} | {_ms([m['recall'] for m in ms])} | "
                         f"{_ms([m['found_precision'] for m in ms])} | {_ms([m['found_recall'] for m in ms])} | "
                         f"{_ms([m['whole_recall'] for m in ms])} | {len(runs)} |")
        if "wbc_per_field" in runs[0]:
            w = [r["wbc_per_field"] for r in runs]
            lines.append(f"| {held} | wbc (per field, labels.csv) | {w[0]['fields']} fields | - | "
                         f"extra {_ms([x['extra_per_field'] for x in w])} / field | found in "
                         f"{_ms([x['found'] for x in w])} (exact {_ms([x['exact'] for x in w])}) | - | - | - | {len(runs)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
