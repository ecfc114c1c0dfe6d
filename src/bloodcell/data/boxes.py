"""Whole fields with boxes (detection data): Pascal VOC, YOLO and a CSV of boxes, read alike.

``discover_boxes(PATH)`` finds the layout and returns a ``BoxSet``: one ``BoxField`` per image (its
size, boxes in pixels x0,y0,x1,y1 of the original image, a canonical class per box, the split it was
given) and the problems found on the way, each said once:

- **VOC**: a folder with ``Annotations/*.xml`` and ``JPEGImages/`` (the BCCD layout). A
  ``labels.csv`` beside them with ``Image`` and ``Category`` columns gives each field's white-cell
  type (``field_types``), which count's end-to-end figure reads.
- **YOLO**: a folder with ``images/`` and ``labels/`` (each may hold ``train``/``val``/``test``
  folders: the split as given) and ``classes.txt`` (in ``labels/`` or the root); a row is
  ``class x_centre y_centre width height`` in 0-1 fractions.
- **CSV**: a ``.csv`` file with a header naming ``image,x0,y0,x1,y1,label`` (and optionally
  ``split``); image paths relative to the file. Coordinates are pixels or 0-1 fractions: said by the
  header (``x0_px`` ... or ``x0_frac`` ...) or by ``units`` (``auto``: fractions when no value
  exceeds 1).

A box partly outside its image is clipped to it; one wholly outside, or with no area, or repeating
another of its class (IoU > 0.95), is dropped;
a class id a YOLO ``classes.txt`` does not name is dropped; an image with no box file is left out
(a missing file is not proof that the field is empty); a box file with no image is reported. Class
names are made canonical (``WBC``, ``white blood cell`` -> ``wbc``; ``Platelets`` -> ``platelet``).
A source says which classes it annotates (``classes``): BCCD's VOC files here box only red cells, so
a detector learns nothing about white cells from them, rather than learning that there are none.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bloodcell.catalog import IMAGE_EXTENSIONS
from bloodcell.data.images import open_image
from bloodcell.data.records import Problem
from bloodcell.errors import BloodcellError

BOX_LAYOUTS = ("voc", "yolo", "csv")
UNITS = ("auto", "pixels", "fractions")
SPLITS = ("train", "val", "test")
# One spelling per cell kind, whatever the annotation tool wrote.
ALIASES = {
    "wbc": "wbc", "white blood cell": "wbc", "white_blood_cell": "wbc", "leukocyte": "wbc", "leucocyte": "wbc",
    "rbc": "rbc", "red blood cell": "rbc", "red_blood_cell": "rbc", "erythrocyte": "rbc",
    "platelet": "platelet", "platelets": "platelet", "plt": "platelet", "thrombocyte": "platelet",
}
# Classes in the order a detector's outputs list them: white cells first.
KNOWN_ORDER = ("wbc", "rbc", "platelet")


def canonical(name: str) -> str:
    """One spelling per class: 'WBC' -> 'wbc', 'Platelets' -> 'platelet'; others lower-cased."""
    key = " ".join(name.strip().lower().split())
    return ALIASES.get(key, key)


def class_order(names) -> list[str]:
    """Known classes first in KNOWN_ORDER, then the rest sorted."""
    names = set(names)
    return [c for c in KNOWN_ORDER if c in names] + sorted(names - set(KNOWN_ORDER))


@dataclass
class BoxField:
    """One field image with its boxes (N x 4 float32 pixels x0,y0,x1,y1) and a class per box."""

    path: str
    width: int
    height: int
    boxes: np.ndarray
    labels: list[str]
    split: str = ""  # "" means: to be assigned by box_splits
    source: str = ""  # the set it came from (a lab)

    def count(self, cls: str) -> int:
        return sum(1 for c in self.labels if c == cls)


@dataclass
class BoxSet:
    """What discover_boxes found: layout, annotated classes, fields, problems (and field types)."""

    root: str
    layout: str
    classes: list[str]
    fields: list[BoxField]
    problems: list[Problem] = field(default_factory=list)
    field_types: dict[str, list[str]] = field(default_factory=dict)  # image path -> its WBC type(s)

    def split(self, name: str) -> list[BoxField]:
        return [f for f in self.fields if f.split == name]


def is_box_source(path: str | os.PathLike) -> bool:
    """Whether a path is a box layout (VOC, YOLO or a CSV of boxes)."""
    try:
        return _layout(Path(path)) is not None
    except OSError:
        return False


def _layout(p: Path) -> str | None:
    if p.is_file() and p.suffix.lower() == ".csv":
        return "csv" if _names_boxes(p) else None
    if (p / "Annotations").is_dir() and (p / "JPEGImages").is_dir():
        return "voc"
    if (p / "images").is_dir() and (p / "labels").is_dir():
        return "yolo"
    return None


def _names_boxes(path: Path) -> bool:
    """Whether a CSV's header names box corners (x0 or x0_px or x0_frac): a table of boxes, not of labels."""
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            header = [h.strip().lower() for h in next(csv.reader(fh), [])]
    except OSError:
        return False
    return any(all(c + suffix in header for c in _COLS) for suffix in ("", "_px", "_frac"))


