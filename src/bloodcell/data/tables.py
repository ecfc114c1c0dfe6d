"""Label tables: a CSV or TSV file of ``path,label`` rows (optional ``group`` and ``split``) as a Source.

Paths are relative to the table's folder (absolute ones are taken as they are); column names count
in any case; other columns are ignored, with a note. A table is written by hand, so a wrong row is a
mistake to fix rather than a file to skip: each of these is a fatal problem that names its rows (by
line number): a file that does not exist, a path listed twice with two labels (or two splits), an
empty label, a split name that is not train, val or test, a split column that leaves some rows
without a split. A path listed twice alike is kept once, with a note.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from bloodcell.data.records import Item, Problem, Source
from bloodcell.errors import DataError

TABLE_SUFFIXES = (".csv", ".tsv")
COLUMNS = ("path", "label", "group", "split")
_FILE = "file:"  # the group prefix of a row without a group value: discover gives it the layout's own


def read_rows(table: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header (lower case) and the (line number, row) pairs of a CSV (comma) or TSV (tab) file."""
    delimiter = "\t" if table.suffix.lower() == ".tsv" else ","
    try:
        with open(table, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = [h.strip().lower() for h in next(reader, [])]
            rows = [(reader.line_num, dict(zip(header, (v.strip() for v in r), strict=False)))
                    for r in reader if any(v.strip() for v in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read the label table {table}: {e}") from e
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        raise DataError(f"the label table {table} needs the columns path and label; its header has: "
                        f"{', '.join(h for h in header if h) or 'nothing'}")
    if not rows:
        raise DataError(f"the label table {table} has a header but no rows")
    return header, rows


def class_order(labels: set[str]) -> list[str]:
    """Class names sorted: as numbers where every one is a whole number, else alphabetically in any case."""
    if all(x.lstrip("-").isdigit() for x in labels):
        return sorted(labels, key=int)
    return sorted(labels, key=lambda x: (x.lower(), x))


def read_table(table: Path, split_aliases: dict[str, str]) -> Source:
    """A Source of the table's rows: classes from the label column, groups from the group column
    (``group/<value>``; a row without one gets ``file:<path>``), splits from the split column."""
    header, rows = read_rows(table)
    src = Source(str(table), "table", [], [])
    ignored = [h for h in header if h not in COLUMNS]
    if ignored:
        src.problems.append(Problem("table_columns_ignored", f"column(s) not read: {', '.join(ignored)}"))
    has_split = "split" in header
    bad: dict[str, list[str]] = {"missing": [], "label": [], "split": []}
    seen: dict[str, tuple[int, str, str]] = {}
    conflicts, repeated = [], []
    base = table.parent
    for line, r in rows:
        where = f"line {line}: {r.get('path', '')}"
        split = split_aliases.get(r.get("split", "").lower(), None) if has_split else ""
        if not r.get("label"):
            bad["label"].append(where)
            continue
        if split is None:
            bad["split"].append(f"{where} (split {r.get('split', '')!r})")
            continue
        path = os.path.normpath(base / r["path"]) if r.get("path") else ""
        if not path or not os.path.isfile(path):
            bad["missing"].append(where)
            continue
        if path in seen:
            first = seen[path]
            if first[1:] != (r["label"], split):
                conflicts.append(f"line {first[0]} and {where}")
            else:
                repeated.append(where)
            continue
        seen[path] = (line, r["label"], split)
    for kind, detail in (("missing", "name a file that does not exist"), ("label", "have an empty label"),
                         ("split", "have no split or one that is not train, val or test")):
        if bad[kind]:
            src.problems.append(Problem(f"table_rows_{kind}", f"{table.name}: {len(bad[kind])} row(s) {detail} "
                                        f"(first: {bad[kind][0]})", bad[kind], fatal=True))
    if conflicts:
        src.problems.append(Problem("table_label_conflicts", f"{table.name}: {len(conflicts)} path(s) listed "
                                    f"twice with two labels or splits (first: {conflicts[0]})", conflicts,
                                    fatal=True))
    if repeated:
        src.problems.append(Problem("table_duplicate_rows", f"{len(repeated)} row(s) repeat an earlier "
                                    "row (kept once)", repeated))
    src.classes = class_order({label for _, label, _ in seen.values()})
    index = {c: i for i, c in enumerate(src.classes)}
    groups = {line: r.get("group", "") for line, r in rows}
    for path, (line, label, split) in seen.items():
        st = os.stat(path)
        group = f"group/{groups[line]}" if groups[line] else f"{_FILE}{path}"
        src.items.append(Item(path, index[label], group, split, st.st_size, st.st_mtime_ns))
    if has_split:
        _note_groups_across_splits(src)
    return src


def is_file_group(group: str) -> bool:
    """True for the group of a row that gave no group value (read_table's ``file:<path>``)."""
    return group.startswith(_FILE)


def _note_groups_across_splits(src: Source) -> None:
    """A group (patient) given in two split columns is leakage: fatal."""
    splits: dict[str, set[str]] = {}
    for it in src.items:
        if not is_file_group(it.group):
            splits.setdefault(it.group, set()).add(it.split)
    both = sorted(g.removeprefix("group/") for g, s in splits.items() if len(s) > 1)
    if both:
        src.problems.append(Problem("table_group_across_splits",
                                    f"{len(both)} group(s) have rows in two splits (leakage; first: {both[0]})",
                                    both, fatal=True))
