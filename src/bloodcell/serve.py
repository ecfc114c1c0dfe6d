"""Serve a trained model over HTTP: a JSON API (FastAPI) and a web page at ``/``.

Endpoints: ``POST /predict`` (one image, multipart field ``file``; ``?cam=true`` adds a Grad-CAM
overlay PNG as a data URL), ``POST /predict/batch`` (field ``files``, repeated), ``GET /health``,
``GET /model``, ``GET /examples`` (a few right and wrong test cells per class from the run
folder's predictions_test.csv, each with its Grad-CAM overlay) and the OpenAPI docs at ``/docs``. Uploads above ``max_upload_mb`` get 413 before the
body is read; bodies that are not multipart get 415; files that are not images 415; empty or
corrupt images 422. Each error says what was wrong, and the server keeps serving.
"""


import base64
import ipaddress
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated

import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bloodcell.cam import overlay, png, upscale
from bloodcell.config import MAX_BATCH, MAX_UPLOAD_MB
from bloodcell.errors import BloodcellError
from bloodcell.models import count_parameters
from bloodcell.predict import ImageError, Predictor, decode_image

_MULTIPART_SLACK = 64 * 1024  # headers and boundaries of a multipart body
EXAMPLE_PX = 128  # side of the example cells' pictures on the page
# The errors an upload can get, in the OpenAPI schema (tests/test_fuzz.py holds the server to it).
UPLOAD_ERRORS = {s: {"description": d} for s, d in (
    (400, "not a multipart form"), (413, "upload too large, or too many files"),
    (415, "not an image the decoder reads"), (422, "a missing field, or a corrupt image"))}


def data_url(png: bytes) -> str:
    """PNG bytes as a data: URL an <img> shows."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def examples_card(predictor: Predictor, n_correct: int = 2, n_wrong: int = 2) -> dict:
    """What GET /examples returns: per class a few right and wrong test calls with their overlays."""
    rows, missing = predictor.examples("test", n_correct, n_wrong)
    out = []
    for r in rows:
        heat = r["heat"] / max(float(r["heat"].max()), 1e-12)
        out.append({"path": r["path"], "label": r["label"], "pred": r["pred"],
                    "confidence": float(r["confidence"]), "correct": r["label"] == r["pred"],
                    "image_png": data_url(png(upscale(r["image"], EXAMPLE_PX))),
                    "cam_png": data_url(png(overlay(upscale(r["image"], EXAMPLE_PX), heat)))})
    return {"examples": out, "missing": len(missing)}


def model_card(predictor: Predictor) -> dict:
    """What GET /model returns: classes, architecture, input, and the run's saved metrics."""
    meta = predictor.meta
    metrics = {}
    path = Path(meta["path"]).parent / "metrics.json"
    if path.is_file():
        keep = ("n", "accuracy", "accuracy_ci", "macro_f1", "balanced_accuracy", "auc", "loss", "ece",
                "group_accuracy", "n_groups")
        for split, m in json.loads(path.read_text()).items():
            if split != "run" and isinstance(m, dict):
                metrics[split] = {k: m[k] for k in keep if k in m}
    return {"classes": predictor.classes,
            "architecture": {"name": predictor.model_name, "kwargs": meta["model"]["kwargs"],
                             "parameters": count_parameters(predictor.model)},
            "image_size": predictor.image_size, "resize": predictor.resize,
            "mean": meta["mean"], "std": meta["std"], "epoch": meta.get("epoch"),
            "checkpoint": Path(meta["path"]).name, "backend": predictor.backend,
            "metrics": metrics}


class UploadLimit:
    """ASGI middleware: 413 for request bodies above a limit, declared (Content-Length) or streamed."""

    def __init__(self, app, limit_for):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _json(send, 413, _too_large(int(declared), limit))
        seen = 0
        started = False

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                # An HTTPException passes through FastAPI's body parsing unchanged (a 413).
                raise StarletteHTTPException(413, _too_large(seen, limit))
            return message

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except StarletteHTTPException as e:
            if e.status_code != 413 or started:
                raise
            await _json(send, 413, e.detail)


def _too_large(n: int, limit: int) -> str:
    return f"upload too large: {n / 1e6:.1f} MB, the limit is {limit / 1e6:.1f} MB"


