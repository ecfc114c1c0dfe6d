"""Serve a trained model over HTTP: a JSON API (FastAPI) and a web page at ``/``.

Endpoints: ``POST /predict`` (one image, multipart field ``file``; ``?cam=true`` adds a Grad-CAM
overlay PNG as a data URL), ``POST /predict/batch`` (field ``files``, repeated), ``POST /count`` (a
whole field: its white cells found, typed and counted; with a detector), ``GET /health``,
``GET /model``, ``GET /examples`` (a few right and wrong test cells per class from the run
folder's predictions_test.csv, each with its Grad-CAM overlay) and the OpenAPI docs at ``/docs``.

An exported ``.onnx`` file is served by ``inference.onnx.OnnxPredictor``: no torch in the process, and
no Grad-CAM (``?cam=true`` gets 400, /examples is empty); a run folder or checkpoint by
``predict.Predictor``, with Grad-CAM. Concurrent /predict requests go through the model together
(``serve.batching.MicroBatcher``), decoded off the event loop: by the inference thread, batch by batch
(``decoders=0``), or by a pool of ``decoders`` threads (Pillow releases the GIL); either way that
bounds how many uploads decode at once.

Limits, each with a clear 4xx and the server still serving: a body above ``max_upload_mb`` gets
413 before it is read; an image above ``max_pixels`` to decode 413 from its header, before any
pixel is decoded; a body that is not multipart 415; a file that is not an image 415; an empty or
corrupt one 422. With ``api_key``, every endpoint but ``/`` (the page, which asks for the key) and
``/health`` needs it in the ``X-API-Key`` header (401 otherwise), compared in constant time. No
CORS unless ``cors_origins`` names origins. Error bodies carry no path, traceback or version.
"""


import asyncio
import base64
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated

import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool

from bloodcell.config import MAX_BATCH, MAX_UPLOAD_MB, MICRO_BATCH, SERVE_MAX_PIXELS
from bloodcell.data.images import ImageError, decode_image
from bloodcell.errors import BloodcellError
from bloodcell.inference.onnx import OnnxPredictor, result_rows
from bloodcell.serve.batching import MicroBatcher
from bloodcell.serve.middleware import FastPredict, UploadLimit, too_large

_MULTIPART_SLACK = 64 * 1024  # headers and boundaries of a multipart body
EXAMPLE_PX = 128  # side of the example cells' pictures on the page
KEY_HEADER = "X-API-Key"
CONFIG_ENV = "BLOODCELL_SERVE_CONFIG"  # create_app's arguments (JSON) for each uvicorn worker
log = logging.getLogger("bloodcell.serve.app")


def load_predictor(model, backend: str = "auto", threads: int = 0):
    """A Predictor as given, an OnnxPredictor for a .onnx file (no torch), else a Predictor of a run
    folder or checkpoint (torch; imported only then)."""
    if not isinstance(model, str | os.PathLike):
        return model
    if Path(model).suffix.lower() == ".onnx":
        if backend not in ("auto", "onnx"):
            raise BloodcellError(f"an .onnx file runs on ONNX Runtime only, not --backend {backend}")
        return OnnxPredictor(model, threads=threads)
    from bloodcell.inference.predict import Predictor  # lazy: torch, only for checkpoints

    return Predictor(model, backend=backend, threads=threads)


def data_url(png: bytes) -> str:
    """PNG bytes as a data: URL an <img> shows."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def examples_card(predictor, n_correct: int = 2, n_wrong: int = 2) -> dict:
    """What GET /examples returns: per class a few right and wrong test calls with their overlays."""
    if not getattr(predictor, "has_cam", True):
        return {"examples": [], "missing": 0}  # an ONNX file: no run folder, no Grad-CAM
    from bloodcell.inference.cam import overlay, png, upscale  # lazy: torch

    rows, missing = predictor.examples("test", n_correct, n_wrong)
    out = []
    for r in rows:
        heat = r["heat"] / max(float(r["heat"].max()), 1e-12)
        out.append({"path": r["path"], "label": r["label"], "pred": r["pred"],
                    "confidence": float(r["confidence"]), "correct": r["label"] == r["pred"],
                    "image_png": data_url(png(upscale(r["image"], EXAMPLE_PX))),
                    "cam_png": data_url(png(overlay(upscale(r["image"], EXAMPLE_PX), heat)))})
    return {"examples": out, "missing": len(missing)}


def model_card(predictor) -> dict:
    """What GET /model returns: classes, architecture, input, and the run's saved metrics."""
    meta = predictor.meta
    if predictor.model is not None:
        from bloodcell.models import count_parameters  # lazy: torch

        parameters = count_parameters(predictor.model)
    else:
        parameters = getattr(predictor, "parameters", None)
    metrics = {}
    path = Path(meta["path"]).parent / "metrics.json"
    if path.is_file():
        keep = ("n", "accuracy", "accuracy_ci", "macro_f1", "balanced_accuracy", "auc", "loss", "ece",
                "group_accuracy", "n_groups")
        for split, m in json.loads(path.read_text()).items():
            if split != "run" and isinstance(m, dict):
                metrics[split] = {k: m[k] for k in keep if k in m}
    return {"classes": predictor.classes,
            "architecture": {"name": predictor.model_name,
                             "kwargs": meta["model"]["kwargs"] if isinstance(meta.get("model"), dict) else {},
                             "parameters": parameters},
            "image_size": predictor.image_size, "resize": predictor.resize,
            "mean": meta["mean"], "std": meta["std"], "epoch": meta.get("epoch"),
            "checkpoint": Path(meta["path"]).name, "backend": predictor.backend,
            "cam": bool(getattr(predictor, "has_cam", True)), "metrics": metrics}


