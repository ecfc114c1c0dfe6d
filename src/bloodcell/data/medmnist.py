"""MedMNIST ``.npz`` files as a data set: ``<flag>[_<size>].npz`` with its official train/val/test splits.

``--data path/to/bloodmnist_128.npz`` reads that file. ``--data bloodmnist_128`` (a MedMNIST name;
``bloodmnist`` is the 28 px file) looks for it in the cache folder's ``medmnist/`` and in
``~/.medmnist`` (the medmnist package's own folder), and where it is in neither downloads it into
the first through the ``medmnist`` package (``pip install 'bloodcell[medmnist]'``); offline, or
without the package, that is one line saying what to do. Label names come from the package's INFO
table when it is installed, else from bloodcell's copy of it (``info.MEDMNIST``). Grey sets become 3
channels; multi-label sets (ChestMNIST) and 3D volumes are refused. The splits are the file's, as
given: the seed does not change them, and each image is its own group. The images are resized once
to the image size (data.images.resize_array) into a memory-mapped array in the cache folder, keyed
by the file (path, size, mtime), the image size and the resize mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bloodcell.catalog import MEDMNIST, MEDMNIST_SIZES
from bloodcell.data.cache import cache_folder, write_array
from bloodcell.data.images import resize_array
from bloodcell.data.records import Dataset, Problem, Split
from bloodcell.errors import DataError

SPLITS = ("train", "val", "test")
NAME = re.compile(r"^([a-z]+mnist)(?:_(\d+))?$")
FORMAT = 1


def parse_name(name: str) -> tuple[str, int] | None:
    """('bloodmnist', 128) for 'bloodmnist_128' or 'bloodmnist_128.npz' (28 without a size), None
    for a name that is not one of MedMNIST's 2D sets at one of its sizes."""
    m = NAME.match(Path(str(name)).name.removesuffix(".npz").lower())
    if not m or m.group(1) not in MEDMNIST:
        return None
    size = int(m.group(2) or 28)
    return (m.group(1), size) if size in MEDMNIST_SIZES else None


def is_medmnist(path) -> bool:
    """True for a path ending in .npz, and for a MedMNIST name (``bloodmnist_64``) that is not a path."""
    if path is None:
        return False
    s = str(path)
    return s.lower().endswith(".npz") or (not os.path.exists(s) and parse_name(s) is not None)


def medmnist_info(flag: str) -> dict | None:
    """MedMNIST's INFO entry of a set: the medmnist package's when installed, else bloodcell's copy."""
    try:
        # optional dependency, imported only here; its import prints a hint where its own
        # dependencies are missing, which must not reach a --json output
        with contextlib.redirect_stdout(io.StringIO()):
            import medmnist
        return medmnist.INFO.get(flag)
    except ImportError:
        return MEDMNIST.get(flag)


def file_name(flag: str, size: int) -> str:
    """MedMNIST's file name of a set at a size: bloodmnist.npz, bloodmnist_128.npz."""
    return f"{flag}{'' if size == 28 else f'_{size}'}.npz"


def locate(path, cache_dir=None) -> Path:
    """The .npz file that ``path`` names: the file itself, or a MedMNIST name found or downloaded."""
    s = str(path)
    if s.lower().endswith(".npz"):
        p = Path(s).expanduser()
        if not p.is_file():
            raise DataError(f"data file does not exist: {p}")
        return p
    flag, size = parse_name(s)
    name = file_name(flag, size)
    folder = cache_folder(cache_dir) / "medmnist"
    for d in (folder, Path.home() / ".medmnist"):
        if (d / name).is_file():
            return d / name
    return download(flag, size, folder)


def download(flag: str, size: int, folder: Path) -> Path:
    """Download ``flag`` at ``size`` into ``folder`` through the medmnist package (its URL, its MD5
    check), under a temporary folder and then one rename; every failure is one DataError line."""
    name = file_name(flag, size)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import medmnist  # optional dependency: only a download needs it
    except ImportError as e:
        raise DataError(f"{name} is not in {folder}: install the medmnist package to download it "
                        f"(pip install 'bloodcell[medmnist]'), or put the file there") from e
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder))
    try:
        cls = getattr(medmnist, medmnist.INFO[flag]["python_class"])
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cls(split="val", download=True, size=size, root=str(tmp))
        os.replace(tmp / name, folder / name)
    except Exception as e:  # noqa: BLE001 - offline, refused, bad checksum: one line, never a traceback
        cause = e.__context__ or e
        reason = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else type(cause).__name__
        raise DataError(f"could not download {name} through the medmnist package ({reason}); offline? "
                        f"put the file in {folder}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / name


def read_npz(file: Path) -> tuple[str, list[str], dict[str, np.ndarray], list[Problem]]:
    """(set name, class names, labels per split, problems) of a MedMNIST file, checked."""
    try:
        z = np.load(file, allow_pickle=False)
        keys = set(z.files)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {file} as a .npz file: {e}") from e
    need = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
    if not set(need) <= keys:
        raise DataError(f"{file} is not a MedMNIST file: it needs the arrays {', '.join(need)}; "
                        f"it has {', '.join(sorted(keys)) or 'none'}")
    flag = (parse_name(file.name) or (file.stem.lower(), 0))[0]
    info = medmnist_info(flag) or {}
    if "multi-label" in info.get("task", ""):
        raise DataError(f"{file.name} is a multi-label set ({flag}: {len(info.get('label', {}))} labels per "
                        "image); bloodcell classifies one label per image")
    labels, problems = {}, []
    for s in SPLITS:
        y = np.asarray(z[f"{s}_labels"])
        if y.ndim == 2 and y.shape[1] != 1:
            raise DataError(f"{file.name} is multi-label ({s}_labels holds {y.shape[1]} labels per image); "
                            "bloodcell classifies one label per image")
        shape = z[f"{s}_images"].shape
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)) or shape[0] != len(y):
            raise DataError(f"{file.name}: {s}_images has shape {shape}; bloodcell reads 2D images, "
                            f"N x H x W or N x H x W x 3, one per label ({len(y)})")
        labels[s] = y.reshape(-1).astype(np.int64)
    official = info.get("n_samples") or {}
    if parse_name(file.name) and official and any(official.get(s) != len(y) for s, y in labels.items()):
        problems.append(Problem("medmnist_counts", "split sizes " + ", ".join(
            f"{s} {len(y):,}" for s, y in labels.items()) + f" differ from MedMNIST's {flag} ("
            + ", ".join(f"{official.get(s, 0):,}" for s in SPLITS) + "): a subset or another version"))
    table = info.get("label") or ()
    table = [table[str(k)] for k in range(len(table))] if isinstance(table, dict) else list(table)
    n = max(len(table), int(max(y.max(initial=-1) for y in labels.values())) + 1)
    names = [str(table[k]) if k < len(table) else str(k) for k in range(n)]
    if min(y.min(initial=0) for y in labels.values()) < 0 or n < 2:
        raise DataError(f"{file.name}: labels must be class indices 0..C-1 of two or more classes")
    return flag, names, labels, problems


