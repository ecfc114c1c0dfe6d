"""``bloodcell predict``: the class of image files, folders or globs.

The library is imported inside the handlers (lazy imports, marked): ``bloodcell --help`` and a bad
flag answer at once, without loading torch.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path

from bloodcell.cli.flags import bounded, field_type
from bloodcell.config import (
    BACKENDS,
)


def format_rows(rows: list[dict], fmt: str, classes: list[str]) -> str:
    """Rows as an aligned table, CSV (every class's probability) or JSON."""
    if fmt == "json":
        return json.dumps(rows, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        extra = ["cam"] if any("cam" in r for r in rows) else []
        w.writerow(["path", "class", "probability", *[f"p_{c}" for c in classes], "error", *extra])
        for r in rows:
            if r.get("error"):
                w.writerow([r["path"], "", "", *[""] * len(classes), r["error"], *[""] * len(extra)])
            else:
                w.writerow([r["path"], r["class"], f"{r['probability']:.6f}",
                            *[f"{r['probs'][c]:.6f}" for c in classes], "",
                            *[r.get("cam", "") for _ in extra]])
        return buf.getvalue().rstrip("\n")
    width = max([len("path"), *(len(r["path"]) for r in rows)])
    k = max((len(r.get("top_k", [])) for r in rows), default=1)
    head = f"{'path':<{width}}  {'class':<12} {'prob':>6}"
    if k > 1:
        head += "  " + "  ".join(f"{'top' + str(i + 1):<19}" for i in range(1, k))
    lines = [head]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['path']:<{width}}  ERROR: {r['error']}")
            continue
        line = f"{r['path']:<{width}}  {r['class']:<12} {r['probability']:>6.3f}"
        for t in r["top_k"][1:]:
            line += f"  {t['class']:<12} {t['probability']:>6.3f}"
        lines.append(line)
    return "\n".join(lines)


def is_run(item: str) -> bool:
    """Whether a positional argument names a model (builtin, a run folder, a checkpoint file) rather
    than an image to predict."""
    p = Path(item)
    if item == "builtin" or p.suffix.lower() in (".pt", ".pth"):
        return True
    return p.is_dir() and any((p / n).is_file() for n in ("best.pt", "last.pt", "folds.json"))


def split_run(items: list[str]) -> tuple[str, list[str]]:
    """[RUN] PATH... -> (the run, the paths); no run given: the built-in classifier."""
    if items and is_run(items[0]):
        if len(items) == 1:
            from bloodcell.errors import BloodcellError  # lazy: start-up

            raise BloodcellError(f"give the images to predict after the model ({items[0]} PATH...)")
        return items[0], items[1:]
    return "builtin", items


def cmd_predict(args) -> int:
    """bloodcell predict cell.jpg  (the built-in model), or: bloodcell predict runs/cnn4x32 cells/*.jpeg --top-k 2"""
    from bloodcell.inference.predict import Predictor, expand_inputs  # lazy: start-up

    run, items = split_run(args.items)
    paths = expand_inputs(items)
    t0 = time.perf_counter()
    predictor = Predictor(run, device=args.device, backend=args.backend)
    rows = predictor.predict_paths(paths, top_k=args.top_k, tta=args.tta, batch_size=args.batch_size,
                                   cam_dir=args.cam)
    print(format_rows(rows, args.format, predictor.classes))
    failed = sum(1 for r in rows if r.get("error"))
    print(f"{len(rows) - failed} predicted, {failed} failed, {time.perf_counter() - t0:.2f}s "
          f"({predictor.model_name}, {predictor.backend})", file=sys.stderr)
    return 1 if failed else 0


def add_parsers(sub) -> None:
    """Register `bloodcell predict`."""
    p = sub.add_parser("predict", help="predict the class of image files, folders or globs",
                       description=cmd_predict.__doc__)
    p.add_argument("items", nargs="+", metavar="[RUN] PATH",
                   help="the model first where it is not the built-in one (a run folder, its best.pt, or "
                        "builtin, the default), then image files, folders or glob patterns")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--top-k", type=bounded(int, 1, 1000), default=1,
                   help="show the k most probable classes (default 1; %(type)s)")
    p.add_argument("--tta", action="store_true", help="average over the 8 flips and rotations")
    p.add_argument("--cam", metavar="DIR", help="write a Grad-CAM overlay PNG per image into DIR, and beside it the raw heat "
                   "map at the model's input size (.npy)")
    p.add_argument("--batch-size", type=field_type("batch_size"), default=64,
                   help="images per forward pass (default 64; %(type)s)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="inference engine (default auto: ONNX Runtime on CPU, the fastest measured)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=cmd_predict)
