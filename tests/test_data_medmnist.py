"""MedMNIST .npz files (data/medmnist.py): official splits, label names, grey to RGB, refusals, download."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading

import numpy as np
import pytest

from bloodcell.catalog import MEDMNIST
from bloodcell.cli import main
from bloodcell.data import discover, load_dataset
from bloodcell.data.check import check_data
from bloodcell.data.medmnist import is_medmnist, medmnist_info, parse_name, to_square
from bloodcell.errors import DataError

SPLITS = {"train": 48, "val": 16, "test": 16}


def write_npz(path, n_classes=8, shape=(28, 28, 3), labels_per_image=1, seed=0):
    """A small .npz with MedMNIST's keys: <split>_images (N x H x W[ x 3] uint8), <split>_labels (N x L)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in SPLITS.items():
        y = np.arange(n) % n_classes
        x = rng.integers(0, 60, (n, *shape), dtype=np.uint8) + (y * 20).reshape(-1, *[1] * len(shape)).astype(np.uint8)
        arrays[f"{split}_images"] = x
        arrays[f"{split}_labels"] = (y[:, None] if labels_per_image == 1
                                     else rng.integers(0, 2, (n, labels_per_image))).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def test_names():
    assert parse_name("bloodmnist") == ("bloodmnist", 28)
    assert parse_name("/x/bloodmnist_128.npz") == ("bloodmnist", 128)
    assert parse_name("bloodmnist_100") is None and parse_name("cells") is None
    assert is_medmnist("some/file.npz") and is_medmnist("pathmnist_64") and not is_medmnist("synthetic")


def test_official_splits_and_label_names(tmp_path):
    f = write_npz(tmp_path / "bloodmnist.npz")
    for seed in (0, 1):
        ds = load_dataset(f, image_size=32, seed=seed, cache_dir=tmp_path / "cache")
        assert {k: len(s) for k, s in ds.splits.items()} == SPLITS  # as given, whatever the seed
    assert ds.layout == "medmnist" and ds.classes[0] == "basophil" and ds.classes == list(MEDMNIST["bloodmnist"]["label"])
    tr = ds.splits["train"]
    assert tr.images.shape == (48, 32, 32, 3) and tr.images.dtype == np.uint8
    assert list(tr.labels[:8]) == list(range(8)) and tr.paths[3] == f"{f}#train/3"
    with np.load(f) as z:  # the pixels are the file's, resized: class k is brighter by 20 a step
        means = [np.asarray(tr.images)[tr.labels == k].mean() for k in range(8)]
        assert np.all(np.diff(means) > 10) and abs(means[0] - z["train_images"][tr.labels == 0].mean()) < 3
    again = load_dataset(f, image_size=32, cache_dir=tmp_path / "cache")
    assert again.cached and np.array_equal(np.asarray(again.splits["test"].images), np.asarray(ds.splits["test"].images))


def test_grey_becomes_three_equal_channels(tmp_path):
    f = write_npz(tmp_path / "pneumoniamnist.npz", n_classes=2, shape=(28, 28))
    ds = load_dataset(f, image_size=28, cache_dir=tmp_path / "cache")
    x = np.asarray(ds.splits["val"].images)
    assert ds.classes == ["normal", "pneumonia"] and x.shape[-1] == 3
    assert np.array_equal(x[..., 0], x[..., 2])
    with np.load(f) as z:
        assert np.array_equal(x[..., 1], z["val_images"])  # at its own size: the pixels unchanged
    assert to_square(np.zeros((28, 28, 1), np.uint8), 16, "squash").shape == (16, 16, 3)


def test_unknown_set_gets_index_names_and_check_reports_it(tmp_path):
    f = write_npz(tmp_path / "mine.npz", n_classes=3)
    report = check_data(f, cache_dir=tmp_path / "cache")
    assert report["layout"] == "medmnist" and report["classes"] == ["0", "1", "2"] and report["usable"]
    assert report["splits"]["test"]["images"] == {"0": 6, "1": 5, "2": 5} and report["sizes"] == {"28x28": 80}


