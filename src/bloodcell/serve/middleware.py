"""The server's ASGI middlewares: UploadLimit (413 for bodies over a limit, before or while they are
read) and FastPredict (the common POST /predict without FastAPI's form parsing and response
encoding, which cost about as much CPU as decoding the image; bench/RESULTS.md).

FastPredict takes only a request it fully understands: multipart/form-data with one part named
``file`` with a plain quoted filename, query parameters among ``top_k`` (1-1000), ``tta`` and ``cam``
(true/false/1/0, cam false), the API key right where one is needed. Anything else goes on, with its
body, to the FastAPI route, whose answer (and OpenAPI schema) is the reference; both answer through
the same function (``serve.create_app``'s predict_one), so they cannot drift apart.
"""

from __future__ import annotations

import hmac
import json
import re
import time
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException as StarletteHTTPException

_BOUNDARY = re.compile(rb"^multipart/form-data;\s*boundary=(\"?)([0-9A-Za-z'()+_,\-./:=?]{1,70})\1$", re.I)
_DISPOSITION = re.compile(rb'^content-disposition:\s*form-data;\s*name="file";\s*filename="([^"\\\r\n%]*)"$', re.I)
_PART_TYPE = re.compile(rb"^content-type:\s*[\w.+-]+/[\w.+-]+$", re.I)
_BOOL = {"true": True, "1": True, "false": False, "0": False}


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
            return await send_json(send, 413, too_large(int(declared), limit))
        seen = 0
        started = False

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                # An HTTPException passes through FastAPI's body parsing unchanged (a 413).
                raise StarletteHTTPException(413, too_large(seen, limit))
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
            await send_json(send, 413, e.detail)


def too_large(n: int, limit: int) -> str:
    return f"upload too large: {n / 1e6:.1f} MB, the limit is {limit / 1e6:.1f} MB"


async def send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})



def one_file(body: bytes, boundary: bytes) -> tuple[str, bytes] | None:
    """(filename, data) of a multipart body that is exactly one part named ``file``; else None."""
    delim = b"--" + boundary
    if not body.startswith(delim + b"\r\n"):
        return None
    head_end = body.find(b"\r\n\r\n", len(delim) + 2)
    if head_end < 0:
        return None
    lines = body[len(delim) + 2:head_end].split(b"\r\n")
    name = None
    for line in lines:
        m = _DISPOSITION.match(line)
        if m and name is None:
            name = m.group(1)
        elif not _PART_TYPE.match(line):
            return None
    end = body.find(b"\r\n" + delim, head_end + 4)
    if name is None or end < 0 or body[end + 2 + len(delim):].rstrip(b"\r\n") != b"--":
        return None
    try:
        return name.decode(), body[head_end + 4:end]
    except UnicodeDecodeError:
        return None


def simple_query(query: bytes, default_top_k: int) -> tuple[int, bool] | None:
    """(top_k, tta) of a query string FastPredict may answer itself; else None."""
    try:
        pairs = parse_qsl(query.decode("ascii"), keep_blank_values=True, strict_parsing=bool(query))
    except (UnicodeDecodeError, ValueError):
        return None
    seen = dict(pairs)
    if len(seen) != len(pairs) or not set(seen) <= {"top_k", "tta", "cam"}:
        return None
    top_k = seen.get("top_k", str(default_top_k))
    if not (top_k.isdigit() and top_k.isascii() and 1 <= int(top_k) <= 1000):
        return None
    tta, cam = _BOOL.get(seen.get("tta", "false")), _BOOL.get(seen.get("cam", "false"))
    if tta is None or cam is not False:
        return None
    return int(top_k), tta


class FastPredict:
    """ASGI middleware: answers the plain POST /predict through ``handler`` (see the module)."""

    def __init__(self, app, handler, api_key: str | None, max_bytes: int, default_top_k: int):
        self.app, self.handler, self.max_bytes, self.default_top_k = app, handler, max_bytes, default_top_k
        self.key = api_key.encode() if api_key else None
        self.served = 0  # requests answered here (tests check both paths are taken)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/predict":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        m = _BOUNDARY.match(headers.get(b"content-type", b""))
        query = simple_query(scope.get("query_string", b""), self.default_top_k)
        key = headers.get(b"x-api-key")
        if not m or query is None or (self.key is not None and (key is None or not hmac.compare_digest(key, self.key))):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        part = one_file(body, m.group(2))
        if part is None or len(part[1]) > self.max_bytes:
            replayed = False

            async def replay():
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            return await self.app(scope, replay, send)
        try:
            answer, status = await self.handler(part[1], part[0], *query, False, time.perf_counter()), 200
        except StarletteHTTPException as e:
            answer, status = {"detail": e.detail}, e.status_code
        self.served += 1
        out = json.dumps(answer, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})
