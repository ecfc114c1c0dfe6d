"""Group images that show the same source cell by how alike they look (``group_by: similar``).

Augmented copies of one cell (rotated, flipped, shifted, zoomed) must never sit on both sides of a
train/validation split. Where file names do not say which copies belong together, bloodcell finds
them: each image becomes a colour histogram (8 x 8 x 8 RGB bins, square-rooted, of the image decoded
at about 80 px; the black corners a rotation leaves are ignored), which rotation, flips and small
shifts hardly change, and images whose histograms are closer than SIMILAR_THRESHOLD (squared
Euclidean distance) are joined, transitively (single linkage), within each class and split origin.

Why it exists: in the Kaggle blood-cell set the ``_K_N`` names do not identify the source cell.
Measured on this copy (bench/RESULTS.md): the most similar image of a TRAIN image (a copy of the
same cell, at 1/10 the distance of any other cell's) shares its K no more often than chance
(6.2 % against 6.3 % for monocytes), and each of TEST's four monocyte cells is spread evenly over
the four K values. Grouping by K therefore split copies of one cell between train and validation.

Cost: about 2,000 images/s on 2 cores (decoding at reduced scale, then distances), once per file
list; the result is cached next to the decoded images.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import defaultdict

import numpy as np
from PIL import Image

from bloodcell.runfiles import write_json
from bloodcell.runtime import worker_map

BINS = 8
SIMILAR_THRESHOLD = 0.02
_THUMB = (60, 60)  # JPEG draft: 80 x 60 for a 320 x 240 Kaggle frame
_BLOCK = 2048


def histogram(path: str) -> np.ndarray:
    """The square-rooted 8 x 8 x 8 RGB histogram (sums of squares = 1) of an image at about 80 px.

    An image that cannot be decoded gets NaNs: near no other, it stays a group of its own.
    """
    try:
        return _histogram(path)
    except Exception:  # noqa: BLE001 - the cache build reports unreadable files; here they stand alone
        return np.full(BINS ** 3, np.nan, np.float32)


def _histogram(path: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as im:
            im.draft("RGB", _THUMB)
            im = im.convert("RGB")
            if max(im.size) > 2 * max(_THUMB):
                im.thumbnail(_THUMB)
            px = np.asarray(im).reshape(-1, 3).astype(np.int32)
    px = px[px.sum(1) > 30]  # the black corners of a rotated copy are not the cell's
    if len(px) == 0:
        return np.zeros(BINS ** 3, np.float32)
    q = 256 // BINS
    idx = (px[:, 0] // q) * BINS * BINS + (px[:, 1] // q) * BINS + px[:, 2] // q
    h = np.bincount(idx, minlength=BINS ** 3).astype(np.float32)
    return np.sqrt(h / h.sum())


def histograms(paths: list[str], workers: int = 1) -> np.ndarray:
    """histogram() of every path, in order; in ``workers`` processes from 512 paths up."""
    if workers > 1 and len(paths) >= 512:
        return np.stack(list(worker_map(histogram, paths, workers, chunksize=128)))
    return np.stack([histogram(p) for p in paths]) if paths else np.zeros((0, BINS ** 3), np.float32)


def components(features: np.ndarray, threshold: float = SIMILAR_THRESHOLD) -> np.ndarray:
    """Single-linkage clusters: a component label per row, rows closer than ``threshold`` joined."""
    n = len(features)
    parent = np.arange(n)
    # float64: a pair's side of the threshold must not depend on the BLAS's summation order
    features = features.astype(np.float64)

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    sq = (features * features).sum(1)
    for start in range(0, n, _BLOCK):
        block = features[start:start + _BLOCK]
        d = sq[start:start + _BLOCK, None] + sq[None, :] - 2.0 * block @ features.T
        rows, cols = np.nonzero(d < threshold)
        rows += start
        for i, j in zip(rows[rows < cols].tolist(), cols[rows < cols].tolist(), strict=True):
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)])


def _key(items) -> str:
    h = hashlib.sha256(f"bloodcell-groups/2/{BINS}/{SIMILAR_THRESHOLD}/{_THUMB}".encode())
    for it in items:
        h.update(f"\n{os.path.abspath(it.path)}\t{it.size}\t{it.mtime_ns}\t{it.label}\t{it.split}".encode())
    return h.hexdigest()[:24]


def similar_groups(items, cache_dir: str | os.PathLike, workers: int | None = None) -> None:
    """Set each item's ``group`` to its similarity component (within its class and split origin).

    Byte-identical files are at distance 0, so they always share a component. Results are cached in
    the folder ``cache_dir`` (load_dataset gives it the decoded-image cache folder) under a key of
    the file list.
    """
    if not items:
        return
    path = os.path.join(cache_dir, f"groups-{_key(items)}.json")
    try:
        with open(path) as f:
            groups = json.load(f)
        if len(groups) == len(items):
            for it, g in zip(items, groups, strict=True):
                it.group = g
            return
    except (OSError, ValueError):
        pass
    workers = workers or min(2, os.cpu_count() or 1)
    feats = histograms([it.path for it in items], workers)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        origin = "test" if it.split in ("test", "test_simple") else (it.split or "all")
        buckets[(origin, it.label)].append(i)
    groups = [""] * len(items)
    for (origin, label), idx in buckets.items():
        comp = components(feats[idx])
        for i, c in zip(idx, comp.tolist(), strict=True):
            groups[i] = f"{origin}/{label}/similar-{c}"
    for it, g in zip(items, groups, strict=True):
        it.group = g
    try:
        os.makedirs(cache_dir, exist_ok=True)
        write_json(path, groups, indent=None)
    except OSError:
        pass  # a read-only cache folder only costs the recomputation next time
