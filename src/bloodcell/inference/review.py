"""The cells a person reviews, and the order in which they are shown.

``read_cells(folder)`` reads what ``bloodcell count --out FOLDER`` wrote (``cells.csv``: one row per
white cell, its crop a JPEG path relative to the folder) or, with ``predictions``, what ``bloodcell
predict --format csv`` wrote (``path,class,probability,p_<class>...,error``: one row per image, the
images under the folder). Either way the classes are the ``p_<class>`` columns, in their order, and
each cell is named by its image's path relative to the folder, which is also how a label table in
that folder names it (data.tables reads paths relative to the table's folder).

``review_order(cells)`` is the order a review goes through them: least sure first, spread over the
classes and over the fields, so that the first screenful is neither one class's doubts nor one bad
field's (``unsure``, the default); or ``random`` (a seeded shuffle): labels that are a fair sample
of the lab's cells, sure ones included, so a fine-tune's check on them reaches every cell.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bloodcell.errors import BloodcellError

# The two decisions that are not a class: kept in the review's record, never a class to train on.
NOT_WBC, UNSURE = "not_wbc", "unsure"
NOT_CLASSES = (NOT_WBC, UNSURE)
BAND = 0.1  # review_order's probability band: cells this close in probability count as equally sure
ORDERS = ("unsure", "random")


@dataclass(frozen=True)
class Cell:
    """One white cell to review."""

    id: str  # the image's path relative to the folder (POSIX separators)
    label: str  # the predicted class
    prob: float
    second: str = ""  # the runner-up class and its probability
    second_prob: float = 0.0
    field: str = ""  # the field image the cell was cut from ('' for a loose crop): its group
    slide: str = ""


@dataclass
class Cells:
    """What read_cells found: the classes, the cells, and the rows left out (one line each)."""

    source: str  # the file the cells come from
    classes: list[str]
    cells: list[Cell]
    skipped: list[str] = field(default_factory=list)


def read_cells(folder: str | os.PathLike, predictions: str | os.PathLike | None = None) -> Cells:
    """The cells of a count folder (its cells.csv) or of a predict CSV whose images lie under
    ``folder``; a BloodcellError (one line) where neither is there or the file cannot be read."""
    root = Path(folder)
    if not root.is_dir():
        raise BloodcellError(f"{folder}: no such folder (give the folder 'bloodcell count --out' wrote)")
    if predictions is not None:
        table = Path(predictions)
        if not table.is_file() and (root / table).is_file():
            table = root / table
        if not table.is_file():
            raise BloodcellError(f"--predictions {predictions}: no such file")
        return _read_predictions(root, table)
    if not (root / "cells.csv").is_file():
        raise BloodcellError(f"{folder} has no cells.csv: give a folder 'bloodcell count --out' wrote, or "
                             "--predictions FILE ('bloodcell predict --format csv') for images under it")
    return _read_count(root, root / "cells.csv")


def _rows(table: Path, needed: tuple[str, ...]) -> tuple[list[str], list[tuple[int, dict]]]:
    """The header, and (line, row) pairs, of a CSV with the ``needed`` columns and p_<class> ones."""
    try:
        with open(table, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [(reader.line_num, r) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BloodcellError(f"cannot read {table}: {e}") from e
    missing = [c for c in needed if c not in header]
    classes = [h[2:] for h in header if h.startswith("p_") and len(h) > 2]
    if missing or len(classes) < 2:
        raise BloodcellError(f"{table} is not a {'count' if 'crop' in needed else 'predict'} table: it needs the "
                             f"columns {', '.join(needed)} and a p_<class> column per class (two or more)")
    taken = [c for c in classes if c in NOT_CLASSES]
    if taken:
        raise BloodcellError(f"{table}: a class named {taken[0]!r} would clash with the review's own "
                             f"'{NOT_WBC}' and '{UNSURE}' marks")
    return classes, rows


def _inside(root: Path, path: Path) -> str | None:
    """``path``'s POSIX path relative to ``root`` where it is a file under it (links resolved), else None."""
    try:
        rel = path.resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        return None
    return rel.as_posix() if path.is_file() else None


