"""``bloodcell count``: the white cells of whole fields found, typed and counted into a differential.

The library is imported inside the handlers (lazy imports, marked): ``bloodcell --help`` and a bad
flag answer at once, without loading torch.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from bloodcell.cli.detector import BOXED_HELP
from bloodcell.cli.flags import bounded

OUTPUTS = ("cells.csv", "fields.csv", "differential.json", "differential.csv", "report.html", "detection.json")


def cmd_count(args) -> int:
    """bloodcell count slides/ --out counts/ [--model RUN] [--detector RUN]"""
    from bloodcell.data.boxes import discover_boxes  # lazy: start-up
    from bloodcell.errors import BloodcellError
    from bloodcell.inference.count import FieldCounter, count_slides, find_slides, write_tables
    from bloodcell.inference.detect import Detector
    from bloodcell.inference.predict import Predictor
    from bloodcell.models.builtin import resolve_run
    from bloodcell.runfiles import check_out_dir, run_lock
    from bloodcell.training.engine import progress_bar

    if not args.paths and not args.data:
        raise BloodcellError("give field images or folders to count, or --data BOXED to score on boxed fields")
    out = check_out_dir(args.out)
    boxed = None
    if args.data:
        boxed = discover_boxes(args.data, seed=args.seed)
        fields = boxed.fields if args.split == "all" else boxed.split(args.split)
        if not fields:
            raise BloodcellError(f"{args.data} has no {args.split} fields")
        slides = [(Path(boxed.root).name or "fields", [f.path for f in fields])]
    else:
        slides = find_slides(args.paths)
    t0 = time.perf_counter()
    predictor = Predictor(resolve_run(args.model, "classifier"), backend=args.backend, threads=args.threads)
    detector = Detector(resolve_run(args.detector, "detector"), threads=args.threads)
    counter = FieldCounter(predictor, detector)
    if args.overwrite and (out / ".count").exists():
        shutil.rmtree(out / ".count")
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "cells", ignore_errors=True)
    with run_lock(out, "count"):
        records = count_slides(slides, counter, out,
                               progress=None if args.no_progress else lambda n: progress_bar(n, "fields"),
                               log=lambda m: print(m, file=sys.stderr))
        meta = {"classes": counter.classes, "detected": detector.classes,
                "model": args.model if args.model == "builtin" else str(predictor.meta.get("path", args.model)),
                "detector": args.detector if args.detector == "builtin" else str(detector.path),
                "seconds": round(time.perf_counter() - t0, 2)}
        diff = write_tables(out, records, meta)
        if boxed is not None:
            from bloodcell.inference.count import end_to_end
            from bloodcell.inference.detect import evaluate_boxes

            scores = {"data": str(args.data), "split": args.split, "fields": len(fields),
                      "per_class": evaluate_boxes(detector, fields, boxed.classes),
                      "end_to_end": end_to_end(records, boxed.field_types, counter.classes)}
            from bloodcell.runfiles import write_json

            write_json(out / "detection.json", scores)
        if not args.no_report:
            from bloodcell.report.count import write_count_report

            write_count_report(out, records, diff)
    failed = sum(1 for r in records if r["error"])
    for s in diff["slides"]:
        shown = ", ".join(f"{r['class']} {r['count']} ({r['percent']:.0f} %)" for r in s["classes"] if r["count"])
        print(f"{s['slide']}: {s['cells']} white cells in {s['fields']} fields" + (f": {shown}" if shown else ""))
    if boxed is not None:
        print(_detection_lines(json.loads((out / "detection.json").read_text())))
    print(f"wrote {out}/ (cells.csv, fields.csv, differential.json{', report.html' if not args.no_report else ''}); "
          f"{len(records) - failed} fields counted, {failed} failed, {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 1 if failed else 0


def _detection_lines(s: dict) -> str:
    lines = [f"detection on {s['fields']} {s['split']} fields (IoU 0.5):"]
    for c, m in s["per_class"].items():
        ap = "-" if m["ap50"] is None else f"{m['ap50']:.3f}"
        rec = "-" if m["recall"] is None else f"{m['recall']:.3f}"
        lines.append(f"  {c:<9} AP50 {ap}  precision {m['precision']:.3f}  recall {rec}  ({m['true']} true)")
    e = s.get("end_to_end")
    if e and e.get("fields"):
        lines.append(f"  field type right: {e['right']} of {e['fields']} ({100 * e['accuracy']:.1f} %)")
    return "\n".join(lines)


def add_parsers(sub) -> None:
    """Register `bloodcell count`."""
    p = sub.add_parser("count", help="find, type and count the white cells of whole fields (a differential)",
                       description=cmd_count.__doc__)
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="a field image, a folder of fields (one slide), or a folder of folders (one slide each)")
    p.add_argument("--out", required=True, help="folder to write cells.csv, fields.csv, differential.json/.csv, "
                   "report.html and the crops (cells/) into; a killed count given the same --out continues")
    p.add_argument("--model", default="builtin", help="classifier: a run folder, a checkpoint, or builtin (default)")
    p.add_argument("--detector", default="builtin", help="detector: a run folder (bloodcell detector train), "
                   "its detector.pt, or builtin (default)")
    p.add_argument("--data", metavar="BOXED", help="score on boxed fields instead: " + BOXED_HELP +
                   "; writes detection.json (AP, precision, recall per class; the field type against "
                   "the set's labels.csv where it has one)")
    p.add_argument("--split", choices=["train", "val", "test", "all"], default="test",
                   help="with --data: which fields (default test)")
    p.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0,
                   help="with --data: split seed for fields with no given split (default 0)")
    p.add_argument("--overwrite", action="store_true", help="start afresh instead of continuing a count in --out")
    p.add_argument("--backend", choices=["auto", "onnx", "torch"], default="auto",
                   help="the classifier's engine (default auto: ONNX Runtime on the CPU)")
    p.add_argument("--threads", type=bounded(int, 0, 1024), default=0, help="CPU threads (0: the physical cores)")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_count)
