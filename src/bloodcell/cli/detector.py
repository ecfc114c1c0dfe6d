"""``bloodcell detector``: train a cell detector on fields with boxes, and score one on boxed fields.

The library is imported inside the handlers (lazy imports, marked): ``bloodcell --help`` and a bad
flag answer at once, without loading torch.
"""

from __future__ import annotations

import json

from bloodcell.cli.flags import bounded

BOXED_HELP = ("fields with boxes: a Pascal VOC folder (Annotations/, JPEGImages/), a YOLO folder "
              "(images/, labels/, classes.txt) or a CSV of boxes (image,x0,y0,x1,y1,label)")


def cmd_detector_train(args) -> int:
    """bloodcell detector train smears/raabin smears/pbc --out runs/detector"""
    from bloodcell.training.detect import DetectConfig, train_detector  # lazy: start-up

    cfg = DetectConfig(input_size=args.input_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       width=args.width, seed=args.seed, threads=args.threads)
    r = train_detector(args.sources, args.out, cfg, progress=not args.no_progress)
    print(f"wrote {args.out}/detector.pt ({r['train_fields']} training fields, {r['seconds']:.0f}s); "
          f"thresholds " + ", ".join(f"{c} {t:.2f}" for c, t in r["thresholds"].items()))
    return 0


def cmd_detector_evaluate(args) -> int:
    """bloodcell detector evaluate runs/detector --data smears/pbc --split test"""
    from bloodcell.data.boxes import discover_boxes  # lazy: start-up
    from bloodcell.errors import BloodcellError
    from bloodcell.inference.detect import Detector, evaluate_boxes

    det = Detector(args.detector, threads=args.threads)
    bs = discover_boxes(args.data, seed=args.seed)
    fields = bs.fields if args.split == "all" else bs.split(args.split)
    if not fields:
        raise BloodcellError(f"{args.data} has no {args.split} fields")
    scores = evaluate_boxes(det, fields, bs.classes)
    if args.json:
        print(json.dumps(scores, indent=1))
        return 0
    print(f"{args.data} ({args.split}, {len(fields)} fields), IoU 0.5:")
    print(f"{'class':<9} {'true':>5} {'found':>6} {'AP50':>6} {'precision':>9} {'recall':>7} {'threshold':>9}")
    for c, m in scores.items():
        print(f"{c:<9} {m['true']:>5} {m['detected']:>6} {_f(m['ap50']):>6} {_f(m['precision']):>9} "
              f"{_f(m['recall']):>7} {m['threshold']:>9.2f}")
    return 0


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def add_parsers(sub) -> None:
    """Register `bloodcell detector`."""
    p = sub.add_parser("detector", help="train or score the cell detector (whole fields with boxes)",
                       description="bloodcell detector train|evaluate")
    dsub = p.add_subparsers(dest="detector_command", metavar="SUBCOMMAND")
    t = dsub.add_parser("train", help="train a detector on the train splits of box sets",
                        description=cmd_detector_train.__doc__)
    t.add_argument("sources", nargs="+", metavar="BOXED", help=BOXED_HELP)
    t.add_argument("--out", required=True, help="run folder to write (detector.pt, metrics.json)")
    t.add_argument("--epochs", type=bounded(int, 1, 10_000), default=40, help="(default 40)")
    t.add_argument("--input-size", type=bounded(int, 64, 2048), default=320,
                   help="the field's long side as the detector sees it, a multiple of 32 (default 320)")
    t.add_argument("--batch-size", type=bounded(int, 1, 1024), default=16, help="(default 16)")
    t.add_argument("--lr", type=bounded(float, 1e-7, 1.0), default=2e-3, help="peak learning rate (default 2e-3)")
    t.add_argument("--width", type=bounded(int, 8, 256), default=32, help="the backbone's first width (default 32)")
    t.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0)
    t.add_argument("--threads", type=bounded(int, 0, 1024), default=0, help="CPU threads (0: the physical cores)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_detector_train)
    e = dsub.add_parser("evaluate", help="AP, precision and recall of a detector on boxed fields",
                        description=cmd_detector_evaluate.__doc__)
    e.add_argument("detector", help="detector run folder (its detector.pt) or the file")
    e.add_argument("--data", required=True, metavar="BOXED", help=BOXED_HELP)
    e.add_argument("--split", choices=["train", "val", "test", "all"], default="test", help="(default test)")
    e.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0,
                   help="split seed for fields with no given split (default 0)")
    e.add_argument("--threads", type=bounded(int, 0, 1024), default=0)
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=cmd_detector_evaluate)
