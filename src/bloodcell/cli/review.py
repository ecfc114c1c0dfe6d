"""``bloodcell review``: a page where a person corrects the type of each white cell of a count.

The library is imported inside the handler (lazy imports, marked): ``bloodcell --help`` and a bad
flag answer at once.
"""

from __future__ import annotations

import argparse
import inspect
import signal
import socket
import sys
import threading
import time

from bloodcell.cli.flags import bounded
from bloodcell.inference.review import ORDERS


def cmd_review(args) -> int:
    """bloodcell review counts/        # the folder 'bloodcell count --out counts/' wrote; opens the page

    Images with a predict CSV instead:
        bloodcell predict RUN cells/ --format csv > cells/preds.csv
        bloodcell review cells/ --predictions cells/preds.csv

    Order (--order): unsure (the default) shows each class's least sure cells first, the classes and
    fields taking turns: each correction fixes a doubtful answer. random shows them shuffled: labels
    that are a fair sample of the lab, sure cells included. The fine-tune after it
    ('train --init-from RUN --data DIR/labels.csv') starts from the model adapted to every cell the
    count found and keeps it unless the labels show a gain; labels of the least sure cells cannot
    vouch for the cells surer than any of them, so what it changes there counts against it.

    Keys: 1..N move the selected cell to that class, 0 or x: not a white cell, u: unsure, Enter: right
    as shown, Backspace: take back, arrows: select. Every key is written at once to DIR/labels.csv (the
    cells typed by a person, a label table: 'bloodcell train --data DIR/labels.csv') and DIR/review.csv
    (every decision, not-a-white-cell and unsure included).
    """
    import uvicorn  # lazy: start-up

    from bloodcell.errors import BloodcellError
    from bloodcell.serve.app import is_loopback
    from bloodcell.serve.review import LABELS_FILE, create_review_app

    app = create_review_app(args.dir, predictions=args.predictions, order=args.order, seed=args.seed)
    found = app.state.found
    for line in found.skipped[:3]:
        print(f"bloodcell: warning: {line} (left out)", file=sys.stderr)
    if len(found.skipped) > 3:
        print(f"bloodcell: warning: {len(found.skipped) - 3} more rows left out", file=sys.stderr)
    if not is_loopback(args.host):
        print(f"bloodcell: warning: listening on {args.host}: anyone who can reach it can change the labels",
              file=sys.stderr)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise BloodcellError(f"cannot listen on {args.host}:{args.port}: {e.strerror} (another --port?)") from None
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{sock.getsockname()[1]}/"
    done = sum(1 for c in found.cells if app.state.decisions.label(c.id) is not None)
    print(f"reviewing {len(found.cells)} cells ({', '.join(found.classes)}; {done} decided) on {url}; "
          f"corrections go to {args.dir.rstrip('/')}/{LABELS_FILE}; Ctrl-C stops", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, server_header=False))
    if not args.no_browser:
        threading.Thread(target=_open_when_up, args=(server, url), daemon=True).start()
    # uvicorn stops on SIGINT or SIGTERM, then raises the signal again: it lands here, and the exit is 0
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sock.close()
    return 0


def _open_when_up(server, url: str) -> None:
    import webbrowser  # lazy: only with a browser to open

    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    if server.started:
        webbrowser.open(url)


def add_parsers(sub) -> None:
    """Register `bloodcell review`."""
    p = sub.add_parser("review", help="correct the type of each white cell in a web page (writes labels.csv)",
                       description=inspect.cleandoc(cmd_review.__doc__),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", metavar="DIR", help="a folder 'bloodcell count --out' wrote (its cells.csv and crops), "
                   "or a folder of images with --predictions")
    p.add_argument("--predictions", metavar="FILE",
                   help="a 'bloodcell predict --format csv' file whose images lie under DIR (instead of cells.csv)")
    p.add_argument("--order", choices=ORDERS, default="unsure",
                   help="which cells come first in each class: unsure = least sure first (default); random = "
                        "a seeded shuffle, a fair sample of the lab's cells")
    p.add_argument("--seed", type=bounded(int, 0), default=0, help="the random order's seed (default 0)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=bounded(int, 0, 65535), default=8000, help="port (default 8000; 0: a free one)")
    p.add_argument("--no-browser", action="store_true", help="do not open the page in a browser")
    p.set_defaults(func=cmd_review, own_signals=True)
