"""serve: the HTTP API with good and bad uploads, the page, limits, and a load test on loopback."""

from __future__ import annotations

import base64
import importlib.util
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_predict import CLASSES, make_checkpoint, png_bytes, real_test_images

from bloodcell.predict import Predictor
from bloodcell.runfiles import write_csv
from bloodcell.serve import create_app, is_loopback, serving

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
