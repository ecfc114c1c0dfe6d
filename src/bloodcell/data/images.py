"""Decode one image file into a size x size x 3 uint8 array, as training, prediction and the
report see it.

Resizing (``resize``): ``squash`` (default) scales the whole image to size x size, changing the
aspect ratio a little (the Kaggle frames are 4:3 with the white cell anywhere, so no part is cut);
``crop`` scales the short side to size and takes the centre square; ``pad`` scales the long side to
size and pads the rest with the image's border colour (letterbox); ``cell`` finds the white cell by
its stain (the violet nucleus: blue well above green, which red cells and background are not) and
takes a square of 0.8 x the short side centred on it, so more of the pixels are the cell itself;
``cellfit`` takes that square sized to the cell instead (its side in proportion to the square root of
the stained area, between 0.3 and 1 x the short side), so a cell fills the frame about equally at
any microscope zoom. JPEGs are decoded at a reduced scale where the format allows it (Pillow's
``draft``), which is most of the speed; ``max_pixels`` bounds what is decoded after that reduction
(a server's limit, far below MAX_PIXELS, is checked on the header before any pixel is decoded).
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bloodcell.config import CHOICES
from bloodcell.data.synthetic import generate
from bloodcell.errors import BloodcellError
from bloodcell.runfiles import file_kind

RESIZE_MODES = CHOICES["resize"]
CELL_CROP = 0.8  # side of the ``cell`` crop, as a fraction of the short side
# ``cellfit``: the crop's side is CELL_FIT x the square root of the stained (nucleus) area, in pixels,
# kept between CELL_FIT_MIN and 1 x the short side. 2.4 frames the median Kaggle TRAIN nucleus (4.7 %
# of a 320 x 240 frame) in a 144 px square: the whole cell with a margin of red cells around it.
CELL_FIT, CELL_FIT_MIN = 2.4, 0.3
# Large scans are fine (draft decoding keeps them cheap) but refuse absurd ones. open_image checks this
# itself rather than raising Pillow's global Image.MAX_IMAGE_PIXELS (a setting of the whole process).
# Pillow's own limit still applies first: it raises DecompressionBombError above 2 x its default
# (about 179 megapixels) unless a program raises that global, which bloodcell does not.
MAX_PIXELS = 400_000_000


class TooManyPixels(Image.DecompressionBombError):
    """An image with more pixels to decode than the limit allows; the message says both."""

    def __init__(self, w: int, h: int, limit: int):
        super().__init__(f"image too large: {w} x {h} pixels ({w * h / 1e6:.1f} megapixels) to decode, "
                         f"the limit is {limit / 1e6:g} megapixels")


class ImageError(BloodcellError):
    """One input could not be decoded as an image; ``kind`` is 'unsupported', 'corrupt', 'empty',
    'missing' or 'too_large'."""

    def __init__(self, message: str, kind: str = "corrupt"):
        super().__init__(message)
        self.kind = kind


@contextmanager
def open_image(src, max_pixels: int = MAX_PIXELS) -> Iterator[Image.Image]:
    """Image.open (a path or a file object; nothing is decoded yet) under a pixel limit: more than
    ``max_pixels`` (default MAX_PIXELS) raises TooManyPixels. Pillow's DecompressionBombWarning, which
    this limit replaces, is silenced for as long as the image is open."""
    if isinstance(src, str | os.PathLike):  # opening a FIFO waits for a writer for ever
        kind = file_kind(src)
        if kind not in (None, "missing", "a folder"):  # those two: Image.open's own errors
            raise ImageError(kind, "unsupported")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(src) as im:
            w, h = im.size
            if w * h > min(max_pixels, MAX_PIXELS):
                raise TooManyPixels(w, h, min(max_pixels, MAX_PIXELS))
            yield im


def load_image(path, size: int, resize: str = "squash", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode one image file (path or file object) to RGB and resize it to (size, size, 3) uint8;
    raises on a bad file, TooManyPixels above ``max_pixels`` decoded (after JPEG draft reduction)."""
    with open_image(path) as im:
        w, h = im.size
        if resize in ("crop", "cell", "cellfit"):
            crop = {"crop": 1.0, "cell": CELL_CROP, "cellfit": CELL_FIT_MIN}[resize]
            scale = size / min(w, h) / crop
        else:
            scale = size / max(w, h) if resize == "pad" else max(size / w, size / h)
        if im.format == "JPEG":
            im.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
        dw, dh = im.size  # what will be decoded: JPEG's draft scales by 1/2, 1/4 or 1/8 in the decoder
        if dw * dh > max_pixels:
            raise TooManyPixels(dw, dh, max_pixels)
        im = to_rgb(im)
        return resize_array(im, size, resize)