def discover_boxes(path: str | os.PathLike, units: str = "auto", seed: int = 0,
                   fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> BoxSet:
    """Read a VOC, YOLO or CSV box set; fields with no given split are split (grouped by field)."""
    if units not in UNITS:
        raise BloodcellError(f"unknown box units {units!r}; known: {', '.join(UNITS)}")
    p = Path(path)
    if not p.exists():
        raise BloodcellError(f"box data not found: {path}")
    layout = "csv" if p.is_file() and p.suffix.lower() == ".csv" else _layout(p)
    if layout is None:
        raise BloodcellError(f"{path}: not a box layout (a VOC folder with Annotations/ and JPEGImages/, "
                             "a YOLO folder with images/ and labels/, or a .csv of boxes)")
    bs = {"voc": _read_voc, "yolo": _read_yolo, "csv": _read_csv}[layout](p, units)
    bs.fields.sort(key=lambda f: f.path)
    for f in bs.fields:
        f.source = p.name if layout != "csv" else p.stem
    assign_splits(bs.fields, seed, fractions)
    if not bs.fields:
        bs.problems.append(Problem("no_fields", "no image with boxes found", fatal=True))
    return bs


def assign_splits(fields: list[BoxField], seed: int, fractions=(0.7, 0.15, 0.15)) -> None:
    """Give every field without a split one: by a seeded hash of its file name (a field is its own
    group; the same field lands on the same side whatever else is in the set)."""
    for f in fields:
        if f.split:
            continue
        h = int(hashlib.sha1(f"{seed}:{Path(f.path).name}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        f.split = "train" if h < fractions[0] else "val" if h < fractions[0] + fractions[1] else "test"


def _image_size(path: Path) -> tuple[int, int]:
    with open_image(path) as im:
        return im.size


def _clean(boxes: list[list[float]], labels: list[str], w: int, h: int, where: str,
           issues: dict[str, list[str]]) -> tuple[np.ndarray, list[str]]:
    """Clip boxes to the image; drop those with no area inside it; note what was done."""
    keep_b, keep_l = [], []
    for (x0, y0, x1, y1), lab in zip(boxes, labels, strict=True):
        if not all(np.isfinite([x0, y0, x1, y1])) or x1 <= x0 or y1 <= y0:
            issues["empty_box"].append(f"{where}: {lab} ({x0:g},{y0:g},{x1:g},{y1:g})")
            continue
        cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h))
        if cx1 - cx0 < 1 or cy1 - cy0 < 1:
            issues["box_outside"].append(f"{where}: {lab} ({x0:g},{y0:g},{x1:g},{y1:g}) dropped")
            continue
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1) and max(-x0, -y0, x1 - w, y1 - h) > 2:
            issues["box_clipped"].append(f"{where}: {lab} ({x0:g},{y0:g},{x1:g},{y1:g})")
        if any(lab == kl and _iou(kb, (cx0, cy0, cx1, cy1)) > 0.95 for kb, kl in zip(keep_b, keep_l, strict=True)):
            issues["duplicate_box"].append(f"{where}: {lab} ({x0:g},{y0:g},{x1:g},{y1:g})")
            continue
        keep_b.append([cx0, cy0, cx1, cy1])
        keep_l.append(lab)
    return np.asarray(keep_b, np.float32).reshape(-1, 4), keep_l


def _iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


_MESSAGES = {
    "empty_box": ("box(es) with no area dropped", False),
    "box_outside": ("box(es) wholly outside their image dropped", False),
    "box_clipped": ("box(es) reaching outside their image clipped to it", False),
    "duplicate_box": ("box(es) repeating another box of the same class dropped", False),
    "unknown_class": ("box(es) of a class the class list does not name dropped", False),
    "no_box_file": ("image(s) with no box file left out", False),
    "no_image": ("box file(s) with no image", False),
    "unreadable": ("image(s) that could not be read left out", False),
    "bad_row": ("row(s) that could not be read", False),
}