def _key(file: Path, size: int, resize: str) -> str:
    st = file.stat()
    text = f"bloodcell-medmnist/{FORMAT}/{file.resolve()}\t{st.st_size}\t{st.st_mtime_ns}/{size}/{resize}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def decoded(file: Path, size: int, resize: str, cache_dir=None) -> tuple[np.ndarray, dict[str, int], bool]:
    """(every split's images resized to size x size x 3 uint8, one memory map, train then val then
    test; the split sizes; was_cached)."""
    with np.load(file, allow_pickle=False) as z:
        counts = {s: int(z[f"{s}_labels"].shape[0]) for s in SPLITS}
    path = cache_folder(cache_dir) / f"medmnist-{_key(file, size, resize)}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r"), counts, True

    def fill(tmp: str) -> None:
        out = np.load(tmp, mmap_mode="r+")
        start = 0
        with np.load(file, allow_pickle=False) as z:
            for s in SPLITS:
                images = z[f"{s}_images"]  # one split in RAM at a time
                for i, im in enumerate(images):
                    out[start + i] = to_square(im, size, resize)
                start += len(images)
        out.flush()

    write_array(path, (sum(counts.values()), size, size, 3), fill)
    return np.load(path, mmap_mode="r"), counts, False


def to_square(image: np.ndarray, size: int, resize: str) -> np.ndarray:
    """One MedMNIST image (H x W, H x W x 1 or H x W x 3 uint8) as size x size x 3 RGB."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    rgb = np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a
    if rgb.shape[:2] == (size, size):
        return rgb
    return resize_array(Image.fromarray(rgb.astype(np.uint8), "RGB"), size, resize)


def load_medmnist(path, image_size: int, resize: str = "squash", cache_dir=None) -> Dataset:
    """A MedMNIST file (or name) as a Dataset of its official splits, resized and cached."""
    file = locate(path, cache_dir)
    _, classes, labels, problems = read_npz(file)
    images, counts, cached = decoded(file, image_size, resize, cache_dir)
    splits, start = {}, 0
    for s in SPLITS:
        rows = np.arange(start, start + counts[s])
        start += counts[s]
        if not len(rows):
            continue
        splits[s] = Split(images=images[rows] if 2 * len(rows) < len(images) else _view(images, rows),
                          labels=labels[s], groups=rows.copy(), paths=[f"{file}#{s}/{i}" for i in range(len(rows))])
    return Dataset(str(file), "medmnist", classes, splits, image_size, resize, problems, cached, "file")


def _view(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Contiguous rows of the memory map: a slice, so nothing is read until a batch asks."""
    return images[int(rows[0]):int(rows[-1]) + 1]


def check_medmnist(path, cache_dir=None) -> dict:
    """``bloodcell data check`` of a MedMNIST file: classes x splits, image size and mode, problems."""
    file = locate(path, cache_dir)
    flag, classes, labels, problems = read_npz(file)
    with np.load(file, allow_pickle=False) as z:
        shape = z["train_images"].shape
    splits = {s: {"images": {c: int((y == k).sum()) for k, c in enumerate(classes)},
                  "groups": {c: int((y == k).sum()) for k, c in enumerate(classes)}} for s, y in labels.items()}
    for s, y in labels.items():
        lacking = [c for k, c in enumerate(classes) if not (y == k).any()]
        if lacking:
            problems.append(Problem("class_missing_from_split", f"split {s!r} has no images of: "
                                    f"{', '.join(lacking)}", lacking))
    n = sum(len(y) for y in labels.values())
    return {"root": str(file), "layout": "medmnist", "group_by": "file", "classes": classes, "splits": splits,
            "sizes": {f"{shape[2]}x{shape[1]}": n},
            "modes": {"RGB" if len(shape) == 4 and shape[3] == 3 else "L": n},
            "problems": [p.__dict__ for p in problems], "usable": True, "excluded": [], "medmnist": flag}
