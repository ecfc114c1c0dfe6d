"""serve: the HTTP API with good and bad uploads, the page, limits, and a load test on loopback."""

from __future__ import annotations

import base64
import importlib.util
import io
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_predict import CLASSES, make_checkpoint, png_bytes, real_test_images

from bloodcell.inference.predict import Predictor
from bloodcell.runfiles import write_csv
from bloodcell.serve.app import create_app, is_loopback, serving

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's notice about httpx2
    from fastapi.testclient import TestClient

LIMIT_MB = 0.5


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor(make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt"))


@pytest.fixture(scope="module")
def client(predictor) -> TestClient:
    return TestClient(create_app(predictor, max_upload_mb=LIMIT_MB, max_batch=4))


def jpeg(seed: int = 0) -> bytes:
    return png_bytes(seed, size=(96, 72), fmt="JPEG")


def still_serving(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/predict", files={"file": ("ok.jpeg", jpeg(), "image/jpeg")}).status_code == 200


def test_health_model_page_and_docs(client) -> None:
    assert client.get("/health").json() == {"status": "ok", "model": "cnn4x32", "backend": "onnx"}
    card = client.get("/model").json()
    assert card["classes"] == CLASSES and card["image_size"] == 32
    assert card["architecture"]["name"] == "cnn4x32" and card["architecture"]["parameters"] > 1000
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="file-input"' in page.text and "/predict?cam=true" in page.text
    assert 'id="key-form"' in page.text and '"X-API-Key": key' in page.text  # asks for, then sends, a key
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: no CDN
    assert client.get("/docs").status_code == 200
    assert {"/predict", "/predict/batch", "/health", "/model", "/examples"} <= set(client.get("/openapi.json").json()["paths"])


def test_model_card_has_the_runs_test_metrics(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    make_checkpoint(run / "best.pt")
    (run / "metrics.json").write_text('{"test": {"n": 10, "accuracy": 0.7, "macro_f1": 0.6, "confusion": []},'
                                      ' "run": {"best_epoch": 1}}')
    card = TestClient(create_app(run, backend="torch")).get("/model").json()
    assert card["metrics"] == {"test": {"n": 10, "accuracy": 0.7, "macro_f1": 0.6}}


def example_run(run: Path) -> tuple[Path, list[dict]]:
    """A run folder: a checkpoint and a predictions_test.csv of synthetic cells, per class 3 right
    and 3 wrong calls, and one more wrong call, the most confident, whose file is gone."""
    run.mkdir(parents=True)
    make_checkpoint(run / "best.pt")
    rows = []
    for c, label in enumerate(CLASSES):
        for k, (right, conf) in enumerate([(True, 0.9), (True, 0.8), (True, 0.7),
                                           (False, 0.95), (False, 0.6), (False, 0.5)]):
            pred = label if right else CLASSES[(c + 1 + k % 3) % len(CLASSES)]
            rows.append({"path": f"synthetic://0/{6 * c + k}", "label": label, "pred": pred, "confidence": conf})
    rows.append({"path": str(run / "gone.png"), "label": CLASSES[0], "pred": CLASSES[1], "confidence": 0.99})
    write_csv(run / "predictions_test.csv", [{**r, **{f"p_{c}": 0.25 for c in CLASSES}} for r in rows])
    return run, rows


def test_examples_show_right_and_wrong_test_cells_per_class_with_their_maps(tmp_path) -> None:
    run, rows = example_run(tmp_path / "run")
    body = TestClient(create_app(run, backend="torch")).get("/examples").json()
    assert body["missing"] == 1  # gone.png: left out, counted
    shown = [(e["label"], e["pred"], e["confidence"]) for e in body["examples"]]
    for label in CLASSES:  # the surest and least sure right calls, the two most confident errors
        mine = [r for r in rows if r["label"] == label and r["path"].startswith("synthetic")]
        right = sorted((r for r in mine if r["pred"] == label), key=lambda r: -r["confidence"])[::2]
        wrong = sorted((r for r in mine if r["pred"] != label), key=lambda r: -r["confidence"])
        wrong = wrong[:1] if label == CLASSES[0] else wrong[:2]  # the first class's top error is gone
        assert [s for s in shown if s[0] == label] == [(r["label"], r["pred"], r["confidence"]) for r in right + wrong]
    for e in body["examples"]:
        assert e["correct"] == (e["label"] == e["pred"])
        pics = [np.asarray(Image.open(io.BytesIO(base64.b64decode(e[k].split(",", 1)[1]))).convert("RGB"),
                           dtype=np.int16) for k in ("image_png", "cam_png")]
        assert pics[0].shape == pics[1].shape and np.abs(pics[0] - pics[1]).mean() > 3  # a map over it
    empty = TestClient(create_app(make_checkpoint(tmp_path / "alone.pt"), backend="torch")).get("/examples")
    assert empty.json() == {"examples": [], "missing": 0}  # no saved predictions: nothing to show


def test_predict_one_image(client, predictor) -> None:
    data = jpeg(3)
    r = client.post("/predict", files={"file": ("cell.jpeg", data, "image/jpeg")})
    assert r.status_code == 200
    body = r.json()
    want = predictor.predict_bytes(data)
    assert body["class"] == want["class"] and body["filename"] == "cell.jpeg"
    assert body["probs"] == pytest.approx(want["probs"], abs=1e-6)
    assert sum(body["probs"].values()) == pytest.approx(1, abs=1e-5)
    assert len(body["top_k"]) == len(CLASSES) and body["latency_ms"] > 0
    assert "cam_png" not in body


def test_predict_with_cam_returns_an_overlay_png(client) -> None:
    body = client.post("/predict?cam=true&tta=true", files={"file": ("c.png", png_bytes(1), "image/png")}).json()
    prefix = "data:image/png;base64,"
    assert body["cam_png"].startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(body["cam_png"][len(prefix):]))) as im:
        assert im.format == "PNG" and min(im.size) >= 32


def test_batch_with_good_and_bad_files(client, predictor) -> None:
    files = [("files", ("a.jpeg", jpeg(1), "image/jpeg")), ("files", ("b.txt", b"hello", "text/plain")),
             ("files", ("c.png", png_bytes(2), "image/png")), ("files", ("d.jpeg", jpeg(4)[:400], "image/jpeg"))]
    r = client.post("/predict/batch", files=files)
    assert r.status_code == 200
    res = r.json()["results"]
    assert [x["filename"] for x in res] == ["a.jpeg", "b.txt", "c.png", "d.jpeg"]
    assert [x["error"] is None for x in res] == [True, False, True, False]
    assert res[1]["status"] == 415 and res[3]["status"] == 422 and r.json()["failed"] == 2
    assert res[2]["class"] == predictor.predict_bytes(png_bytes(2))["class"]
    too_many = [("files", (f"{i}.png", png_bytes(i), "image/png")) for i in range(5)]
    assert client.post("/predict/batch", files=too_many).status_code == 413


TRUNCATED = jpeg(5)[:600]


@pytest.mark.parametrize(("name", "request_kwargs", "status", "words"), [
    ("empty body", {}, 415, "multipart/form-data"),
    ("wrong content type", {"json": {"image": "abc"}}, 415, "application/json"),
    ("raw image body", {"content": png_bytes(), "headers": {"content-type": "image/png"}}, 415, "multipart"),
    ("no file field", {"files": {"image": ("a.png", png_bytes(), "image/png")}}, 422, "'file' field"),
    ("empty file", {"files": {"file": ("a.png", b"", "image/png")}}, 422, "empty file"),
    ("text file", {"files": {"file": ("notes.txt", b"just some text\n" * 20, "text/plain")}}, 415, "not an image"),
    ("text as jpeg", {"files": {"file": ("x.jpeg", b"GIF? no: text", "image/jpeg")}}, 415, "not an image"),
    ("truncated jpeg", {"files": {"file": ("t.jpeg", TRUNCATED, "image/jpeg")}}, 422, "truncated"),
    ("huge file", {"files": {"file": ("big.png", b"\x89PNG" + bytes(2_000_000), "image/png")}}, 413, "too large"),
])
def test_bad_uploads_get_clear_errors_and_the_server_stays_up(client, name, request_kwargs, status, words):
    r = client.post("/predict", **request_kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    still_serving(client)


def test_a_streamed_body_over_the_limit_is_cut_off(client) -> None:
    head = (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")

    def chunks():  # no Content-Length: the limit must hold while reading
        yield head
        for _ in range(40):
            yield bytes(64 * 1024)

    r = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    still_serving(client)


def test_loopback_by_default() -> None:
    from bloodcell.cli import build_parser

    args = build_parser().parse_args(["serve", "run"])
    assert args.host == "127.0.0.1" and args.port == 8000
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


def _load_test_module():
    path = Path(__file__).parents[1] / "bench" / "load_test.py"
    spec = importlib.util.spec_from_file_location("bloodcell_bench_load_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_load_200_requests_from_8_clients_on_loopback(predictor) -> None:
    load = _load_test_module().load
    with serving(create_app(predictor)) as url:
        assert url.startswith("http://127.0.0.1:")
        res = load(url, jpeg(7), requests=200, concurrency=8, timeout=60)
    assert res["errors"] == 0, res["error_examples"]
    assert res["ok"] == 200 and not res["timed_out"] and res["seconds"] < 60
    assert res["p95_ms"] < 2000


def test_real_server_answers_413_for_a_huge_upload_and_keeps_serving(predictor) -> None:
    import httpx

    with serving(create_app(predictor, max_upload_mb=1)) as url:
        r = httpx.post(url + "/predict", files={"file": ("big.jpeg", jpeg() + bytes(8_000_000), "image/jpeg")},
                       timeout=30)
        assert r.status_code == 413
        r = httpx.post(url + "/predict", files={"file": ("ok.jpeg", jpeg(), "image/jpeg")}, timeout=30)
        assert r.status_code == 200 and r.json()["class"] in CLASSES


@pytest.mark.realdata
def test_predict_real_images_over_http(kaggle_root, client, predictor) -> None:
    paths = real_test_images(kaggle_root, 2)
    for p in paths:
        body = client.post("/predict?cam=true", files={"file": (p.name, p.read_bytes(), "image/jpeg")}).json()
        assert body["class"] == predictor.predict_paths([str(p)])[0]["class"]
    data = paths[0].read_bytes()
    r = client.post("/predict", files={"file": ("cut.jpeg", data[: len(data) // 2], "image/jpeg")})
    assert r.status_code == 422
    probs = np.array([list(client.post("/predict", files={"file": (p.name, p.read_bytes(), "image/jpeg")})
                           .json()["probs"].values()) for p in paths])
    assert np.allclose(probs.sum(1), 1, atol=1e-5)


# -- the lean ONNX server, limits, keys -------------------------------------------------

KEY = "k" * 8 + "-0123456789abcdef"


def giant_png(w: int = 12_000, h: int = 12_000) -> bytes:
    """A valid, all-black w x h RGB PNG (0.4 MB for 12,000 x 12,000; 430 MB decoded), built row by
    row so that the test never holds the pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(1 + 3 * w)  # filter byte 0, then black pixels
    body = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    from bloodcell.inference.export import export_model

    d = tmp_path_factory.mktemp("onnx")
    export_model(make_checkpoint(d / "tiny.pt"), "onnx", d / "tiny.onnx")
    return d / "tiny.onnx"


def test_onnx_file_is_served_like_its_checkpoint_without_cam(onnx_file, predictor) -> None:
    c = TestClient(create_app(onnx_file))
    assert c.get("/health").json() == {"status": "ok", "model": "cnn4x32", "backend": "onnx"}
    card = c.get("/model").json()
    assert card["cam"] is False and card["classes"] == CLASSES and card["architecture"]["parameters"] > 1000
    data = jpeg(3)
    body = c.post("/predict", files={"file": ("a.jpeg", data, "image/jpeg")}).json()
    assert body["probs"] == pytest.approx(predictor.predict_bytes(data)["probs"], abs=2e-5)
    r = c.post("/predict?cam=true", files={"file": ("a.jpeg", data, "image/jpeg")})
    assert r.status_code == 400 and "Grad-CAM needs the PyTorch checkpoint" in r.json()["detail"]
    assert c.get("/examples").json() == {"examples": [], "missing": 0}
    batch = c.post("/predict/batch", files=[("files", ("a.jpeg", data, "image/jpeg")),
                                            ("files", ("b.txt", b"text", "text/plain"))]).json()
    assert batch["failed"] == 1 and batch["results"][0]["class"] == body["class"]


def test_onnx_server_loads_no_torch_after_serving_a_request(onnx_file) -> None:
    import json
    import subprocess
    import sys

    code = f"""
import sys, json, warnings
warnings.simplefilter("ignore")
from bloodcell.cli import build_parser
from bloodcell.serve.app import create_app
from fastapi.testclient import TestClient
from PIL import Image
import io
buf = io.BytesIO(); Image.new("RGB", (320, 240), (200, 100, 150)).save(buf, "JPEG")
c = TestClient(create_app({str(onnx_file)!r}))
r = c.post("/predict", files={{"file": ("a.jpeg", buf.getvalue(), "image/jpeg")}})
print(json.dumps({{"status": r.status_code, "heavy": sorted(m for m in ("torch", "torchvision", "captum",
      "matplotlib", "optuna") if m in sys.modules)}}))
"""
    src = str(Path(__file__).parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"status": 200, "heavy": []}


def test_too_many_pixels_is_413_before_decoding_and_jpeg_is_judged_after_draft(client) -> None:
    small = create_app(client.app.state.predictor, max_pixels=1_000_000)
    c = TestClient(small)
    big_png = png_bytes(0, size=(1200, 1000))  # 1.2 MP to decode
    r = c.post("/predict", files={"file": ("big.png", big_png, "image/png")})
    assert r.status_code == 413, r.text
    assert r.json()["detail"] == "big.png: image too large: 1200 x 1000 pixels (1.2 megapixels) to decode, the limit is 1 megapixels"
    # a JPEG of the same size decodes at 1/8 scale (draft) for a 32 px model: 150 x 125, accepted
    big_jpeg = png_bytes(0, size=(1200, 1000), fmt="JPEG")
    assert c.post("/predict", files={"file": ("big.jpeg", big_jpeg, "image/jpeg")}).status_code == 200
    res = c.post("/predict/batch", files=[("files", ("big.png", big_png, "image/png"))]).json()["results"]
    assert res[0]["status"] == 413 and "too large" in res[0]["error"]
    still_serving(c)


def test_api_key_is_required_everywhere_but_the_page_and_health(predictor) -> None:
    c = TestClient(create_app(predictor, api_key=KEY))
    files = {"file": ("a.jpeg", jpeg(), "image/jpeg")}
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY[:-1]}, {"X-API-Key": KEY + "x"}):
        r = c.post("/predict", files=files, headers=headers)
        assert r.status_code == 401 and "X-API-Key" in r.json()["detail"], (headers, r.text)
        assert c.get("/model", headers=headers).status_code == 401
        assert c.get("/examples", headers=headers).status_code == 401
        assert c.post("/predict/batch", files=[("files", files["file"])], headers=headers).status_code == 401
    ok = {"X-API-Key": KEY}
    assert c.post("/predict", files=files, headers=ok).status_code == 200
    assert c.get("/model", headers=ok).json()["classes"] == CLASSES
    assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
    schema = c.get("/openapi.json").json()  # the fuzzers read the key's header from the schema
    assert schema["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key",
        "description": "the key the server was started with (--api-key)"}
    assert "security" in schema["paths"]["/predict"]["post"] and "security" not in schema["paths"]["/health"]["get"]
    # without a key there is no scheme, so the schema does not ask for one
    assert "securitySchemes" not in TestClient(create_app(predictor)).get("/openapi.json").json().get("components", {})


def test_the_key_is_compared_in_constant_time(monkeypatch, predictor) -> None:
    import hmac

    seen = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: seen.append((a, b)) or real(a, b))
    c = TestClient(create_app(predictor, api_key=KEY))
    assert c.get("/model", headers={"X-API-Key": "guess"}).status_code == 401
    assert seen == [(b"guess", KEY.encode())]


def test_no_cors_unless_asked(predictor) -> None:
    origin = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    plain = TestClient(create_app(predictor))
    assert "access-control-allow-origin" not in plain.get("/health", headers=origin).headers
    assert "access-control-allow-origin" not in plain.options("/predict", headers=origin).headers
    allowed = TestClient(create_app(predictor, cors_origins=("https://elsewhere.example",)))
    pre = allowed.options("/predict", headers={**origin, "Access-Control-Request-Headers": "x-api-key"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://elsewhere.example"
    other = {"Origin": "https://evil.example"}
    assert "access-control-allow-origin" not in allowed.get("/health", headers=other).headers


def test_error_bodies_carry_no_path_traceback_or_version(predictor, onnx_file, monkeypatch) -> None:
    import bloodcell

    c = TestClient(create_app(onnx_file), raise_server_exceptions=False)
    monkeypatch.setattr(c.app.state.batcher, "probs_fn", lambda x, tta: 1 / 0)
    bodies = [c.post("/predict", files={"file": ("a.jpeg", jpeg(), "image/jpeg")}),  # an internal error
              c.post("/predict?top_k=abc", files={"file": ("a.jpeg", jpeg(), "image/jpeg")}),
              c.post("/predict", files={"image": ("a.png", png_bytes(), "image/png")}),
              c.post("/predict", files={"file": ("t.jpeg", TRUNCATED, "image/jpeg")}),
              c.post("/predict", files={"file": ("x.txt", b"hello", "text/plain")}),
              c.post("/predict", content=b"--x\r\n\r\n", headers={"content-type": "multipart/form-data; boundary=x"}),
              c.get("/nowhere")]
    assert [r.status_code for r in bodies] == [500, 422, 422, 422, 415, 400, 404]
    assert bodies[0].json() == {"detail": "internal server error"}
    import fastapi
    import PIL
    import pydantic

    for r in bodies:
        text = r.text
        for secret in (str(onnx_file.parent), "Traceback", "File \"", ".py", "site-packages", "pydantic.dev",
                       bloodcell.__version__, fastapi.__version__, pydantic.VERSION, PIL.__version__):
            assert secret not in text, (r.status_code, secret, text)


def test_concurrent_requests_share_forward_passes(onnx_file) -> None:
    load = _load_test_module().load
    app = create_app(onnx_file)
    with serving(app) as url:
        res = load(url, jpeg(7), requests=96, concurrency=16, timeout=60)
    assert res["errors"] == 0 and res["ok"] == 96, res["error_examples"]
    b = app.state.batcher
    assert b.images >= 96 and b.batches < b.images  # some passes took several requests


def test_serve_refuses_a_network_bind_without_a_key(onnx_file, monkeypatch, capsys) -> None:
    from bloodcell.cli import main

    monkeypatch.delenv("BLOODCELL_API_KEY", raising=False)
    assert main(["serve", str(onnx_file), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "reachable from other machines" in err and "--api-key" in err and "--insecure" in err
    assert main(["serve", str(onnx_file), "--host", "0.0.0.0", "--api-key", "short"]) == 2
    assert "shorter than 16" in capsys.readouterr().err
    args = __import__("bloodcell.cli", fromlist=["build_parser"]).build_parser().parse_args(
        ["serve", str(onnx_file), "--host", "0.0.0.0", "--insecure"])
    from bloodcell.cli.serve import serve_key

    assert serve_key(args) is None and "no API key (--insecure)" in capsys.readouterr().err
    monkeypatch.setenv("BLOODCELL_API_KEY", KEY)
    args.insecure = False
    assert serve_key(args) == KEY  # from the environment, out of the process list


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_lean_server_idles_small_and_16_giant_pngs_cost_it_little(onnx_file) -> None:
    import subprocess
    import sys
    import threading

    import httpx

    mod = _load_test_module()
    port = mod.free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "bloodcell", "serve", str(onnx_file), "--port", str(port),
                             "--log-level", "warning"], stderr=subprocess.PIPE)
    try:
        mod.wait_healthy(url, proc)
        mod.load(url, jpeg(), requests=20, concurrency=2)  # warm: every code path of /predict has run
        idle = _rss_kb(proc.pid)
        assert idle < 250 * 1024, f"idle at {idle / 1024:.0f} MB"
        png = giant_png()
        assert len(png) < 1_000_000
        peak = [idle]
        answers: list = []
        health: list = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_kb(proc.pid))
                try:
                    health.append(httpx.get(url + "/health", timeout=5).status_code)
                except httpx.HTTPError as e:
                    health.append(repr(e))
                time.sleep(0.01)

        def upload():
            r = httpx.post(url + "/predict", files={"file": ("huge.png", png, "image/png")}, timeout=60)
            answers.append((r.status_code, r.json()["detail"]))

        watcher = threading.Thread(target=watch)
        watcher.start()
        senders = [threading.Thread(target=upload) for _ in range(16)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(90)
        stop.set()
        watcher.join()
        peak[0] = max(peak[0], _rss_kb(proc.pid, "VmHWM") if _rss_kb(proc.pid, "VmHWM") > idle else idle)
        assert len(answers) == 16 and all(s == 413 and "12000 x 12000" in d for s, d in answers), answers[:2]
        assert health and all(h == 200 for h in health), health[:5]
        assert (peak[0] - idle) < 256 * 1024, f"grew {(peak[0] - idle) / 1024:.0f} MB above idle"
        still = httpx.post(url + "/predict", files={"file": ("ok.jpeg", jpeg(), "image/jpeg")}, timeout=30)
        assert still.status_code == 200
    finally:
        proc.terminate()
        proc.wait(15)


def _fast_path(app):
    """The app's FastPredict middleware instance (built on the first request)."""
    from bloodcell.serve.middleware import FastPredict

    layer = app.middleware_stack
    while layer is not None and not isinstance(layer, FastPredict):
        layer = getattr(layer, "app", None)
    return layer


# the same request as the fast path takes it, and in a form only the FastAPI route takes (a capitalised
# boolean, which FastAPI reads alike)
@pytest.mark.parametrize(("fast_query", "slow_query"), [
    ("", "?tta=False"), ("?top_k=2", "?top_k=2&tta=False"), ("?tta=true&top_k=1", "?tta=True&top_k=1"),
    ("?cam=false", "?cam=False")])
def test_the_fast_path_answers_exactly_as_the_route(onnx_file, fast_query, slow_query) -> None:
    app = create_app(onnx_file, api_key=KEY)
    c = TestClient(app)
    ok = {"X-API-Key": KEY}
    files = {"file": ("cell 1.jpeg", jpeg(2), "image/jpeg")}
    fast = c.post("/predict" + fast_query, files=files, headers=ok)
    fp = _fast_path(app)
    assert fp.served == 1 and fast.status_code == 200
    slow = c.post("/predict" + slow_query, files=files, headers=ok)
    assert fp.served == 1 and slow.status_code == 200  # not taken this time
    a, b = fast.json(), slow.json()
    assert a.pop("latency_ms") > 0 and b.pop("latency_ms") > 0
    assert a == b and fast.headers["content-type"] == slow.headers["content-type"] == "application/json"


def test_the_fast_path_passes_on_what_it_does_not_know_with_its_body(onnx_file) -> None:
    app = create_app(onnx_file, api_key=KEY)
    c = TestClient(app)
    ok = {"X-API-Key": KEY}
    two = [("file", ("a.jpeg", jpeg(1), "image/jpeg")), ("extra", ("b.jpeg", jpeg(2), "image/jpeg"))]
    r = c.post("/predict", files=two, headers=ok)  # two parts: the route reads the replayed body
    assert r.status_code == 200 and r.json()["filename"] == "a.jpeg"
    assert c.post("/predict", files={"file": ("a.jpeg", jpeg(), "image/jpeg")}).status_code == 401  # no key
    assert c.post("/predict?top_k=0", files={"file": ("a.jpeg", jpeg(), "image/jpeg")}, headers=ok).status_code == 422
    r = c.post("/predict", files={"file": ("t.jpeg", TRUNCATED, "image/jpeg")}, headers=ok)
    assert r.status_code == 422 and "truncated" in r.json()["detail"]
    assert _fast_path(app).served == 1  # only the truncated JPEG was answered there, with the route's words


def test_a_pool_of_decoders_answers_as_the_inference_thread_does(predictor) -> None:
    inline, pooled = TestClient(create_app(predictor)), TestClient(create_app(predictor, decoders=2))
    for files in ({"file": ("a.jpeg", jpeg(4), "image/jpeg")}, {"file": ("t.jpeg", TRUNCATED, "image/jpeg")},
                  {"file": ("n.txt", b"hello", "text/plain")}):
        a, b = inline.post("/predict", files=files), pooled.post("/predict", files=files)
        assert a.status_code == b.status_code
        ja, jb = a.json(), b.json()
        ja.pop("latency_ms", None), jb.pop("latency_ms", None)
        assert ja == jb