# What a client may get besides 200, in the schema the fuzzers read ({"detail": "..."} bodies)
ERRORS_DOC = {400: {"description": "cam=true from a server of an .onnx file, or a malformed body"},
              413: {"description": "body over --max-upload-mb, or image over --max-megapixels"},
              415: {"description": "not multipart/form-data, or not an image"},
              422: {"description": "no file field, an empty or corrupt image, or a bad parameter"}}
KEY_DOC = {401: {"description": "missing or wrong X-API-Key"}}


def key_guard(api_key: str | None) -> list:
    """The dependencies that require ``api_key`` in the X-API-Key header (none without a key)."""
    if not api_key:
        return []
    expected = api_key.encode()
    header = APIKeyHeader(name=KEY_HEADER, auto_error=False,
                          description="the key the server was started with (--api-key)")

    def check_key(key: Annotated[str | None, Security(header)]) -> None:
        # compare_digest: the time taken does not tell how much of a guess was right
        if key is None or not hmac.compare_digest(key.encode(), expected):
            raise HTTPException(401, f"missing or wrong API key: send it in the {KEY_HEADER} header",
                                headers={"WWW-Authenticate": KEY_HEADER})

    return [Depends(check_key)]


def multipart(request: Request) -> None:
    """A dependency: the body must be multipart/form-data (415 otherwise)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise HTTPException(415, f"send the image as multipart/form-data (field 'file'), "
                                 f"not {ctype[:80] or 'a body without a content type'}")


def status_of(e: ImageError) -> int:
    """The HTTP status of an image that cannot be used."""
    return {"unsupported": 415, "too_large": 413}.get(e.kind, 422)


class Service:
    """What the routes share: the predictor, the micro-batcher that feeds it, the decoders, the limits.

    ``decoders`` > 0: a pool of that many threads decodes; 0: the inference thread decodes each
    batch before its forward pass (one decode at a time per worker process).
    """

    def __init__(self, predictor, max_bytes: int, max_batch: int, max_pixels: int, decoders: int):
        self.predictor, self.max_bytes, self.max_batch, self.decoders = predictor, max_bytes, max_batch, decoders
        self.size, self.resize, self.max_pixels = predictor.image_size, predictor.resize, max_pixels
        self.has_cam = bool(getattr(predictor, "has_cam", True))
        self.batcher = MicroBatcher(predictor.probs, max_batch=min(max_batch, MICRO_BATCH),
                                    prepare=lambda data: decode_image(data, self.size, self.resize, max_pixels))
        self.decode_pool = (ThreadPoolExecutor(decoders, thread_name_prefix="bloodcell-decode") if decoders > 0
                            else self.batcher.executor)

    def read(self, upload: UploadFile) -> bytes:
        """An upload's bytes, 413 above the limit."""
        data = upload.file.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise HTTPException(413, too_large(len(data), self.max_bytes))
        return data

    async def decode(self, data: bytes) -> np.ndarray:
        """Decode off the event loop, as training decodes."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.decode_pool, decode_image, data, self.size, self.resize,
                                          self.max_pixels)

    async def predict_one(self, data: bytes, filename: str | None, top_k: int, tta: bool, cam: bool,
                          t0: float) -> dict:
        """/predict's answer (the route's and the fast path's); raises HTTPException."""
        if cam and not self.has_cam:
            raise HTTPException(400, "Grad-CAM needs the PyTorch checkpoint: this server runs an .onnx "
                                     "file (serve the run folder for cam=true)")
        try:
            arr = await self.decode(data) if self.decoders > 0 or cam else None
            probs = await self.batcher.submit(data if arr is None else arr, tta)
        except ImageError as e:
            raise HTTPException(status_of(e), f"{filename or 'upload'}: {e}") from None
        row = result_rows(probs[None], self.predictor.classes, top_k)[0]
        if cam:
            target = self.predictor.classes.index(row["class"])
            row["cam_png"] = data_url(await run_in_threadpool(self.predictor.cam_png, arr, target, data))
        return {"filename": filename, **row, "latency_ms": (time.perf_counter() - t0) * 1e3}

    async def predict_many(self, files: list[UploadFile], top_k: int, tta: bool) -> dict:
        """/predict/batch's answer: one forward pass for the good files, an error entry for each bad one."""
        t0 = time.perf_counter()
        if len(files) > self.max_batch:
            raise HTTPException(413, f"too many files: {len(files)}, the limit is {self.max_batch}")
        results: list[dict] = [{"filename": f.filename, "error": None} for f in files]
        decoded = await asyncio.gather(*(self.decode(self.read(f)) for f in files), return_exceptions=True)
        good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
        for i, d in enumerate(decoded):
            if isinstance(d, ImageError):
                results[i].update(error=str(d), status=status_of(d))
            elif not isinstance(d, np.ndarray):
                raise d
        if good:
            probs = await self.batcher.run(np.stack([decoded[i] for i in good]), tta)
            for i, row in zip(good, result_rows(probs, self.predictor.classes, top_k), strict=True):
                results[i].update(row)
        return {"results": results, "failed": len(results) - len(good),
                "latency_ms": (time.perf_counter() - t0) * 1e3}

    def limit_for(self, path: str) -> int:
        """The most bytes a request's body may hold (UploadLimit's bound)."""
        per_request = self.max_bytes * (self.max_batch if path.endswith("/batch") else 1)
        return per_request + _MULTIPART_SLACK


