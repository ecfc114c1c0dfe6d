"""The review page: a person goes through the white cells of a count, sees each one's crop, type and
probability, and corrects the type with a key; every decision is written the moment it is made.

``create_review_app(folder)`` serves a folder ``bloodcell count --out`` wrote (or, with
``predictions``, a folder of images and the CSV ``bloodcell predict --format csv`` wrote about them;
inference.review reads both). Routes: ``GET /`` (static/review.html), ``GET /api/cells`` (the classes
and the cells in review order, least sure first or at random, each with its decision so far), ``POST /api/label`` (JSON
``{"cell": ID, "label": CLASS | "not_wbc" | "unsure" | null}``; null takes a decision back) and
``GET /crops/{ID}`` (a listed cell's image and nothing else: any other path is 404).

After every decision two files in the folder are rewritten whole, each atomically
(runfiles.write_csv), review.csv first:

- ``review.csv``: every decision, ``not_wbc`` and ``unsure`` included (path, label, predicted, prob,
  group, slide, time): the review's record, which the page is restored from and labels.csv is made from.
- ``labels.csv``: the decisions that name a class, as a label table (path, label, group, source):
  ``bloodcell train --data FOLDER/labels.csv`` reads it (data.tables: paths relative to the table's
  folder; group the field image, so one field's cells stay in one split; source ``review``, a column
  the reader ignores). A cell that is not a white cell, or that nobody could type, is not in it, so
  it never becomes a class.

A server that stops between the two writes leaves labels.csv one decision behind; the next start
makes it from review.csv again. A decision in review.csv about a cell the folder no longer lists
(a count run again) is kept as it is.
"""

from __future__ import annotations

import csv
import errno
import mimetypes
import os
import threading
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from bloodcell.errors import BloodcellError
from bloodcell.inference.review import (
    NOT_CLASSES,
    NOT_WBC,
    ORDERS,
    UNSURE,
    Cells,
    read_cells,
    review_order,
)
from bloodcell.runfiles import write_csv

REVIEW_FILE, LABELS_FILE = "review.csv", "labels.csv"
REVIEW_COLUMNS = ["path", "label", "predicted", "prob", "group", "slide", "time"]
# split "train": every labelled cell is one to learn from (the few-label fine-tune chooses by the cells'
# own cross-validation, so no test split is carved out of a handful of cells)
LABEL_COLUMNS = ["path", "label", "group", "split", "source"]
MARKS = {NOT_WBC: "not a white cell", UNSURE: "unsure"}


class Decisions:
    """The decisions made so far, by cell, and the two files that hold them; one writer at a time."""

    def __init__(self, root: Path, found: Cells):
        self.root, self.classes = root, found.classes
        self.cells = {c.id: c for c in found.cells}
        self.lock = threading.Lock()
        if (root / LABELS_FILE).exists() and not (root / REVIEW_FILE).exists():
            raise BloodcellError(f"{root / LABELS_FILE} was not written by a review (there is no {REVIEW_FILE} "
                                 "beside it): move it away, or it would be overwritten")
        self.rows = self._read()
        if self.rows:
            with self.lock:
                self._write(review=False)  # labels.csv agrees with review.csv from the start

    def _read(self) -> dict[str, dict]:
        path = self.root / REVIEW_FILE
        if not path.is_file():
            return {}
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if not {"path", "label"} <= set(reader.fieldnames or []):
                    raise BloodcellError(f"{path} is not a review record (no path and label columns); move it "
                                         "away to start a review here")
                return {r["path"]: {k: r.get(k) or "" for k in REVIEW_COLUMNS} for r in reader if r.get("path")}
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise BloodcellError(f"cannot read {path}: {e}") from e

    def label(self, cell_id: str) -> str | None:
        """The cell's decision, None where there is none."""
        row = self.rows.get(cell_id)
        return row["label"] if row else None

    def set(self, cell_id: str, label: str | None) -> int:
        """Record (None: take back) a decision and write both files; returns how many decisions there are."""
        c = self.cells[cell_id]
        with self.lock:
            before = dict(self.rows)
            if label is None:
                self.rows.pop(cell_id, None)
            else:
                self.rows[cell_id] = {"path": cell_id, "label": label, "predicted": c.label, "prob": f"{c.prob:.4f}",
                                      "group": c.field, "slide": c.slide,
                                      "time": datetime.now(UTC).isoformat(timespec="seconds")}
            try:
                self._write()
            except OSError:
                self.rows = before  # the page says it was not saved; the files hold the old decisions
                raise
            return len(self.rows)

    def label_rows(self) -> list[dict]:
        """labels.csv's rows: the decisions that name a class, of cells whose image is still there."""
        return [{"path": r["path"], "label": r["label"], "group": r["group"], "split": "train", "source": "review"}
                for r in self.rows.values()
                if r["label"] and r["label"] not in NOT_CLASSES
                and (r["path"] in self.cells or (self.root / r["path"]).is_file())]

    def _write(self, review: bool = True) -> None:
        if review:
            write_csv(self.root / REVIEW_FILE, sorted(self.rows.values(), key=lambda r: r["path"]), REVIEW_COLUMNS)
        write_csv(self.root / LABELS_FILE, sorted(self.label_rows(), key=lambda r: r["path"]), LABEL_COLUMNS)