async def _json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(model: str | os.PathLike | Predictor, max_upload_mb: float = MAX_UPLOAD_MB,
               max_batch: int = MAX_BATCH, backend: str = "auto"):
    """The FastAPI app for a run folder, checkpoint or already loaded Predictor."""
    predictor = model if isinstance(model, Predictor) else Predictor(model, backend=backend)
    max_bytes = int(max_upload_mb * 1e6)
    card = model_card(predictor)
    n_classes = len(predictor.classes)
    app = FastAPI(title="bloodcell", version=predictor.meta.get("bloodcell_version", ""),
                  description=f"Blood-cell classification with {predictor.model_name} "
                              f"({', '.join(predictor.classes)}).")
    app.state.predictor = predictor

    def multipart(request: Request) -> None:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise HTTPException(415, f"send the image as multipart/form-data (field 'file'), "
                                     f"not {ctype or 'a body without a content type'}")

    def read(upload: UploadFile) -> bytes:
        data = upload.file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, _too_large(len(data), max_bytes))
        return data

    def status_of(e: ImageError) -> int:
        return 415 if e.kind == "unsupported" else 422

    @app.exception_handler(RequestValidationError)
    async def missing_field(request: Request, exc: RequestValidationError):
        field = "files" if request.url.path.endswith("/batch") else "file"
        return JSONResponse(status_code=422, content={
            "detail": f"no image received: send multipart/form-data with a '{field}' field",
            "errors": json.loads(json.dumps(exc.errors(), default=str))})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return resources.files("bloodcell").joinpath("static/index.html").read_text()

    @app.get("/health")
    def health() -> dict:
        """Liveness: the model is loaded."""
        return {"status": "ok", "model": predictor.model_name, "backend": predictor.backend}

    @app.get("/model")
    def model_info() -> dict:
        """Classes, architecture, input size and normalisation, and the run's saved test metrics."""
        return card

    shown: dict = {}

    @app.get("/examples")
    def examples() -> dict:
        """Per class two right test calls (the surest, the least sure) and the two most confident
        wrong ones, each with its Grad-CAM overlay."""
        if not shown:  # computed on first request, then kept: the saved predictions do not change
            shown.update(examples_card(predictor))
        return shown

    @app.post("/predict", dependencies=[Depends(multipart)], responses=UPLOAD_ERRORS)
    def predict(file: Annotated[UploadFile, File(description="one image file (JPEG, PNG, BMP, TIFF)")],
                top_k: Annotated[int, Query(ge=1, description="classes listed in top_k")] = n_classes,
                tta: Annotated[bool, Query(description="average over the 8 flips and rotations")] = False,
                cam: Annotated[bool, Query(description="add a Grad-CAM overlay PNG (data URL)")] = False,
                ) -> dict:
        """Class probabilities of one image, with the server's latency in milliseconds."""
        t0 = time.perf_counter()
        data = read(file)
        try:
            row = predictor.predict_bytes(data, top_k=top_k, tta=tta, cam=cam)
        except ImageError as e:
            raise HTTPException(status_of(e), f"{file.filename or 'upload'}: {e}") from None
        if cam:
            row["cam_png"] = data_url(row["cam_png"])
        return {"filename": file.filename, **row, "latency_ms": (time.perf_counter() - t0) * 1e3}

    @app.post("/predict/batch", dependencies=[Depends(multipart)], responses=UPLOAD_ERRORS)
    def predict_batch(files: Annotated[list[UploadFile], File(description="image files")],
                      top_k: Annotated[int, Query(ge=1)] = 1, tta: bool = False) -> dict:
        """Class probabilities of several images in one forward pass; bad files get an error entry."""
        t0 = time.perf_counter()
        if len(files) > max_batch:
            raise HTTPException(413, f"too many files: {len(files)}, the limit is {max_batch}")
        results: list[dict] = []
        good, arrays = [], []
        for f in files:
            try:
                arrays.append(decode_image(read(f), predictor.image_size, predictor.resize))
                good.append(len(results))
                results.append({"filename": f.filename, "error": None})
            except ImageError as e:
                results.append({"filename": f.filename, "error": str(e), "status": status_of(e)})
        if arrays:
            for i, row in zip(good, predictor.rows(np.stack(arrays), top_k, tta), strict=True):
                results[i].update(row)
        return {"results": results, "failed": len(results) - len(good),
                "latency_ms": (time.perf_counter() - t0) * 1e3}

    def limit_for(path: str) -> int:
        per_request = max_bytes * (max_batch if path.endswith("/batch") else 1)
        return per_request + _MULTIPART_SLACK

    app.add_middleware(UploadLimit, limit_for=limit_for)
    return app


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def serving(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Run the app under uvicorn in a background thread; yields its base URL (port 0: a free one)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise BloodcellError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
