"""``bloodcell data check``: what is in a data set and what is wrong with it."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np

from bloodcell.data.dataset import discover_grouped, load_dataset
from bloodcell.data.images import describe_error, load_image, open_image
from bloodcell.data.layouts import is_synthetic
from bloodcell.data.medmnist import check_medmnist, is_medmnist
from bloodcell.data.records import Problem
from bloodcell.data.splits import lacking_classes, make_splits, unusable_split
from bloodcell.runtime import worker_map


def _inspect(paths: list[str]) -> list[tuple[str, str, str | None]]:
    """(size 'WxH', mode, error) per file; a small full decode catches truncated data."""
    out = []
    for p in paths:
        try:
            with open_image(p) as im:
                size, mode = f"{im.size[0]}x{im.size[1]}", im.mode
            load_image(p, 16, "squash")
            out.append((size, mode, None))
        except Exception as e:  # noqa: BLE001 - every decoder failure is reported, none is fatal
            out.append(("?", "?", describe_error(e)))
    return out


def check_data(path: str | os.PathLike | None, seed: int = 0, group_regex: str | None = None,
               fractions=(0.7, 0.15, 0.15), val_fraction: float = 0.15, workers: int | None = None,
               group_by: str = "auto", cache_dir: str | os.PathLike | None = None) -> dict:
    """Inspect a data set: classes x splits (images and groups), sizes, modes and problems."""
    if is_synthetic(path):
        ds = load_dataset(path, image_size=64, seed=seed, fractions=fractions)
        return {"root": "synthetic", "layout": "synthetic", "classes": ds.classes, "splits": ds.summary(),
                "sizes": {"64x64 (generated)": sum(len(s) for s in ds.splits.values())},
                "modes": {"RGB": sum(len(s) for s in ds.splits.values())}, "problems": [], "usable": True,
                "synthetic": True}
    if is_medmnist(path):
        return check_medmnist(path, cache_dir)
    src = discover_grouped(path, group_regex=group_regex, group_by=group_by, cache_dir=cache_dir)
    problems = list(src.problems)
    paths = [it.path for it in src.items]
    chunks = [paths[i:i + 200] for i in range(0, len(paths), 200)]
    workers = workers or min(os.cpu_count() or 1, max(1, len(chunks)))
    if workers > 1 and len(paths) > 400:
        info = [r for chunk in worker_map(_inspect, chunks, workers) for r in chunk]
    else:
        info = [r for chunk in chunks for r in _inspect(chunk)]
    bad = [(p, e) for p, (_, _, e) in zip(paths, info, strict=True) if e]
    if bad:
        problems.append(Problem("unreadable_images", f"{len(bad)} file(s) could not be decoded (skipped)",
                                [f"{p}: {e}" for p, e in bad]))
    ok_items = [it for it, (_, _, e) in zip(src.items, info, strict=True) if not e]
    sizes = Counter(s for s, _, e in info if not e)
    modes = Counter(m for _, m, e in info if not e)
    splits = {}
    usable = not any(p.fatal for p in problems) and len({it.label for it in ok_items}) >= 2
    if usable:
        made = make_splits(ok_items, seed, fractions, val_fraction)
        refused = unusable_split(ok_items, made, src.classes, src.group_by)
        if refused:
            problems.append(refused)
            usable = False
        else:
            lacking = lacking_classes(ok_items, made, src.classes)
            if lacking:
                problems.append(lacking)
        for name, idx in made.items():
            labels = np.array([ok_items[i].label for i in idx])
            groups = np.array([ok_items[i].group for i in idx])
            splits[name] = {
                "images": {c: int((labels == k).sum()) for k, c in enumerate(src.classes)},
                "groups": {c: int(len(set(groups[labels == k]))) for k, c in enumerate(src.classes)},
            }
    elif not any(p.fatal for p in problems):
        problems.append(Problem("one_class", "fewer than two classes have readable images", fatal=True))
    return {
        "root": src.root, "layout": src.layout, "group_by": src.group_by, "classes": src.classes,
        "splits": splits,
        "sizes": dict(sizes.most_common()), "modes": dict(modes.most_common()),
        "problems": [p.__dict__ for p in problems], "usable": usable, "excluded": src.excluded,
    }


def format_check(report: dict, max_paths: int = 5) -> str:
    """The human-readable tables of a check report."""
    lines = [f"data:   {report['root']}", f"layout: {report['layout']}"
             + (f" (groups: {report['group_by']})" if report.get("group_by") else ""),
             f"classes ({len(report['classes'])}): {', '.join(report['classes'])}", ""]
    splits = report["splits"]
    if splits:
        names = list(splits)
        w = max(12, *(len(c) for c in report["classes"])) + 2
        head = "class".ljust(w) + "".join(f"{n + ' img/grp':>22}" for n in names)
        lines += [head, "-" * len(head)]
        for c in report["classes"]:
            row = c.ljust(w)
            for n in names:
                row += f"{splits[n]['images'][c]:>15,} / {splits[n]['groups'][c]:<4,}"
            lines.append(row)
        row = "total".ljust(w)
        for n in names:
            row += f"{sum(splits[n]['images'].values()):>15,} / {sum(splits[n]['groups'].values()):<4,}"
        lines += ["-" * len(head), row, ""]
    top = list(report["sizes"].items())[:5]
    lines.append("image sizes: " + ", ".join(f"{s} ({n:,})" for s, n in top)
                 + (f", and {len(report['sizes']) - 5} more" if len(report["sizes"]) > 5 else ""))
    lines.append("image modes: " + ", ".join(f"{m} ({n:,})" for m, n in report["modes"].items())
                 + ("  (converted to RGB)" if set(report["modes"]) - {"RGB"} else ""))
    lines.append("")
    if not report["problems"]:
        lines.append("problems: none found")
    else:
        lines.append(f"problems ({len(report['problems'])}):")
        for p in report["problems"]:
            lines.append(f"  {'FATAL ' if p['fatal'] else ''}{p['kind']}: {p['detail']}")
            for path in p["paths"][:max_paths]:
                lines.append(f"    {path}")
            if len(p["paths"]) > max_paths:
                lines.append(f"    ... and {len(p['paths']) - max_paths} more (--json lists all)")
    return "\n".join(lines)