@contextmanager
def _decoding(src: str | os.PathLike | bytes):
    """What Pillow can open (a path, or a file object over the bytes), with every failure to decode it
    turned into one ImageError with its ``kind``."""
    if isinstance(src, bytes | bytearray | memoryview):
        if len(src) == 0:
            raise ImageError("empty file", "empty")
        src = io.BytesIO(src)
    elif os.path.isfile(src) and os.path.getsize(src) == 0:  # as for bytes: not "not an image"
        raise ImageError("empty file", "empty")
    try:
        yield src
    except FileNotFoundError:
        raise ImageError("file not found", "missing") from None
    except IsADirectoryError:
        raise ImageError("is a folder", "missing") from None
    except TooManyPixels as e:
        raise ImageError(str(e), "too_large") from None
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - every decoder failure becomes one clear message
        kind = "unsupported" if isinstance(e, UnidentifiedImageError) else "corrupt"
        raise ImageError(describe_error(e), kind) from None


def decode_image(src: str | os.PathLike | bytes, size: int, resize: str = "squash",
                 max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A path or the bytes of an image file -> (size, size, 3) uint8, as training decodes it; raises
    ImageError (with ``kind``) when it cannot."""
    with _decoding(src) as f:
        return load_image(f, size, resize, max_pixels)  # PIL opens file objects as well as paths


def decode_field(src: str | os.PathLike | bytes, long_side: int | None = None,
                 max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, float, tuple[int, int]]:
    """A whole field (a path or file bytes) -> (uint8 H x W x 3 scaled so its long side is
    ``long_side`` (None: as it is), that scale, the original (width, height)); raises ImageError as
    decode_image does. The aspect ratio is kept: a detector needs the field as the camera saw it."""
    with _decoding(src) as f, open_image(f, max_pixels) as im:
        w, h = im.size
        scale = 1.0 if long_side is None else long_side / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if im.format == "JPEG" and scale < 1:
            im.draft("RGB", size)
        im = to_rgb(im)
        if im.size != size:
            im = im.resize(size, Image.BILINEAR, reducing_gap=2.0)
        return np.asarray(im, dtype=np.uint8), scale, (w, h)


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


def describe_error(e: Exception) -> str:
    """One short line for why an image file could not be decoded."""
    if isinstance(e, ImageError):
        return str(e)
    if isinstance(e, UnidentifiedImageError):
        return "not an image (unreadable by the decoder)"
    if isinstance(e, TooManyPixels):
        return str(e)
    if isinstance(e, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return "image too large (more than 400 megapixels)"
    if isinstance(e, OSError) and "truncated" in str(e).lower():
        return "truncated or corrupt image data"
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


# A synthetic image's path in a predictions file: synthetic://<seed>/<index>
SYNTHETIC_PATH = re.compile(r"^synthetic://(\d+)/(\d+)$")


def saved_image(path: str, size: int, resize: str, bases: tuple[Path, ...] = ()) -> np.ndarray:
    """An image named in a predictions file, as training decoded it: a synthetic one regenerated, a
    file as written or relative to one of ``bases``; raises ImageError when it cannot be had."""
    m = SYNTHETIC_PATH.match(path)
    if m:
        return generate(1, size, int(m.group(1)), start=int(m.group(2)))[0][0]
    p = Path(path)
    if not p.is_file() and not p.is_absolute():
        p = next((b / p for b in bases if (b / p).is_file()), p)
    return decode_image(p, size, resize)
