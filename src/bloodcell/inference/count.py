"""From whole fields to a differential count: find the white cells, crop them, type them, count them.

``FieldCounter(model, detector)`` holds a classifier (inference.predict.Predictor) and a detector
(inference.detect.Detector); ``count_field(rgb)`` returns one field's cells, each with its box,
detection score, type, probability and runner-up, and the field's counts per detected class.
``count_slides`` runs that over slides (``find_slides``: a field file, a folder of fields = one
slide, a folder of folders = one slide each) into an output folder, one field at a time into a
journal (``.count/fields.jsonl``), so a killed run continues where it stopped; ``write_tables``
turns the journal into ``cells.csv``, ``fields.csv`` and ``differential.json`` / ``.csv``.

A white cell is cropped as a square centred on its box, CROP_MARGIN x the box's longer side (the
cell with a ring of red cells around it, as the crop sets the classifiers learn from), kept inside
the field; the classifier then resizes it with its own ``resize`` mode, as in training.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from bloodcell.catalog import IMAGE_EXTENSIONS
from bloodcell.data.images import MAX_PIXELS, ImageError, decode_field, resize_array
from bloodcell.errors import BloodcellError
from bloodcell.metrics import differential, wilson_ci
from bloodcell.runfiles import atomic_write, write_csv, write_json

CROP_MARGIN = 2.0
JOURNAL = Path(".count") / "fields.jsonl"


def crop_box(box, width: int, height: int, margin: float = CROP_MARGIN) -> tuple[int, int, int, int]:
    """A square of ``margin`` x the box's longer side centred on it, shifted to lie inside the field
    (as large as the field's short side at most)."""
    x0, y0, x1, y1 = box
    side = int(round(min(max(x1 - x0, y1 - y0) * margin, min(width, height))))
    side = max(side, 1)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, left + side, top + side


def read_field(src: str | os.PathLike | bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A field at its original size as uint8 H x W x 3; raises ImageError as decode_image does."""
    return decode_field(src, None, max_pixels)[0]


class FieldCounter:
    """A classifier and a detector: a field in, its white cells typed and its cells counted out."""

    def __init__(self, predictor, detector):
        if "wbc" not in detector.classes:
            raise BloodcellError(f"{detector.path}: this detector finds no white cells (classes "
                                 f"{', '.join(detector.classes)})")
        self.predictor = predictor
        self.detector = detector
        self.classes = predictor.classes

    def count_field(self, rgb: np.ndarray, crops: bool = False) -> dict:
        """One field (uint8 H x W x 3, original size) -> {'cells': [...], 'counts': {class: n}};
        with ``crops`` each white cell carries its crop (uint8) under 'crop'."""
        h, w = rgb.shape[:2]
        found = self.detector.detect(rgb)
        counts = {c: sum(1 for f in found if f["class"] == c) for c in self.detector.classes}
        wbcs = [f for f in found if f["class"] == "wbc"]
        cells = []
        if wbcs:
            pieces, inputs = [], []
            for f in wbcs:
                x0, y0, x1, y1 = crop_box(f["box"], w, h)
                piece = rgb[y0:y1, x0:x1]
                pieces.append(piece)
                inputs.append(resize_array(Image.fromarray(piece), self.predictor.image_size, self.predictor.resize))
            probs = self.predictor.probs(np.stack(inputs))
            for f, piece, p in zip(wbcs, pieces, probs, strict=True):
                order = np.argsort(-p)
                cell = {"box": f["box"], "score": f["score"], "label": self.classes[order[0]],
                        "prob": float(p[order[0]]),
                        "second": self.classes[order[1]] if len(order) > 1 else "",
                        "second_prob": float(p[order[1]]) if len(order) > 1 else 0.0,
                        "probs": {c: float(v) for c, v in zip(self.classes, p, strict=True)}}
                if crops:
                    cell["crop"] = piece
                cells.append(cell)
        others = [{"class": f["class"], "score": f["score"], "box": f["box"]} for f in found if f["class"] != "wbc"]
        return {"width": w, "height": h, "cells": cells, "counts": counts, "others": others}


def find_slides(paths: list[str]) -> list[tuple[str, list[str]]]:
    """(slide name, its field files) for each input: a file is a field (the files given directly are
    one slide, named after their folder), a folder of images one slide, a folder of folders one slide
    per folder that holds images. A path that does not exist is an error."""
    slides: dict[str, list[str]] = {}
    loose: list[str] = []
    for s in paths:
        p = Path(s)
        if not p.exists():
            raise BloodcellError(f"no such file or folder: {s}")
        if p.is_file():
            loose.append(s)
            continue
        direct = sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if direct:
            slides.setdefault(_name(p), []).extend(direct)
        subs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
        for d in subs:
            files = sorted(str(f) for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if files:
                slides.setdefault(_name(d), []).extend(files)
        if not direct and not any(slides.get(_name(d)) for d in subs):
            raise BloodcellError(f"{s}: no image files in this folder or the folders in it")
    if loose:
        slides.setdefault(_name(Path(loose[0]).resolve().parent), []).extend(loose)
    return list(slides.items())


def _name(p: Path) -> str:
    return p.resolve().name or "slide"


def identity(counter: FieldCounter) -> dict:
    """What a journal was written with: a rerun with other models starts afresh (or is refused)."""
    def digest(path) -> str:
        return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12]
    return {"model": str(counter.predictor.meta.get("path", "")), "model_sha1": digest(counter.predictor.meta["path"])
            if counter.predictor.meta.get("path") else "", "detector": str(counter.detector.path),
            "detector_sha1": digest(counter.detector.path), "classes": counter.classes}


def read_journal(out: Path) -> tuple[dict | None, dict[tuple[str, str], dict]]:
    """The journal's header and its finished fields by (slide, image); a torn last line is ignored."""
    path = out / JOURNAL
    if not path.is_file():
        return None, {}
    head, done = None, {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line a kill cut short: that field is counted again
            if "identity" in row:
                head = row["identity"]
            else:
                done[(row["slide"], row["image"])] = row
    return head, done


def count_slides(slides: list[tuple[str, list[str]]], counter: FieldCounter, out: Path, *,
                 progress: Callable | None = None, log=print, max_pixels: int = MAX_PIXELS) -> list[dict]:
    """Count every field of every slide into ``out`` (crops under cells/<slide>/, the journal);
    fields the journal already holds are kept, not counted again. Returns the field records."""
    out.mkdir(parents=True, exist_ok=True)
    ident = identity(counter)
    head, done = read_journal(out)
    if head is not None and head != ident:
        raise BloodcellError(f"{out} holds a count made with other models ({head.get('model')}, "
                             f"{head.get('detector')}); give another --out, or --overwrite")
    if done:
        log(f"continuing: {len(done)} field(s) already counted in {out}")
    (out / JOURNAL).parent.mkdir(exist_ok=True)
    records = []
    total = sum(len(f) for _, f in slides)
    bar = progress(total) if progress else None
    with open(out / JOURNAL, "a", encoding="utf-8") as journal:
        if head is None:
            journal.write(json.dumps({"identity": ident}) + "\n")
        for slide, files in slides:
            for i, path in enumerate(files):
                key = (slide, path)
                if key in done:
                    records.append(done[key])
                else:
                    rec = _count_one(counter, slide, i, path, out, max_pixels)
                    journal.write(json.dumps(rec) + "\n")
                    journal.flush()
                    os.fsync(journal.fileno())
                    records.append(rec)
                    if rec["error"]:
                        log(f"{path}: {rec['error']}")
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return records


def _count_one(counter: FieldCounter, slide: str, index: int, path: str, out: Path, max_pixels: int) -> dict:
    rec = {"slide": slide, "image": path, "field": index, "width": 0, "height": 0, "cells": [], "counts": {},
           "error": ""}
    try:
        rgb = read_field(path, max_pixels)
    except ImageError as e:
        rec["error"] = str(e)
        return rec
    r = counter.count_field(rgb, crops=True)
    rec.update(width=r["width"], height=r["height"], counts=r["counts"], others=r["others"])
    stem = f"{index:05d}_{Path(path).stem}"
    for k, cell in enumerate(r["cells"]):
        crop = Path("cells") / _safe(slide) / f"{stem}_{k}.jpg"
        (out / crop).parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(cell.pop("crop")).save(buf, "JPEG", quality=90)
        atomic_write(out / crop, buf.getvalue())
        rec["cells"].append({**cell, "crop": str(crop)})
    return rec


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "slide"


def cell_rows(records: list[dict], classes: list[str]) -> list[dict]:
    """cells.csv's rows: one per white cell found."""
    rows = []
    for rec in records:
        for k, c in enumerate(rec["cells"]):
            x0, y0, x1, y1 = c["box"]
            rows.append({"slide": rec["slide"], "image": rec["image"], "cell": k, "x0": x0, "y0": y0, "x1": x1,
                         "y1": y1, "score": round(c["score"], 4), "label": c["label"], "prob": round(c["prob"], 4),
                         "second": c["second"], "second_prob": round(c["second_prob"], 4), "crop": c["crop"],
                         **{f"p_{n}": round(c["probs"][n], 4) for n in classes}})
    return rows


def field_rows(records: list[dict], detected: list[str]) -> list[dict]:
    """fields.csv's rows: one per field, its counts per detected class (a field with no white cell
    is a row of zeros), or the reason it could not be read."""
    return [{"slide": r["slide"], "image": r["image"], "width": r["width"], "height": r["height"],
             **{c: (r["counts"].get(c, 0) if not r["error"] else "") for c in detected}, "error": r["error"]}
            for r in records]


def slide_differentials(records: list[dict], classes: list[str]) -> list[dict]:
    """Per slide: fields counted, fields that failed, and the differential of its white cells."""
    out = []
    for slide in dict.fromkeys(r["slide"] for r in records):
        mine = [r for r in records if r["slide"] == slide]
        labels = [c["label"] for r in mine for c in r["cells"]]
        probs = [c["prob"] for r in mine for c in r["cells"]]
        out.append({"slide": slide, "fields": sum(1 for r in mine if not r["error"]),
                    "failed": sum(1 for r in mine if r["error"]),
                    "mean_prob": round(float(np.mean(probs)), 4) if probs else None,
                    **differential(labels, classes)})
    return out


def write_tables(out: Path, records: list[dict], counter_meta: dict) -> dict:
    """cells.csv, fields.csv, differential.json and differential.csv from the field records."""
    classes, detected = counter_meta["classes"], counter_meta["detected"]
    cells = cell_rows(records, classes)
    head = ["slide", "image", "cell", "x0", "y0", "x1", "y1", "score", "label", "prob", "second", "second_prob",
            "crop", *[f"p_{c}" for c in classes]]
    write_csv(out / "cells.csv", cells, head)
    write_csv(out / "fields.csv", field_rows(records, detected),
              ["slide", "image", "width", "height", *detected, "error"])
    slides = slide_differentials(records, classes)
    diff = {"classes": classes, "slides": slides, **{k: v for k, v in counter_meta.items() if k != "classes"}}
    write_json(out / "differential.json", diff)
    rows = [{"slide": s["slide"], "cells": s["cells"], "class": r["class"], "count": r["count"],
             "percent": r["percent"], "ci95_low": r["ci95"][0] if r["ci95"] else "",
             "ci95_high": r["ci95"][1] if r["ci95"] else ""} for s in slides for r in s["classes"]]
    write_csv(out / "differential.csv", rows, ["slide", "cells", "class", "count", "percent", "ci95_low", "ci95_high"])
    return diff


def end_to_end(records: list[dict], field_types: dict[str, list[str]], classes: list[str]) -> dict:
    """The field's type (its most confident white cell's) against the type a table gives it, over the
    fields given exactly one type the classifier knows (names matched in any case)."""
    known = {c.lower(): c for c in classes}
    right = n = no_cell = skipped = 0
    for r in records:
        types = field_types.get(r["image"])
        if not types or r["error"]:
            continue
        if len(types) != 1 or types[0].lower() not in known:
            skipped += 1
            continue
        n += 1
        if not r["cells"]:
            no_cell += 1
            continue
        best = max(r["cells"], key=lambda c: c["prob"])
        right += best["label"].lower() == types[0].lower()
    return {"fields": n, "right": right, "accuracy": right / n if n else None, "ci95": wilson_ci(right, n),
            "no_white_cell_found": no_cell, "skipped": skipped,
            "skipped_why": "fields with two types, or a type the classifier does not know"}