def _number(value: str, table: Path, line: int, column: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not 0.0 <= x <= 1.0:
        raise BloodcellError(f"{table.name} line {line}: {column} {value!r} is not a probability")
    return x


def _read_count(root: Path, table: Path) -> Cells:
    classes, rows = _rows(table, ("slide", "image", "label", "prob", "crop"))
    out = Cells(str(table), classes, [])
    seen = set()
    for line, r in rows:
        rel = _inside(root, root / r["crop"]) if r.get("crop") else None
        if rel is None or rel in seen:
            out.skipped.append(f"line {line}: crop {r.get('crop')!r} " +
                               ("listed twice" if rel else "is not a file under the folder"))
            continue
        if r["label"] not in classes:
            raise BloodcellError(f"{table.name} line {line}: label {r['label']!r} is not one of the p_<class> "
                                 "columns' classes")
        seen.add(rel)
        out.cells.append(Cell(rel, r["label"], _number(r["prob"], table, line, "prob"), r.get("second") or "",
                              _number(r.get("second_prob") or "0", table, line, "second_prob"),
                              r["image"], r["slide"]))
    return out


def _read_predictions(root: Path, table: Path) -> Cells:
    classes, rows = _rows(table, ("path", "class", "probability"))
    out = Cells(str(table), classes, [])
    seen = set()
    for line, r in rows:
        if r.get("error") or not r.get("class"):
            out.skipped.append(f"line {line}: {r.get('path')!r} was not predicted ({r.get('error') or 'no class'})")
            continue
        given = Path(r["path"] or ".")
        # predict writes paths as it was given them: relative to the folder, the table or where it ran
        tries = [given] if given.is_absolute() else [root / given, table.parent / given, given]
        rel = next((x for x in (_inside(root, p) for p in tries) if x), None)
        if rel is None or rel in seen:
            out.skipped.append(f"line {line}: {r['path']!r} " + ("listed twice" if rel else "is not a file under "
                                                                  "the folder"))
            continue
        if r["class"] not in classes:
            raise BloodcellError(f"{table.name} line {line}: class {r['class']!r} is not one of the p_<class> "
                                 "columns' classes")
        seen.add(rel)
        probs = sorted(((_number(r[f"p_{c}"], table, line, f"p_{c}"), c) for c in classes), reverse=True)
        second = next(((p, c) for p, c in probs if c != r["class"]), (0.0, ""))
        out.cells.append(Cell(rel, r["class"], _number(r["probability"], table, line, "probability"),
                              second[1], second[0]))
    return out


def review_order(cells: Sequence[Cell], band: float = BAND, order: str = "unsure", seed: int = 0) -> list[int]:
    """The indices of ``cells`` in the order a review shows them: least sure first, spread over the
    classes and the fields (``order`` "unsure"), or shuffled by ``seed`` ("random": each cell's place
    is a hash of the seed and its name, so it does not depend on the input's order either).

    Cells within ``band`` of each other (prob 0.30 to 0.39 with the default 0.1) count as equally
    sure. Within a band the classes take turns (the least sure cell of each class, then each class's
    next one, ...), and within a class the fields take turns the same way, so no one class or field
    fills the screen while others wait. Ties go to the lower probability, then the cell's name: the
    order does not depend on the order of the input.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown review order {order!r}; known: {', '.join(ORDERS)}")
    if order == "random":
        def place(i: int) -> bytes:
            return hashlib.blake2b(f"{seed}/{cells[i].id}".encode(), digest_size=8).digest()
        return sorted(range(len(cells)), key=place)

    def key(i: int) -> tuple:
        return cells[i].prob, cells[i].id

    top = max(math.ceil(1 / band - 1e-9) - 1, 0)  # prob 1.0 belongs to the last band, not one of its own
    tier = [min(math.floor(c.prob / band + 1e-9), top) for c in cells]  # 0.3 / 0.1 is 2.9999...
    field_rank: dict[int, int] = {}
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, c in enumerate(cells):
        groups[tier[i], c.label, c.field].append(i)
    for members in groups.values():
        field_rank.update((i, r) for r, i in enumerate(sorted(members, key=key)))
    class_rank: dict[int, int] = {}
    groups = defaultdict(list)
    for i, c in enumerate(cells):
        groups[tier[i], c.label].append(i)
    for members in groups.values():
        class_rank.update((i, r) for r, i in enumerate(sorted(members, key=lambda i: (field_rank[i], *key(i)))))
    return sorted(range(len(cells)), key=lambda i: (tier[i], class_rank[i], *key(i)))
