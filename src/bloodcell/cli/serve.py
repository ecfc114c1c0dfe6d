"""``bloodcell serve``: a trained model behind an HTTP API and a web page.

The library is imported inside the handlers (lazy imports, marked): ``bloodcell --help`` and a bad
flag answer at once, without loading torch.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import sys

from bloodcell.cli.flags import bounded, threads_type
from bloodcell.config import (
    API_KEY_ENV,
    BACKENDS,
    MAX_BATCH,
    MAX_UPLOAD_MB,
    SERVE_MAX_PIXELS,
    SHUTDOWN_TIMEOUT_S,
)


def serve_key(args) -> str | None:
    """The API key (--api-key, else $BLOODCELL_API_KEY); refuses a non-loopback bind without one
    unless --insecure, which warns."""
    from bloodcell.errors import BloodcellError
    from bloodcell.serve.app import is_loopback  # lazy: start-up

    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if key is not None and len(key) < 16:
        raise BloodcellError("the API key is shorter than 16 characters; make a long random one, e.g. "
                             "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if not is_loopback(args.host) and key is None:
        if not args.insecure:
            raise BloodcellError(f"--host {args.host} is reachable from other machines: give an API key "
                                 f"(--api-key or ${API_KEY_ENV}), or --insecure to serve without one")
        print(f"bloodcell: warning: listening on {args.host}, reachable from other machines, with no "
              "API key (--insecure): anyone who can reach it can use it", file=sys.stderr)
    return key


def _detector(name: str | None, model: str) -> str | None:
    """--detector as a path for create_app: none -> None; not given -> the built-in where shipped,
    except beside an .onnx model, whose server loads no torch (a detector would)."""
    if name == "none" or (name is None and str(model).lower().endswith(".onnx")):
        return None
    from bloodcell.models.builtin import (  # lazy: torch, which a lean server never loads
        builtin_dir,
        resolve_run,
    )

    if name is None and not (builtin_dir() / "detector.pt").is_file():
        return None
    return resolve_run(name or "builtin", "detector")


def cmd_serve(args) -> int:
    """bloodcell serve model.onnx --port 8000   # then open http://127.0.0.1:8000/

    On a network: BLOODCELL_API_KEY=... bloodcell serve model.onnx --host 0.0.0.0 --workers 2
    """
    import uvicorn  # lazy: start-up

    from bloodcell.serve.app import CONFIG_ENV, create_app  # lazy: start-up

    key = serve_key(args)
    cfg = {"model": args.checkpoint, "max_upload_mb": args.max_upload_mb, "max_batch": args.max_batch,
           "backend": args.backend, "max_pixels": int(args.max_megapixels * 1e6),
           "decoders": args.decoders, "threads": args.threads, "api_key": key,
           "cors_origins": tuple(args.cors_origin or ()), "detector": _detector(args.detector, args.checkpoint)}
    app = create_app(**cfg)  # loads the model: a bad file is one clear line here, before any worker
    p = app.state.predictor
    print(f"serving {p.model_name} ({', '.join(p.classes)}; {p.backend}"
          f"{'' if getattr(p, 'has_cam', True) else ', no Grad-CAM'}) on http://{args.host}:{args.port}/"
          f"  (API docs at /docs{'; API key required' if key else ''}"
          f"{f'; {args.workers} workers' if args.workers > 1 else ''})", file=sys.stderr)
    common = {"host": args.host, "port": args.port, "log_level": args.log_level, "server_header": False,
              "timeout_graceful_shutdown": args.shutdown_timeout}
    if args.workers > 1:
        # Each worker process builds its own app (and model) from the environment; uvicorn's
        # supervisor shares the socket, handles SIGINT/SIGTERM and restarts a worker that dies.
        del app
        os.environ[CONFIG_ENV] = json.dumps({**cfg, "cors_origins": list(cfg["cors_origins"])})
        uvicorn.run("bloodcell.serve.app:app_from_env", factory=True, workers=args.workers, **common)
        return 0
    # uvicorn shuts down gracefully on SIGTERM or SIGINT (stops accepting, finishes the requests in
    # flight within --shutdown-timeout), then raises the signal again: it lands here, and the exit is 0
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.run(app, **common)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if received:
        print(f"bloodcell: serve stopped by {signal.Signals(received[0]).name}: no new requests taken, "
              "those in flight finished", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    """Register `bloodcell serve`."""
    p = sub.add_parser("serve", help="serve a trained model: HTTP API and web page",
                       description=inspect.cleandoc(cmd_serve.__doc__),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="an exported .onnx file (ONNX Runtime, no torch loaded, no Grad-CAM), "
                   "or a run folder (its best.pt) or checkpoint file (PyTorch, with Grad-CAM)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback only; any other needs an API key or --insecure)")
    p.add_argument("--port", type=bounded(int, 1, 65535), default=8000, help="TCP port (default 8000; %(type)s)")
    p.add_argument("--api-key", metavar="KEY",
                   help=f"require KEY (16+ characters) in the X-API-Key header of every API request "
                        f"(default ${API_KEY_ENV}; the variable keeps it out of the process list)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key (warns)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://lab.example.org) call the API; "
                        "repeatable (default: no cross-origin access)")
    p.add_argument("--max-upload-mb", type=bounded(float, 0, 10_000, "lo"), default=MAX_UPLOAD_MB,
                   help=f"largest accepted image file (default {MAX_UPLOAD_MB:g} MB; %(type)s)")
    p.add_argument("--max-megapixels", type=bounded(float, 0, 400, "lo"),  # data.images.MAX_PIXELS
                   default=SERVE_MAX_PIXELS / 1e6, metavar="MP",
                   help="most pixels an image may decode to, after JPEG's reduced-size decoding; larger "
                        f"ones get 413 before decoding (default {SERVE_MAX_PIXELS / 1e6:g}; %(type)s)")
    p.add_argument("--max-batch", type=bounded(int, 1, 10_000), default=MAX_BATCH,
                   help="most files per /predict/batch, and most concurrent requests per forward pass "
                        f"(default {MAX_BATCH}; %(type)s)")
    p.add_argument("--decoders", type=bounded(int, 0, 256), default=0, metavar="N",
                   help="threads that decode uploads, per worker: the most decoded at once (default 0: "
                        "none, the inference thread decodes each batch before its forward pass; %(type)s)")
    p.add_argument("--threads", type=threads_type(), default=0, metavar="N",
                   help="threads of a forward pass, per worker (default 0: the physical cores; %(type)s)")
    p.add_argument("--workers", type=bounded(int, 1, 256), default=1, metavar="N",
                   help="server processes, each with its own model (default 1; %(type)s)")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--detector", metavar="RUN",
                   help="cell detector for POST /count: a run folder (bloodcell detector train), its "
                        "detector.pt, builtin, or none (default: builtin where this install ships one, "
                        "none beside an .onnx model, which keeps the server free of torch)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info"])
    p.add_argument("--shutdown-timeout", type=bounded(float, 0, 3600), default=SHUTDOWN_TIMEOUT_S, metavar="S",
                   help="on SIGTERM or Ctrl-C, wait at most S seconds for the requests in flight "
                        f"(default {SHUTDOWN_TIMEOUT_S:g}; %(type)s)")
    p.set_defaults(func=cmd_serve, own_signals=True)
