"""The built-in synthetic smears: shapes, determinism, balance, speed, and no global-colour shortcut."""

import time

import numpy as np
import pytest

from bloodcell.catalog import SYNTHETIC_CLASSES
from bloodcell.data.synthetic import CLASSES, generate, render


def test_classes_come_from_info():
    assert CLASSES == SYNTHETIC_CLASSES


def test_shapes_and_dtypes():
    images, labels = generate(8, 40, 0)
    assert images.shape == (8, 40, 40, 3) and images.dtype == np.uint8
    assert labels.shape == (8,) and labels.dtype == np.int64
    assert images.std() > 20  # cells, not a blank canvas
    image = render(2, 50, np.random.default_rng(0))
    assert image.shape == (50, 50, 3) and image.dtype == np.uint8
    empty, no_labels = generate(0, 32, 0)
    assert empty.shape == (0, 32, 32, 3) and no_labels.shape == (0,)


def test_same_seed_gives_identical_bytes():
    a, la = generate(8, 48, 7)
    b, lb = generate(8, 48, 7)
    assert a.tobytes() == b.tobytes()
    assert np.array_equal(la, lb)


def test_different_seeds_and_indices_differ():
    a, _ = generate(8, 48, 0)
    b, _ = generate(8, 48, 1)
    assert all(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    flat = a.reshape(len(a), -1)
    assert len({row.tobytes() for row in flat}) == len(a)


def test_start_offset_matches_slice_of_longer_run():
    long_images, long_labels = generate(12, 40, 3)
    images, labels = generate(6, 40, 3, start=5)
    assert np.array_equal(images, long_images[5:11])
    assert np.array_equal(labels, long_labels[5:11])


def test_labels_are_balanced():
    _, labels = generate(40, 16, 0, start=3)
    assert np.bincount(labels, minlength=len(CLASSES)).tolist() == [10] * len(CLASSES)


def test_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        render(len(CLASSES), 64, rng)
    with pytest.raises(ValueError):
        render(0, 8, rng)
    with pytest.raises(ValueError):
        generate(-1, 64, 0)
    with pytest.raises(ValueError):
        generate(4, 64, 0, start=-1)


def _rate(n: int, size: int, tries: int = 3) -> float:
    best = 0.0
    for _ in range(tries):
        t = time.perf_counter()
        generate(n, size, 0)
        best = max(best, n / (time.perf_counter() - t))
    return best


@pytest.mark.slow
def test_speed_on_one_core():
    # Measured 2026-11-26 with _rate itself (best of 3): 869 images/s at 64 px and 318 at 128 px on
    # this project's CI machine, 487 at 64 px on the lent GPU machine's slower cores. The bounds sit
    # about 3.4x below the CI figures, so a slower computer passes and a regression that makes the
    # built-in data several times slower fails.
    generate(4, 64, 0)  # warm up caches
    assert _rate(200, 64) >= 250
    assert _rate(50, 128) >= 95


@pytest.mark.slow
def test_mean_colour_does_not_separate_classes():
    # nearest centroid on per-image mean RGB: fitted on one seed, scored on another
    x, y = generate(400, 48, 10)
    xt, yt = generate(400, 48, 11)
    f = x.reshape(len(x), -1, 3).mean(axis=1)
    ft = xt.reshape(len(xt), -1, 3).mean(axis=1)
    centroids = np.stack([f[y == c].mean(axis=0) for c in range(len(CLASSES))])
    pred = np.argmin(((ft[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == yt).mean() < 0.6
