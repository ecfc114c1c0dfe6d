"""``bloodcell evaluate``: a trained model's scores on any data set.

The library is imported inside the handlers (lazy imports, marked): ``bloodcell --help`` and a bad
flag answer at once, without loading torch.
"""

from __future__ import annotations

import json
import sys

from bloodcell.cli.flags import DATA_HELP
from bloodcell.config import CHOICES


def cmd_evaluate(args) -> int:
    """bloodcell evaluate RUN_DIR|CHECKPOINT --data PATH [--split NAME[,NAME...]]"""
    from bloodcell.metrics import binary_line  # lazy: start-up
    from bloodcell.training.evaluate import evaluate_checkpoint  # lazy: start-up

    data = args.data[0] if len(args.data) == 1 else args.data
    res = evaluate_checkpoint(args.checkpoint, data, split=args.split, class_map=args.class_map,
                              tta=args.tta, cache_dir=args.cache_dir, device=args.device, out=args.out,
                              restrict=args.restrict,
                              log=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    for name, m in res.items():
        ci = m.get("accuracy_ci") or [float("nan")] * 2
        gci = m.get("group_accuracy_ci") or [float("nan")] * 2
        print(f"{name:12s} n={m['n']:<6} accuracy {m['accuracy']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]  "
              f"macro-F1 {m['macro_f1']:.4f}  loss {m['loss']:.4f}  "
              f"group accuracy {m.get('group_accuracy', float('nan')):.4f} [{gci[0]:.4f}, {gci[1]:.4f}] "
              f"(n={m.get('n_groups', '?')} groups)")
        if binary_line(m):
            print(f"{'':12s} {binary_line(m)}")
        for root, ms in m.get("per_source", {}).items():
            print(f"  {root}: n={ms['n']:<6} accuracy {ms['accuracy']:.4f}  macro-F1 {ms['macro_f1']:.4f}")
    return 0


def add_parsers(sub) -> None:
    """Register `bloodcell evaluate`."""
    p = sub.add_parser("evaluate", help="evaluate a trained model on any data set",
                       description=cmd_evaluate.__doc__)
    p.add_argument("checkpoint", help="run folder (its best.pt) or checkpoint file")
    p.add_argument("--data", required=True, action="append", metavar="DATA", help=DATA_HELP)
    p.add_argument("--split", help="split(s) to evaluate, comma-separated, 'all' for every image, 'train+val' for "
                                   "splits scored as one (default: "
                                   "test and test_simple of the training data; all images of another data set)")
    p.add_argument("--class-map", help="DATA=MODEL,... where class names differ beyond case")
    p.add_argument("--tta", action="store_true", help="average over the 8 flips and rotations")
    p.add_argument("--restrict", action="store_true",
                   help="score only the classes the data has (renormalised): e.g. an 8-class model on a "
                        "4-class set")
    p.add_argument("--cache-dir", help="decoded-image cache folder")
    p.add_argument("--device", default="auto", choices=list(CHOICES["device"]))
    p.add_argument("--out", help="folder for metrics.json and predictions CSVs")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.set_defaults(func=cmd_evaluate)
