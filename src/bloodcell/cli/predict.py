"""``bloodcell predict``, ``bloodcell export`` and ``bloodcell serve``: using a trained model.

The library is imported inside the handlers (lazy imports, marked): ``bloodcell --help`` and a bad
flag answer at once, without loading torch.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import io
import json
import os
import signal
import sys
import time

from bloodcell.config import (
    API_KEY_ENV,
    BACKENDS,
    EXPORT_FORMATS,
    MAX_BATCH,
    MAX_UPLOAD_MB,
    SERVE_MAX_PIXELS,
    SHUTDOWN_TIMEOUT_S,
)


def format_rows(rows: list[dict], fmt: str, classes: list[str]) -> str:
    """Rows as an aligned table, CSV (every class's probability) or JSON."""
    if fmt == "json":
        return json.dumps(rows, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        extra = ["cam"] if any("cam" in r for r in rows) else []
        w.writerow(["path", "class", "probability", *[f"p_{c}" for c in classes], "error", *extra])
        for r in rows:
            if r.get("error"):
                w.writerow([r["path"], "", "", *[""] * len(classes), r["error"], *[""] * len(extra)])
            else:
                w.writerow([r["path"], r["class"], f"{r['probability']:.6f}",
                            *[f"{r['probs'][c]:.6f}" for c in classes], "",
                            *[r.get("cam", "") for _ in extra]])
        return buf.getvalue().rstrip("\n")
    width = max([len("path"), *(len(r["path"]) for r in rows)])
    k = max((len(r.get("top_k", [])) for r in rows), default=1)
    head = f"{'path':<{width}}  {'class':<12} {'prob':>6}"
    if k > 1:
        head += "  " + "  ".join(f"{'top' + str(i + 1):<19}" for i in range(1, k))
    lines = [head]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['path']:<{width}}  ERROR: {r['error']}")
            continue
        line = f"{r['path']:<{width}}  {r['class']:<12} {r['probability']:>6.3f}"
        for t in r["top_k"][1:]:
            line += f"  {t['class']:<12} {t['probability']:>6.3f}"
        lines.append(line)
    return "\n".join(lines)


def cmd_predict(args) -> int:
    """bloodcell predict runs/cnn4x32 cells/*.jpeg new_cell.png --top-k 2 --cam cams/ --format table"""
    from bloodcell.predict import Predictor, expand_inputs  # lazy: start-up

    paths = expand_inputs(args.paths)
    t0 = time.perf_counter()
    predictor = Predictor(args.checkpoint, device=args.device, backend=args.backend)
    rows = predictor.predict_paths(paths, top_k=args.top_k, tta=args.tta, batch_size=args.batch_size,
                                   cam_dir=args.cam)
    print(format_rows(rows, args.format, predictor.classes))
    failed = sum(1 for r in rows if r.get("error"))
    print(f"{len(rows) - failed} predicted, {failed} failed, {time.perf_counter() - t0:.2f}s "
          f"({predictor.model_name}, {predictor.backend})", file=sys.stderr)
    return 1 if failed else 0


def cmd_export(args) -> int:
    """bloodcell export runs/cnn4x32 --format onnx --out cnn4x32.onnx"""
    from bloodcell.export import export_model  # lazy: start-up

    out = args.out or f"model.{'onnx' if args.format == 'onnx' else 'pt'}"
    s = export_model(args.checkpoint, args.format, out, quantize=args.quantize)
    meta = s["metadata"]
    check = (f"top-1 agreement with PyTorch {100 * s['agreement']:.1f} % on the calibration images"
             if s["agreement"] is not None else f"max |difference| vs PyTorch {s['max_abs_diff']:.1e}")
    print(f"wrote {s['path']} ({s['format']}{', int8' if args.quantize == 'int8' else ''}, "
          f"{s['bytes'] / 1e6:.2f} MB): {meta['model']}, {meta['image_size']} px, classes "
          f"{', '.join(meta['classes'])}; {check}")
    return 0


def serve_key(args) -> str | None:
    """The API key (--api-key, else $BLOODCELL_API_KEY); refuses a non-loopback bind without one
    unless --insecure, which warns."""
    from bloodcell.errors import BloodcellError
    from bloodcell.serve import is_loopback  # lazy: start-up

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


def cmd_serve(args) -> int:
    """bloodcell serve model.onnx --port 8000   # then open http://127.0.0.1:8000/

    On a network: BLOODCELL_API_KEY=... bloodcell serve model.onnx --host 0.0.0.0 --workers 2
    """
    import uvicorn  # lazy: start-up

    from bloodcell.serve import CONFIG_ENV, create_app  # lazy: start-up

    key = serve_key(args)
    cfg = {"model": args.checkpoint, "max_upload_mb": args.max_upload_mb, "max_batch": args.max_batch,
           "backend": args.backend, "max_pixels": int(args.max_megapixels * 1e6),
           "decoders": args.decoders, "threads": args.threads, "api_key": key,
           "cors_origins": tuple(args.cors_origin or ())}
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
        uvicorn.run("bloodcell.serve:app_from_env", factory=True, workers=args.workers, **common)
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
    """Register `bloodcell predict`, `bloodcell export` and `bloodcell serve`."""
    p = sub.add_parser("predict", help="predict the class of image files, folders or globs",
                       description=cmd_predict.__doc__)
    p.add_argument("checkpoint", help="run folder (its best.pt) or checkpoint file")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--top-k", type=int, default=1, help="show the k most probable classes (default 1)")
    p.add_argument("--tta", action="store_true", help="average over the 8 flips and rotations")
    p.add_argument("--cam", metavar="DIR", help="write a Grad-CAM overlay PNG per image into DIR, and beside it the raw heat "
                   "map at the model's input size (.npy)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="inference engine (default auto: ONNX Runtime on CPU, the fastest measured)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a trained model to ONNX or TorchScript",
                       description=cmd_export.__doc__)
    p.add_argument("checkpoint", help="run folder (its best.pt) or checkpoint file")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    p.add_argument("--out", help="output file (default model.onnx / model.pt)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: 8-bit weights and activations (ONNX only; ONNX Runtime's static "
                        "quantisation, calibrated on the run's validation images; default none)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve a trained model: HTTP API and web page",
                       description=inspect.cleandoc(cmd_serve.__doc__),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="an exported .onnx file (ONNX Runtime, no torch loaded, no Grad-CAM), "
                   "or a run folder (its best.pt) or checkpoint file (PyTorch, with Grad-CAM)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback only; any other needs an API key or --insecure)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", metavar="KEY",
                   help=f"require KEY (16+ characters) in the X-API-Key header of every API request "
                        f"(default ${API_KEY_ENV}; the variable keeps it out of the process list)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key (warns)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://lab.example.org) call the API; "
                        "repeatable (default: no cross-origin access)")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                   help=f"largest accepted image file (default {MAX_UPLOAD_MB:g} MB)")
    p.add_argument("--max-megapixels", type=float, default=SERVE_MAX_PIXELS / 1e6, metavar="MP",
                   help="most pixels an image may decode to, after JPEG's reduced-size decoding; larger "
                        f"ones get 413 before decoding (default {SERVE_MAX_PIXELS / 1e6:g})")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH,
                   help="most files per /predict/batch, and most concurrent requests per forward pass")
    p.add_argument("--decoders", type=int, default=0, metavar="N",
                   help="threads that decode uploads, per worker: the most decoded at once (default 0: "
                        "none, the inference thread decodes each batch before its forward pass)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="threads of a forward pass, per worker (default 0: the physical cores)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="server processes, each with its own model (default 1)")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info"])
    p.add_argument("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT_S, metavar="S",
                   help="on SIGTERM or Ctrl-C, wait at most S seconds for the requests in flight "
                        f"(default {SHUTDOWN_TIMEOUT_S:g})")
    p.set_defaults(func=cmd_serve, own_signals=True)
