"""Find cells in whole fields with a trained detector (training.detect's detector.pt).

``Detector(RUN)`` loads a detector run folder (its detector.pt) or the file; ``detect(field)`` takes a
field as uint8 H x W x 3 at its original size, or ``detect_scaled`` one already scaled to the
detector's input (data.images.decode_field), and returns the cells found: class, score and box in
the original image's pixels, each class above the threshold its training chose on validation.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bloodcell.errors import BloodcellError
from bloodcell.models.builtin import BUILTIN, builtin_path
from bloodcell.models.detector import CellDetector, decode, field_batch
from bloodcell.runtime import set_threads

FORMAT = "bloodcell-detector/1"


def resolve_detector(path: str | os.PathLike) -> Path:
    """A run folder means its detector.pt; a file means itself; ``builtin`` the detector bloodcell
    ships (models.builtin), as checkpoint.resolve does for a classifier."""
    if str(path) == BUILTIN:
        return builtin_path("detector")
    p = Path(path)
    if p.is_dir():
        p = p / "detector.pt"
    if not p.is_file():
        raise BloodcellError(f"no detector at {path} (a folder with detector.pt, from 'bloodcell detector "
                             "train', or that file)")
    return p


def read_detector(path: str | os.PathLike) -> dict:
    """The checkpoint dict of a detector; one clear line when the file is not one."""
    p = resolve_detector(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a file that is not a checkpoint is one line
        raise BloodcellError(f"{p}: not a bloodcell detector ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise BloodcellError(f"{p}: not a bloodcell detector (format {ckpt.get('format') if isinstance(ckpt, dict) else '?'!r})")
    return ckpt


class Detector:
    """A loaded detector: fields in, cells (class, score, box) out."""

    def __init__(self, checkpoint: str | os.PathLike, threads: int = 0):
        self.path = resolve_detector(checkpoint)
        ckpt = read_detector(self.path)
        self.classes: list[str] = list(ckpt["classes"])
        self.input_size: int = int(ckpt["input_size"])
        self.thresholds: dict[str, float] = {c: float(ckpt["thresholds"].get(c, 0.3)) for c in self.classes}
        self.meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
        set_threads(threads)
        self.model = CellDetector(len(self.classes), int(ckpt.get("width", 32)))
        try:
            self.model.load_state_dict(ckpt["state_dict"])
        except (RuntimeError, KeyError) as e:
            raise BloodcellError(f"{self.path}: its weights do not fit the detector ({str(e).splitlines()[0][:120]})") from None
        self.model.eval().to(memory_format=torch.channels_last)
        self.lock = threading.Lock()
        self._low = min(self.thresholds.values())

    def scale_for(self, width: int, height: int) -> float:
        return self.input_size / max(width, height)

    def detect(self, field: np.ndarray) -> list[dict]:
        """Cells in one field given at its original size (uint8 H x W x 3)."""
        h, w = field.shape[:2]
        s = self.scale_for(w, h)
        small = np.asarray(Image.fromarray(field).resize((max(1, round(w * s)), max(1, round(h * s))),
                                                         Image.BILINEAR, reducing_gap=2.0))
        return self.detect_scaled([small], [s], [(w, h)])[0]

    def detect_scaled(self, fields: list[np.ndarray], scales: list[float], sizes: list[tuple[int, int]]
                      ) -> list[list[dict]]:
        """Cells in fields already scaled to the input size (by ``scales``), boxes in original pixels
        (``sizes``: each original width, height), each class at its threshold."""
        return self.detect_scaled_all(fields, scales, sizes, at_threshold=True)

    @torch.no_grad()
    def detect_scaled_all(self, fields: list[np.ndarray], scales: list[float], sizes: list[tuple[int, int]],
                          at_threshold: bool = False, floor: float = 0.05) -> list[list[dict]]:
        """As detect_scaled; without ``at_threshold`` every detection scoring ``floor`` or more (what
        an AP needs)."""
        x = field_batch(fields)
        with self.lock:
            heat, wh = self.model(x)
        out = []
        for i, (s, (w, h)) in enumerate(zip(scales, sizes, strict=True)):
            rows = decode(heat[i:i + 1], wh[i:i + 1], self._low if at_threshold else floor, scale=s)[0]
            cells = []
            for k, score, x0, y0, x1, y1 in rows:
                c = self.classes[k]
                if at_threshold and score < self.thresholds[c]:
                    continue
                box = [max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)]
                if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                    continue
                cells.append({"class": c, "score": float(score), "box": [round(v, 1) for v in box]})
            out.append(sorted(cells, key=lambda r: (r["class"] != "wbc", -r["score"])))
        return out


def evaluate_boxes(detector: Detector, fields: list, annotated: list[str]) -> dict:
    """A detector on boxed fields (data.boxes.BoxField): per annotated class AP at IoU 0.5 (over
    every detection scoring 0.05 or more) and precision, recall and F1 at the detector's own
    threshold; the threshold is the detector's, never chosen on these fields."""
    from bloodcell.data.images import decode_field
    from bloodcell.training.detect import score_detections  # the one scoring, shared with training

    dets = []
    for f in fields:
        img, s, (w, h) = decode_field(f.path, detector.input_size)
        rows = []
        for c in detector.detect_scaled_all([img], [s], [(w, h)])[0]:
            rows.append((detector.classes.index(c["class"]), c["score"], *c["box"]))
        dets.append(rows)
    return score_detections(fields, dets, detector.classes, annotated, detector.thresholds)
