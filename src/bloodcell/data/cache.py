"""Decode each image once into a memory-mapped uint8 array on disk.

Resizing (``resize``): ``squash`` (default) scales the whole image to size x size, changing the
aspect ratio a little (the Kaggle frames are 4:3 with the white cell anywhere, so no part is cut);
``crop`` scales the short side to size and takes the centre square; ``pad`` scales the long side to
size and pads the rest with the image's border colour (letterbox); ``cell`` finds the white cell by
its stain (the violet nucleus: blue well above green, which red cells and background are not) and
takes a square of 0.8 x the short side centred on it, so more of the pixels are the cell itself;
``cellfit`` takes that square sized to the cell instead (its side in proportion to the square root of
the stained area, between 0.3 and 1 x the short side), so a cell fills the frame about equally at
any microscope zoom. JPEGs are decoded at a reduced scale where the format allows it (Pillow's
``draft``), which is most of the speed.

The cache is keyed by a fingerprint of the file list (paths, byte sizes, mtimes), the image size,
the resize mode and the cache format: a changed, added or removed file gives a new key. Files are
written under a temporary name and renamed, so an interrupted build never leaves a cache that a later
run would read as whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bloodcell.config import CHOICES
from bloodcell.data.layouts import Item

CACHE_FORMAT = 1
RESIZE_MODES = CHOICES["resize"]
CELL_CROP = 0.8  # side of the ``cell`` crop, as a fraction of the short side
# ``cellfit``: the crop's side is CELL_FIT x the square root of the stained (nucleus) area, in pixels,
# kept between CELL_FIT_MIN and 1 x the short side. 2.4 frames the median Kaggle TRAIN nucleus (4.7 %
# of a 320 x 240 frame) in a 144 px square: the whole cell with a margin of red cells around it.
CELL_FIT, CELL_FIT_MIN = 2.4, 0.3
# Large scans are fine (draft decoding keeps them cheap) but refuse absurd ones.
Image.MAX_IMAGE_PIXELS = 400_000_000


def default_cache_dir() -> Path:
    """The user's cache folder: $BLOODCELL_CACHE, else $XDG_CACHE_HOME/bloodcell, else ~/.cache/bloodcell."""
    if os.environ.get("BLOODCELL_CACHE"):
        return Path(os.environ["BLOODCELL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bloodcell"


def load_image(path: str, size: int, resize: str = "squash") -> np.ndarray:
    """Decode one image file to RGB and resize it to (size, size, 3) uint8; raises on a bad file."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            w, h = im.size
            if resize in ("crop", "cell", "cellfit"):
                crop = {"crop": 1.0, "cell": CELL_CROP, "cellfit": CELL_FIT_MIN}[resize]
                scale = size / min(w, h) / crop
            else:
                scale = size / max(w, h) if resize == "pad" else max(size / w, size / h)
            if im.format == "JPEG":
                im.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
            im = to_rgb(im)
            return resize_array(im, size, resize)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any mode (L, LA, P, RGBA, I;16, CMYK...) to RGB; alpha is composited on white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        hi = a.max() if a.max() > 0 else 1.0
        im = Image.fromarray((a / hi * 255).round().astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def resize_array(im: Image.Image, size: int, resize: str) -> np.ndarray:
    """Resize a PIL RGB image to a size x size uint8 array by the chosen mode."""
    w, h = im.size
    if resize in ("cell", "cellfit"):
        im = im.crop(cell_box(np.asarray(im), fit=resize == "cellfit"))
        return np.asarray(im.resize((size, size), Image.BILINEAR, reducing_gap=2.0), dtype=np.uint8)
    if resize == "squash":
        out = im.resize((size, size), Image.BILINEAR, reducing_gap=2.0)
    elif resize == "crop":
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=2.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        out = im.crop((left, top, left + size, top + size))
    elif resize == "pad":
        s = size / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        small = np.asarray(im.resize((nw, nh), Image.BILINEAR, reducing_gap=2.0))
        border = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]]).mean(0)
        arr = np.empty((size, size, 3), np.uint8)
        arr[:] = border.round().astype(np.uint8)
        top, left = (size - nh) // 2, (size - nw) // 2
        arr[top:top + nh, left:left + nw] = small
        return arr
    else:
        raise ValueError(f"unknown resize mode {resize!r}; known: {', '.join(RESIZE_MODES)}")
    return np.asarray(out, dtype=np.uint8)


def cell_box(rgb: np.ndarray, frac: float = CELL_CROP, fit: bool = False) -> tuple[int, int, int, int]:
    """A square box (left, top, right, bottom) centred on the stained white cell, inside the image.

    Its side is ``frac`` x the short side, or with ``fit`` sized to the cell: CELL_FIT x the square
    root of the stained area, between CELL_FIT_MIN and 1 x the short side.
    """
    h, w = rgb.shape[:2]
    step = max(1, min(h, w) // 96)  # locate on a coarse grid: fast, and enough for a centre and a size
    small = rgb[::step, ::step].astype(np.int16)
    violet = (small[..., 2] - small[..., 1] - 45).clip(0, None).astype(np.float32)
    side = max(1, int(round(frac * min(h, w))))
    if violet.sum() < 20:  # no stained cell found: the centre
        cy, cx = h / 2, w / 2
    else:
        ys, xs = np.indices(violet.shape)
        cy = (ys * violet).sum() / violet.sum() * step + step / 2
        cx = (xs * violet).sum() / violet.sum() * step + step / 2
        if fit:
            stained = np.count_nonzero(violet) * step * step  # pixels, at full resolution
            side = int(round(min(max(CELL_FIT * stained ** 0.5, CELL_FIT_MIN * min(h, w)), min(h, w))))
    left = int(round(min(max(cx - side / 2, 0), w - side)))
    top = int(round(min(max(cy - side / 2, 0), h - side)))
    return left, top, left + side, top + side


def fingerprint(items: list[Item], size: int, resize: str) -> str:
    """A key that changes when any file, the image size or the resize mode changes."""
    h = hashlib.sha256(f"bloodcell-cache/{CACHE_FORMAT}/{size}/{resize}".encode())
    for it in items:
        h.update(f"\n{os.path.abspath(it.path)}\t{it.size}\t{it.mtime_ns}".encode())
    return h.hexdigest()[:24]


def _decode_chunk(args: tuple[list[str], int, str, str, int]) -> list[str | None]:
    """Decode a chunk of paths straight into the shared output file; return an error per path."""
    paths, size, resize, out_path, start = args
    arr = np.load(out_path, mmap_mode="r+")
    errors: list[str | None] = []
    for k, p in enumerate(paths):
        try:
            arr[start + k] = load_image(p, size, resize)
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - any decoder failure makes the file skippable
            errors.append(_describe(e))
    arr.flush()
    return errors


def _describe(e: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image (unreadable by the decoder)"
    if isinstance(e, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return "image too large (more than 400 megapixels)"
    if isinstance(e, OSError) and "truncated" in str(e).lower():
        return "truncated or corrupt image data"
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def build_cache(items: list[Item], size: int, resize: str = "squash", cache_dir: str | os.PathLike | None = None,
                workers: int | None = None, progress=None) -> tuple[np.ndarray, list[str | None], bool]:
    """Return (images memmap N x size x size x 3, per-item error or None, was_cached)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; known: {', '.join(RESIZE_MODES)}")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = fingerprint(items, size, resize)
    data_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if data_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("n") == len(items):
            return np.load(data_path, mmap_mode="r"), meta["errors"], True
    n = len(items)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".npy", dir=cache_dir)
    os.close(fd)
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        del arr
        paths = [it.path for it in items]
        chunk = 256
        jobs = [(paths[i:i + chunk], size, resize, tmp, i) for i in range(0, n, chunk)]
        workers = workers or min(len(jobs), os.cpu_count() or 1)
        errors: list[str | None] = []
        if workers <= 1 or n < 512:
            for j in jobs:
                errors.extend(_decode_chunk(j))
                if progress:
                    progress(len(errors), n)
        else:
            with ProcessPoolExecutor(workers) as pool:
                for errs in pool.map(_decode_chunk, jobs):
                    errors.extend(errs)
                    if progress:
                        progress(len(errors), n)
        os.replace(tmp, data_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _atomic_write_text(meta_path, json.dumps({"n": n, "size": size, "resize": resize, "errors": errors,
                                              "format": CACHE_FORMAT}))
    return np.load(data_path, mmap_mode="r"), errors, False


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