def _problems(issues: dict[str, list[str]]) -> list[Problem]:
    out = []
    for kind, paths in issues.items():
        if paths:
            what, fatal = _MESSAGES[kind]
            out.append(Problem(kind, f"{len(paths)} {what}", paths, fatal))
    return out


def _new_issues() -> dict[str, list[str]]:
    return {k: [] for k in _MESSAGES}


def _images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def _read_voc(root: Path, units: str) -> BoxSet:
    issues = _new_issues()
    fields, names = [], Counter()
    xmls = {x.stem: x for x in (root / "Annotations").glob("*.xml")}
    images = _images(root / "JPEGImages")
    stems = {im.stem for im in images}
    issues["no_image"] += [str(x) for s, x in sorted(xmls.items()) if s not in stems]
    for im in images:
        x = xmls.get(im.stem)
        if x is None:
            issues["no_box_file"].append(str(im))
            continue
        try:
            w, h = _image_size(im)
            tree = ET.parse(x).getroot()
        except Exception as e:  # noqa: BLE001 - one bad file is a problem row, not the end
            issues["unreadable"].append(f"{im}: {str(e).splitlines()[0][:120]}")
            continue
        boxes, labels = [], []
        for obj in tree.iter("object"):
            bb = obj.find("bndbox")
            try:
                boxes.append([float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
            except (AttributeError, TypeError, ValueError):
                issues["bad_row"].append(f"{x}: an object without a readable bndbox")
                continue
            labels.append(canonical(obj.findtext("name") or ""))
        b, lab = _clean(boxes, labels, w, h, str(x), issues)
        names.update(lab)
        fields.append(BoxField(str(im), w, h, b, lab))
    bs = BoxSet(str(root), "voc", class_order(names), fields, _problems(issues))
    bs.field_types = _field_types(root / "labels.csv", [str(im) for im in images])
    return bs


def _field_types(table: Path, images: list[str]) -> dict[str, list[str]]:
    """labels.csv (Image, Category) -> image path -> its white-cell type(s), for every image of the
    folder (with a box file or not); none where the table gives no type."""
    if not table.is_file():
        return {}
    by_stem = {Path(p).stem: p for p in images}
    by_number = {int(m.group(1)): p for p in images if (m := re.search(r"(\d+)$", Path(p).stem))}
    out = {}
    with open(table, newline="", encoding="utf-8", errors="replace") as fh:
        for row in csv.DictReader(fh):
            key, cat = (row.get("Image") or "").strip(), (row.get("Category") or "").strip()
            if not key or not cat:
                continue
            path = by_stem.get(key) or (by_number.get(int(key)) if key.isdigit() else None)
            if path:
                out[path] = [c.strip().lower() for c in cat.split(",") if c.strip()]
    return out


def _yolo_classes(root: Path) -> list[str] | None:
    for f in (root / "labels" / "classes.txt", root / "classes.txt"):
        if f.is_file():
            return [ln.strip() for ln in f.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return None


def _read_yolo(root: Path, units: str) -> BoxSet:
    names_given = _yolo_classes(root)
    if names_given is None:
        raise BloodcellError(f"{root}: a YOLO layout needs classes.txt (in labels/ or beside images/), one "
                             "class name per line")
    classes = [canonical(n) for n in names_given]
    issues = _new_issues()
    fields = []
    label_root = root / "labels"
    images = _images(root / "images")
    seen = set()
    for im in images:
        rel = im.relative_to(root / "images")
        txt = label_root / rel.with_suffix(".txt")
        seen.add(txt)
        if not txt.is_file():
            issues["no_box_file"].append(str(im))
            continue
        try:
            w, h = _image_size(im)
            rows = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        except Exception as e:  # noqa: BLE001
            issues["unreadable"].append(f"{im}: {str(e).splitlines()[0][:120]}")
            continue
        boxes, labels = [], []
        for n, line in enumerate(rows, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                k, cx, cy, bw, bh = int(parts[0]), *map(float, parts[1:5])
                if len(parts) < 5:
                    raise ValueError
            except ValueError:
                issues["bad_row"].append(f"{txt}:{n}: {line[:60]!r}")
                continue
            if not 0 <= k < len(classes):
                issues["unknown_class"].append(f"{txt}:{n}: class {k}")
                continue
            boxes.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
            labels.append(classes[k])
        b, lab = _clean(boxes, labels, w, h, str(txt), issues)
        split = rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in SPLITS else ""
        fields.append(BoxField(str(im), w, h, b, lab, split))
    issues["no_image"] += sorted(str(t) for t in label_root.rglob("*.txt")
                                 if t not in seen and t.name != "classes.txt")
    return BoxSet(str(root), "yolo", class_order(classes), fields, _problems(issues))


_COLS = ("x0", "y0", "x1", "y1")


def _read_csv(path: Path, units: str) -> BoxSet:
    issues = _new_issues()
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        rows = list(csv.DictReader(fh))
        header = [h.strip().lower() for h in (rows[0].keys() if rows else [])]
    if not rows:
        raise BloodcellError(f"{path}: no rows (a header image,x0,y0,x1,y1,label and a row per box)")
    cols, unit = _csv_columns(header, units, path)
    rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in rows]
    per_image: dict[str, list] = {}
    for n, r in enumerate(rows, 2):
        try:
            xy = [float(r[c]) for c in cols]
        except (KeyError, ValueError):
            issues["bad_row"].append(f"{path}:{n}")
            continue
        per_image.setdefault(r["image"], []).append((xy, canonical(r["label"]), r.get("split", "")))
    if unit == "auto":
        unit = "fractions" if all(max(xy) <= 1.0 for v in per_image.values() for xy, _, _ in v) else "pixels"
    fields, names = [], Counter()
    for name, entries in per_image.items():
        im = Path(name) if Path(name).is_absolute() else path.parent / name
        try:
            w, h = _image_size(im)
        except FileNotFoundError:
            issues["no_image"].append(str(im))
            continue
        except Exception as e:  # noqa: BLE001
            issues["unreadable"].append(f"{im}: {str(e).splitlines()[0][:120]}")
            continue
        scale = np.array([w, h, w, h], np.float64) if unit == "fractions" else np.ones(4)
        boxes = [list(np.asarray(xy) * scale) for xy, _, _ in entries]
        b, lab = _clean(boxes, [lab for _, lab, _ in entries], w, h, f"{path}: {name}", issues)
        names.update(lab)
        split = entries[0][2].lower() if entries[0][2].lower() in SPLITS else ""
        fields.append(BoxField(str(im), w, h, b, lab, split))
    return BoxSet(str(path), "csv", class_order(names), fields, _problems(issues))


def _csv_columns(header: list[str], units: str, path: Path) -> tuple[list[str], str]:
    """The four coordinate columns and their units, from the header (x0 / x0_px / x0_frac) and units."""
    for suffix, unit in (("", units), ("_px", "pixels"), ("_frac", "fractions")):
        cols = [c + suffix for c in _COLS]
        if all(c in header for c in cols) and "image" in header and "label" in header:
            if units != "auto" and suffix and unit != units:
                raise BloodcellError(f"{path}: the header says {unit}, the flag says {units}")
            return cols, unit
    raise BloodcellError(f"{path}: the header must name image,x0,y0,x1,y1,label (coordinates as x0 or "
                         f"x0_px for pixels, x0_frac for 0-1 fractions); it has {','.join(header)}")


def summary(bs: BoxSet) -> dict:
    """What data check shows: fields and boxes per split and class, sizes, problems."""
    out = {"root": bs.root, "layout": bs.layout, "classes": bs.classes, "splits": {},
           "sizes": dict(Counter(f"{f.width}x{f.height}" for f in bs.fields).most_common(5)),
           "field_types": len(bs.field_types),
           "problems": [{"kind": p.kind, "detail": p.detail, "fatal": p.fatal, "examples": p.paths[:5]}
                        for p in bs.problems],
           "usable": not any(p.fatal for p in bs.problems)}
    for s in SPLITS:
        fs = bs.split(s)
        if fs:
            out["splits"][s] = {"fields": len(fs), **{c: sum(f.count(c) for f in fs) for c in bs.classes}}
    return out


def format_summary(s: dict) -> str:
    """data check's table for a box set."""
    lines = [f"{s['root']}  ({s['layout']} boxes; classes annotated: {', '.join(s['classes']) or 'none'})", ""]
    head = f"{'split':<6} {'fields':>7}" + "".join(f" {c:>9}" for c in s["classes"])
    lines.append(head)
    for name, row in s["splits"].items():
        lines.append(f"{name:<6} {row['fields']:>7}" + "".join(f" {row[c]:>9}" for c in s["classes"]))
    lines.append("")
    lines.append("sizes: " + ", ".join(f"{k} ({v})" for k, v in s["sizes"].items()))
    if s["field_types"]:
        lines.append(f"white-cell type given for {s['field_types']} field(s) (labels.csv)")
    for p in s["problems"]:
        lines.append(f"{'ERROR' if p['fatal'] else 'warning'}: {p['detail']}")
        lines += [f"  {e}" for e in p["examples"]]
    return "\n".join(lines)