class LabelIn(BaseModel):
    """A decision about one cell."""

    cell: str = Field(max_length=4096, description="the cell's id (its image's path relative to the folder)")
    label: str | None = Field(max_length=256, description="a class, 'not_wbc', 'unsure', or null to take "
                                                          "the decision back")


def json_body(request: Request) -> None:
    """A dependency: the body must be JSON (415 otherwise), which a page of another site cannot send
    here without the browser asking first (and being refused: no CORS)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise HTTPException(415, "send the decision as application/json")


def cells_card(found: Cells, decisions: Decisions, root: Path, order: str = "unsure", seed: int = 0) -> dict:
    """What GET /api/cells returns, cells in review order."""
    known = set(found.classes) | set(NOT_CLASSES)  # a decision of an earlier review with other classes: none
    cells = []
    for rank, i in enumerate(review_order(found.cells, order=order, seed=seed)):
        c = found.cells[i]
        decision = decisions.label(c.id)
        cells.append({**asdict(c), "rank": rank, "decision": decision if decision in known else None})
    return {"folder": root.resolve().name, "source": Path(found.source).name, "classes": found.classes,
            "marks": MARKS, "labels_file": LABELS_FILE, "review_file": REVIEW_FILE, "order": order, "cells": cells}


def create_review_app(folder: str | os.PathLike, predictions: str | os.PathLike | None = None,
                      order: str = "unsure", seed: int = 0) -> FastAPI:
    """The review app of a count folder (or of images under ``folder`` with a predict CSV), its cells
    in ``order`` (inference.review.review_order); a BloodcellError (one line) where there is nothing
    to review or the folder cannot be written."""
    if order not in ORDERS:
        raise BloodcellError(f"unknown review order {order!r}; known: {', '.join(ORDERS)}")
    root = Path(folder)
    found = read_cells(root, predictions)
    if not found.cells:
        why = f" ({len(found.skipped)} rows left out; first: {found.skipped[0]})" if found.skipped else ""
        raise BloodcellError(f"{found.source}: no cell to review{why}")
    if not os.access(root, os.W_OK):
        raise BloodcellError(f"{folder}: cannot write there, and the corrections go to {LABELS_FILE} in it")
    decisions = Decisions(root, found)
    page = resources.files("bloodcell.serve").joinpath("static/review.html").read_text()
    app = FastAPI(title="bloodcell review", version="1", docs_url=None, redoc_url=None)
    app.state.found, app.state.decisions = found, decisions
    allowed = set(found.classes) | set(NOT_CLASSES)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/api/cells")
    def cells() -> dict:
        """The classes and every cell (review order), each with its decision so far."""
        return cells_card(found, decisions, root, order, seed)

    @app.post("/api/label", dependencies=[Depends(json_body)],
              responses={404: {"description": "no such cell"}, 415: {"description": "not JSON"},
                         422: {"description": "a label that is not a class, not_wbc or unsure"}})
    def label(body: LabelIn) -> dict:
        """Record a decision and write review.csv and labels.csv before answering."""
        if body.cell not in decisions.cells:
            raise HTTPException(404, "no such cell")
        if body.label is not None and body.label not in allowed:
            raise HTTPException(422, f"label must be one of: {', '.join(sorted(allowed))}, or null")
        try:
            n = decisions.set(body.cell, body.label)
        except OSError as e:
            raise HTTPException(507 if e.errno == errno.ENOSPC else 500, f"not saved: {e.strerror or 'write failed'}") from None
        return {"cell": body.cell, "label": body.label, "decisions": n}

    @app.get("/crops/{cell_id:path}", include_in_schema=False)
    async def crop(cell_id: str) -> Response:
        # only a listed cell's image, and only where it still resolves to a file under the folder
        path = root / cell_id
        if cell_id not in decisions.cells or not path.resolve().is_relative_to(root.resolve()) or not path.is_file():
            raise HTTPException(404, "no such cell image")
        # read here, not by FileResponse's thread hops: a crop is a few kB, and a screenful of them
        # should not hold up the decision posted behind them (measured: 2,000 cells, tests/test_review.py)
        return Response(path.read_bytes(), media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream",
                        headers={"Cache-Control": "private, max-age=3600"})

    return app
