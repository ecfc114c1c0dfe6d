"""``bloodcell data check``: what is in a data set, and what is wrong with it.

The library is imported inside the handlers (lazy imports, marked): ``bloodcell --help`` and a bad
flag answer at once, without loading torch.
"""

from __future__ import annotations

import json
import sys

from bloodcell.cli.flags import DATA_HELP, field_type
from bloodcell.config import CHOICES, field_help


def cmd_data_check(args) -> int:
    """bloodcell data check PATH [--json]"""
    from bloodcell.data.boxes import is_box_source  # lazy: start-up
    from bloodcell.data.check import check_data, format_check

    if is_box_source(args.path):
        return _check_boxes(args)
    report = check_data(args.path, seed=args.seed, group_regex=args.group_regex, group_by=args.group_by)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_check(report))
    if not report["usable"]:
        fatal = [p["detail"] for p in report["problems"] if p["fatal"]]
        print(f"bloodcell: error: data not usable: {fatal[0] if fatal else 'see problems above'}",
              file=sys.stderr)
        return 1
    return 0


def _check_boxes(args) -> int:
    """data check on fields with boxes (VOC, YOLO, CSV): fields and boxes per split and class, problems."""
    from bloodcell.data.boxes import discover_boxes, format_summary, summary  # lazy: start-up

    s = summary(discover_boxes(args.path, seed=args.seed))
    print(json.dumps(s, indent=1) if args.json else format_summary(s))
    if not s["usable"]:
        fatal = [p["detail"] for p in s["problems"] if p["fatal"]]
        print(f"bloodcell: error: data not usable: {fatal[0] if fatal else 'see problems above'}", file=sys.stderr)
        return 1
    return 0


def add_parsers(sub) -> None:
    """Register `bloodcell data`."""
    p = sub.add_parser("data", help="data set tools", description="bloodcell data check PATH")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    q = dsub.add_parser("check", help="tables of classes x splits, sizes, modes and problems",
                        description=cmd_data_check.__doc__)
    q.add_argument("path", nargs="?", default="synthetic", help=DATA_HELP)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--seed", type=field_type("seed"), default=0, help="split seed (default 0; %(type)s)")
    q.add_argument("--group-regex", help=field_help("group_regex"))
    q.add_argument("--group-by", default="auto", choices=CHOICES["group_by"], help=field_help("group_by")
                   + " (default: auto)")
    q.set_defaults(func=cmd_data_check)