def add_error_handlers(app: FastAPI) -> None:
    """422 for a request the schema refuses (naming the missing field), 500 with no detail for a fault."""

    @app.exception_handler(RequestValidationError)
    async def missing_field(request: Request, exc: RequestValidationError):
        field = "files" if request.url.path.endswith("/batch") else "file"
        # only where and what: pydantic's own entries carry the input and a versioned docs URL
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()]
        missing = any(e["type"] == "missing" for e in errors)
        detail = (f"no image received: send multipart/form-data with a '{field}' field" if missing
                  else "invalid request: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                       for e in errors)[:300])
        return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("error serving %s %s", request.method, request.url.path)  # the log has it all
        return JSONResponse(status_code=500, content={"detail": "internal server error"})


def add_info_routes(app: FastAPI, predictor, guarded: list, key_doc: dict | None) -> None:
    """The page, /health, /model and /examples."""
    card = model_card(predictor)
    shown: dict = {}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return resources.files("bloodcell.serve").joinpath("static/index.html").read_text()

    @app.get("/health")
    async def health() -> dict:
        """Liveness: the model is loaded (open without the API key, for load balancers)."""
        return {"status": "ok", "model": predictor.model_name, "backend": predictor.backend}

    @app.get("/model", dependencies=guarded, responses=key_doc)
    async def model_info() -> dict:
        """Classes, architecture, input size and normalisation, and the run's saved test metrics."""
        return card

    @app.get("/examples", dependencies=guarded, responses=key_doc)
    def examples() -> dict:
        """Per class two right test calls (the surest, the least sure) and the two most confident
        wrong ones, each with its Grad-CAM overlay (none for an ONNX file)."""
        if not shown:  # computed on first request, then kept: the saved predictions do not change
            shown.update(examples_card(predictor))
        return shown


def add_predict_routes(app: FastAPI, service: Service, guarded: list, errors_doc: dict) -> None:
    """POST /predict and POST /predict/batch."""
    n_classes = len(service.predictor.classes)

    @app.post("/predict", dependencies=[*guarded, Depends(multipart)], responses=errors_doc)
    async def predict(file: Annotated[UploadFile, File(description="one image file (JPEG, PNG, BMP, TIFF)")],
                      top_k: Annotated[int, Query(ge=1, le=1000, description="classes listed in top_k")] = n_classes,
                      tta: Annotated[bool, Query(description="average over the 8 flips and rotations")] = False,
                      cam: Annotated[bool, Query(description="add a Grad-CAM overlay PNG (data URL); "
                                                             "needs a checkpoint, not an .onnx file")] = False,
                      ) -> dict:
        """Class probabilities of one image, with the server's latency in milliseconds."""
        return await service.predict_one(service.read(file), file.filename, top_k, tta, cam, time.perf_counter())

    @app.post("/predict/batch", dependencies=[*guarded, Depends(multipart)], responses=errors_doc)
    async def predict_batch(files: Annotated[list[UploadFile], File(description="image files")],
                            top_k: Annotated[int, Query(ge=1, le=1000)] = 1, tta: bool = False) -> dict:
        """Class probabilities of several images in one forward pass; bad files get an error entry."""
        return await service.predict_many(files, top_k, tta)


def add_count_route(app: FastAPI, service: Service, detector, guarded: list, errors_doc: dict) -> None:
    """POST /count: a whole field's white cells found, typed and counted (404 without a detector)."""
    counter = None
    if detector is not None:
        from bloodcell.inference.count import FieldCounter  # lazy: torch, only with a detector

        counter = FieldCounter(service.predictor, detector)

    @app.post("/count", dependencies=[*guarded, Depends(multipart)],
              responses={**errors_doc, 404: {"description": "this server has no cell detector"}})
    async def count(file: Annotated[UploadFile, File(description="one field image (JPEG, PNG, BMP, TIFF)")]) -> dict:
        """The white cells of one field (boxes in the image's pixels, type, probability, runner-up),
        the field's counts per detected class, and its differential."""
        if counter is None:
            raise HTTPException(404, "this server has no cell detector: start it with --detector RUN (or builtin)")
        t0 = time.perf_counter()
        data = service.read(file)
        try:
            result = await run_in_threadpool(count_bytes, counter, data, service.max_pixels)
        except ImageError as e:
            raise HTTPException(status_of(e), f"{file.filename or 'upload'}: {e}") from None
        return {"filename": file.filename, **result, "latency_ms": (time.perf_counter() - t0) * 1e3}


def count_bytes(counter, data: bytes, max_pixels: int) -> dict:
    """/count's work, off the event loop: decode the field under the pixel limit, count it."""
    from bloodcell.inference.count import read_field
    from bloodcell.metrics import differential

    if not data:
        raise ImageError("empty file", "empty")
    r = counter.count_field(read_field(data, max_pixels))
    return {**r, "differential": differential([c["label"] for c in r["cells"]], counter.classes)}


def create_app(model, max_upload_mb: float = MAX_UPLOAD_MB, max_batch: int = MAX_BATCH,
               backend: str = "auto", max_pixels: int = SERVE_MAX_PIXELS, decoders: int = 0,
               threads: int = 0, api_key: str | None = None, cors_origins: tuple[str, ...] = (),
               detector=None):
    """The FastAPI app for a .onnx file, run folder, checkpoint or already loaded predictor.

    ``decoders`` threads decode uploads (0: none, the inference thread decodes each micro-batch),
    ``threads`` run the model (0: the physical cores); ``api_key``: required in the X-API-Key
    header; ``cors_origins``: allowed cross-origin callers (none by default); ``detector``: a
    detector run folder, file or loaded Detector, for POST /count (none: /count answers 404).
    """
    predictor = load_predictor(model, backend, threads)
    if isinstance(detector, str | os.PathLike):
        from bloodcell.inference.detect import Detector  # lazy: torch, only with a detector

        detector = Detector(detector, threads=threads)
    service = Service(predictor, int(max_upload_mb * 1e6), max_batch, max_pixels, decoders)
    # the API's version, not bloodcell's: what a server runs is nobody else's business
    app = FastAPI(title="bloodcell", version="1",
                  description=f"Blood-cell classification with {predictor.model_name} "
                              f"({', '.join(predictor.classes)}).")
    app.state.predictor, app.state.batcher = predictor, service.batcher
    guarded = key_guard(api_key)
    add_error_handlers(app)
    add_info_routes(app, predictor, guarded, KEY_DOC if api_key else None)
    add_predict_routes(app, service, guarded, {**ERRORS_DOC, **(KEY_DOC if api_key else {})})
    add_count_route(app, service, detector, guarded, {**ERRORS_DOC, **(KEY_DOC if api_key else {})})
    # Starlette runs the middleware added last first: UploadLimit sees the body before FastPredict.
    app.add_middleware(FastPredict, handler=service.predict_one, api_key=api_key, max_bytes=service.max_bytes,
                       default_top_k=len(predictor.classes))
    app.add_middleware(UploadLimit, limit_for=service.limit_for)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware  # lazy: only where asked

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=[KEY_HEADER])
    return app


def app_from_env():
    """The app of one uvicorn worker (``serve --workers N``): create_app's arguments from the
    environment (CONFIG_ENV, JSON), which the parent sets before it starts the workers."""
    cfg = json.loads(os.environ[CONFIG_ENV])
    cfg["cors_origins"] = tuple(cfg.get("cors_origins", ()))
    return create_app(**cfg)


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