def test_multi_label_3d_and_foreign_npz_are_refused_in_one_line(tmp_path, capsys):
    bad = [write_npz(tmp_path / "chestmnist.npz", shape=(28, 28), labels_per_image=14),
           write_npz(tmp_path / "other.npz", labels_per_image=5),
           write_npz(tmp_path / "organmnist3d.npz", shape=(28, 28, 28))]
    np.savez(tmp_path / "foreign.npz", x=np.zeros(3))
    for f, match in zip([*bad, tmp_path / "foreign.npz"], ["multi-label", "multi-label", "2D images", "not a MedMNIST"],
                        strict=True):
        with pytest.raises(DataError, match=match):
            load_dataset(f, image_size=16, cache_dir=tmp_path / "cache")
        assert main(["data", "check", str(f)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("bloodcell: error:")


def test_train_and_evaluate_on_npz(tmp_path, capsys):
    f = write_npz(tmp_path / "breastmnist.npz", n_classes=2, shape=(28, 28))
    run = tmp_path / "run"
    assert main(["train", "--data", str(f), "--model", "cnn2x32", "--image-size", "32", "--epochs", "1",
                 "--threads", "1", "--precision", "fp32", "--out", str(run), "--quiet"]) == 0
    assert main(["evaluate", str(run), "--data", str(f)]) == 0
    out = capsys.readouterr().out
    assert "test " in out and "F1 (normal, benign)" in out and "PR AUC" in out  # breastmnist's second class


@pytest.fixture
def npz_server(tmp_path):
    """A local HTTP server (127.0.0.1) serving tmp_path/served/: the download's only network."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_name_downloads_through_the_medmnist_package(tmp_path, npz_server, monkeypatch):
    medmnist = pytest.importorskip("medmnist")
    served, url = npz_server
    f = write_npz(served / "bloodmnist_64.npz", shape=(64, 64, 3))
    monkeypatch.setitem(medmnist.INFO, "bloodmnist", {**medmnist.INFO["bloodmnist"], "url_64": f"{url}/bloodmnist_64.npz",
                                                       "MD5_64": hashlib.md5(f.read_bytes()).hexdigest()})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.medmnist copy is found instead
    ds = load_dataset("bloodmnist_64", image_size=32, cache_dir=tmp_path / "cache")
    got = tmp_path / "cache" / "medmnist" / "bloodmnist_64.npz"
    assert got.read_bytes() == f.read_bytes() and ds.root == str(got) and len(ds.splits["train"]) == 48
    assert [p.name for p in got.parent.iterdir()] == ["bloodmnist_64.npz"]  # no temporary folder left
    assert medmnist_info("bloodmnist")["label"]["0"] == ds.classes[0]


def test_download_offline_or_corrupt_is_one_line(tmp_path, npz_server, monkeypatch, capsys):
    medmnist = pytest.importorskip("medmnist")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with socket.socket() as s:  # a port nothing listens on: as offline as a test can be
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setitem(medmnist.INFO, "dermamnist", {**medmnist.INFO["dermamnist"],
                                                       "url": f"http://127.0.0.1:{closed}/dermamnist.npz"})
    assert main(["data", "check", "dermamnist", "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not download dermamnist.npz" in err[0] and "offline?" in err[0]
    served, url = npz_server
    write_npz(served / "dermamnist.npz", n_classes=7)
    monkeypatch.setitem(medmnist.INFO, "dermamnist", {**medmnist.INFO["dermamnist"], "url": f"{url}/dermamnist.npz",
                                                       "MD5": "0" * 32})
    with pytest.raises(DataError, match="could not download"):
        load_dataset("dermamnist", image_size=28, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "medmnist" / "dermamnist.npz").exists()


def test_shipped_label_names_match_the_medmnist_package():
    medmnist = pytest.importorskip("medmnist")
    for flag, ours in MEDMNIST.items():
        theirs = medmnist.INFO[flag]
        assert tuple(theirs["label"][str(k)] for k in range(len(theirs["label"]))) == ours["label"]
        assert (theirs["task"], theirs["n_channels"]) == (ours["task"], ours["n_channels"])


def test_without_the_package_a_missing_file_says_how_to_get_it(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_medmnist(name, *a, **k):
        if name == "medmnist":
            raise ImportError("no medmnist")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_medmnist)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(DataError, match=r"install the medmnist package .*bloodcell\[medmnist\]"):
        load_dataset("octmnist_128", image_size=28, cache_dir=tmp_path / "cache")
    assert medmnist_info("octmnist")["label"] == MEDMNIST["octmnist"]["label"]


def test_discover_gives_the_classes_of_a_file(tmp_path):
    src = discover(write_npz(tmp_path / "dermamnist.npz", n_classes=7))
    assert src.layout == "medmnist" and src.items == [] and src.classes == list(MEDMNIST["dermamnist"]["label"])


@pytest.mark.slow
def test_compare_report_on_npz(tmp_path):
    f = write_npz(tmp_path / "pneumoniamnist.npz", n_classes=2, shape=(28, 28))
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(f), "--models", "cnn2x32", "--image-size", "32", "--epochs", "1",
                 "--threads", "1", "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "layout: medmnist" in page and "F1 (pneumonia)" in page
