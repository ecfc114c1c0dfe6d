"""``bloodcell report``: rebuild a compare folder's report.html and report.md.

The library is imported inside the handlers (lazy imports, marked): ``bloodcell --help`` and a bad
flag answer at once, without loading torch.
"""

from __future__ import annotations


def cmd_report(args) -> int:
    """bloodcell report runs/compare   (rebuilds report.html and report.md from saved results)"""
    from bloodcell.report import build_report  # lazy: start-up (matplotlib)

    html_path, md_path = build_report(args.dir)
    print(html_path)
    print(md_path)
    return 0


def add_parsers(sub) -> None:
    """Register `bloodcell report`."""
    p = sub.add_parser("report", help="rebuild a compare folder's report.html and report.md",
                       description=cmd_report.__doc__)
    p.add_argument("dir", metavar="DIR", help="compare folder (holds results.json)")
    p.set_defaults(func=cmd_report)
