#!/usr/bin/env python
"""python bench/count_e2e.py [--model builtin] [--detector builtin] [--splits RUN/splits.json] [--out DIR]

End to end on whole fields whose white cell's type is known: the field's type is that of its most
confident white cell (`bloodcell count`), against the type given.

- BCCD (blood-cells/dataset-master, a type per field in labels.csv). Mind the leak: Kaggle's
  dataset2-master images are these same fields, scaled to 320 x 240 (measured: each TEST_SIMPLE image
  correlates 1.000 with one field, grey 32 x 24 thumbnails, and under 0.6 with any other), augmented
  into TRAIN and TEST. A classifier trained on Kaggle TRAIN has seen every field except those behind
  TEST (TEST_SIMPLE's 71 originals), so only those fields are scored ("BCCD test fields"), matched by
  that correlation (>= 0.98).
- PBC fields (smears/pbc): the same files as images of pbc/, so their type is known by content
  (matched by pixels, the same way). A classifier trained on the PBC share has seen its train and
  val images: with --splits (the classifier run's splits.json) only fields whose pbc/ image is in its
  test split are scored.

Prints per set: fields, right, accuracy with its Wilson 95 % interval, fields where no white cell
was found.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(os.environ.get("BLOODCELL_TEST_DATA", "../shared/data"))


def thumb(path) -> np.ndarray:
    a = np.asarray(Image.open(path).convert("L").resize((32, 24), Image.BILINEAR), np.float32).ravel()
    a -= a.mean()
    return a / (np.linalg.norm(a) + 1e-6)


def match(queries: list[Path], fields: list[Path], at: float = 0.98) -> dict[Path, Path]:
    """query -> the field it is a scaled copy of (grey-thumbnail correlation >= ``at``)."""
    fm = np.stack([thumb(f) for f in fields])
    out = {}
    for q in queries:
        c = fm @ thumb(q)
        if c.max() >= at:
            out[q] = fields[int(c.argmax())]
    return out


def count(paths: list[Path], model: str, detector: str, tmp: Path) -> tuple[list[dict], list[str]]:
    from bloodcell.inference.count import FieldCounter, count_slides
    from bloodcell.inference.detect import Detector
    from bloodcell.inference.predict import Predictor
    from bloodcell.models.builtin import resolve_run

    counter = FieldCounter(Predictor(resolve_run(model, "classifier")), Detector(resolve_run(detector, "detector")))
    return count_slides([("fields", [str(p) for p in paths])], counter, tmp, log=lambda m: None), counter.classes


def score(records: list[dict], truth: dict[str, str], classes: list[str]) -> dict:
    """count's own end-to-end figure (inference.count.end_to_end) over the fields of known type."""
    from bloodcell.inference.count import end_to_end

    return end_to_end(records, {image: [t] for image, t in truth.items()}, classes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--detector", default="builtin")
    ap.add_argument("--splits", help="the classifier run's splits.json: score only PBC fields in its test split")
    args = ap.parse_args()
    from bloodcell.data.boxes import discover_boxes

    results = {}
    bccd = discover_boxes(ROOT / "blood-cells" / "dataset-master")
    simple = sorted((ROOT / "blood-cells" / "dataset2-master" / "images" / "TEST_SIMPLE").glob("*/*"))
    fields = sorted(Path(p) for p in bccd.field_types)
    m = match(simple, fields)
    test_fields = sorted(set(m.values()))
    truth = {str(f): bccd.field_types[str(f)][0] for f in test_fields if len(bccd.field_types[str(f)]) == 1}
    with tempfile.TemporaryDirectory() as tmp:
        recs, classes = count(sorted(Path(p) for p in truth), args.model, args.detector, Path(tmp))
    results["BCCD test fields"] = {**score(recs, truth, classes), "matched": f"{len(m)} of {len(simple)} TEST_SIMPLE images -> "
                                   f"{len(test_fields)} fields, {len(truth)} with one type"}
    pbc_root = ROOT / "pbc" / "PBC_dataset_normal_DIB"
    smear = discover_boxes(ROOT / "smears" / "pbc")
    crops = sorted(pbc_root.glob("*/*.jpg"))
    by_thumb = match([Path(f.path) for f in smear.fields], crops, at=0.995)
    allowed = None
    if args.splits:
        allowed = {str(Path(p).resolve()) for p in json.loads(Path(args.splits).read_text()).get("test", [])}
    truth = {}
    for field, crop in by_thumb.items():
        if allowed is not None and str(crop.resolve()) not in allowed:
            continue
        truth[str(field)] = crop.parent.name
    with tempfile.TemporaryDirectory() as tmp:
        recs, classes = count(sorted(Path(p) for p in truth), args.model, args.detector, Path(tmp))
    results["PBC fields" + (" (classifier's test split)" if allowed is not None else "")] = {
        **score(recs, truth, classes), "matched": f"{len(by_thumb)} of {len(smear.fields)} fields matched to pbc/ images"}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
