"""The decoded-image cache: each image decoded once (data.images) into a memory-mapped uint8 array
on disk, and the built-in synthetic set's generated arrays.

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
from pathlib import Path

import numpy as np

from bloodcell.data import synthetic
from bloodcell.data.images import RESIZE_MODES, describe_error, load_image
from bloodcell.data.records import Item
from bloodcell.runfiles import check_out_dir, write_json
from bloodcell.runtime import check_stop, pid_alive, user_cache_dir, worker_map

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """The user's cache folder: $BLOODCELL_CACHE, else $XDG_CACHE_HOME/bloodcell, else ~/.cache/bloodcell."""
    return user_cache_dir()


def cache_folder(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir``, or default_cache_dir() when it is not given; created if missing."""
    folder = check_out_dir(Path(cache_dir) if cache_dir else default_cache_dir(), "cache folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def fingerprint(items: list[Item], size: int, resize: str) -> str:
    """A key that changes when any file, the image size or the resize mode changes."""
    h = hashlib.sha256(f"bloodcell-cache/{CACHE_FORMAT}/{size}/{resize}".encode())
    for it in items:
        # a name that is not UTF-8 counts as its bytes (surrogateescape: what os.fsencode gives)
        h.update(f"\n{os.path.abspath(it.path)}\t{it.size}\t{it.mtime_ns}".encode("utf-8", "surrogateescape"))
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
            errors.append(describe_error(e))
    arr.flush()
    return errors


def write_array(path: Path, shape: tuple[int, ...], fill):
    """Create the uint8 array file ``path`` (.npy) of ``shape``: ``fill(tmp)`` writes the rows into the
    file at ``tmp`` (open it with ``np.load(tmp, mmap_mode="r+")``), then one rename makes it whole,
    so an interrupted build never leaves a file a later run would read. Returns what ``fill`` returns."""
    # A build killed outright (SIGKILL, power) left its temporary, as big as the array: remove
    # those of processes that are gone. The name carries the builder's process id for that.
    for old in path.parent.glob(f".{path.stem}.*.npy"):
        pid = old.name.split(".")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            old.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.{os.getpid()}.", suffix=".npy", dir=path.parent)
    os.close(fd)
    try:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape).flush()  # header and size
        reserve(tmp)
        out = fill(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def reserve(path: str | os.PathLike) -> None:
    """Allocate a (sparse) file's blocks now: a full disk is then an OSError (ENOSPC) here, not a
    SIGBUS that kills whichever process later writes a page of the memory map."""
    if hasattr(os, "posix_fallocate"):  # Linux; elsewhere the map's writes are unreserved
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as e:
            raise OSError(e.errno, e.strerror, os.fspath(path)) from None  # say which file
        finally:
            os.close(fd)


def build_cache(items: list[Item], size: int, resize: str = "squash", cache_dir: str | os.PathLike | None = None,
                workers: int | None = None, progress=None) -> tuple[np.ndarray, list[str | None], bool]:
    """Return (images memmap N x size x size x 3, per-item error or None, was_cached)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; known: {', '.join(RESIZE_MODES)}")
    cache_dir = cache_folder(cache_dir)
    key = fingerprint(items, size, resize)
    data_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if data_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("n") == len(items):
            return np.load(data_path, mmap_mode="r"), meta["errors"], True
    n = len(items)

    def decode_into(tmp: str) -> list[str | None]:
        paths = [it.path for it in items]
        chunk = 256
        jobs = [(paths[i:i + chunk], size, resize, tmp, i) for i in range(0, n, chunk)]
        nproc = workers or min(len(jobs), os.cpu_count() or 1)
        errors: list[str | None] = []
        if nproc <= 1 or n < 512:
            for j in jobs:
                check_stop()
                errors.extend(_decode_chunk(j))
                if progress:
                    progress(len(errors), n)
        else:
            for errs in worker_map(_decode_chunk, jobs, nproc):
                errors.extend(errs)
                if progress:
                    progress(len(errors), n)
        return errors

    errors = write_array(data_path, (n, size, size, 3), decode_into)
    write_json(meta_path, {"n": n, "size": size, "resize": resize, "errors": errors, "format": CACHE_FORMAT},
               indent=None)
    return np.load(data_path, mmap_mode="r"), errors, False


def synthetic_arrays(n: int, size: int, seed: int,
                     cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """The synthetic set's images (memory-mapped when read back) and labels, generated once per
    (generator source, seed, n, size) and kept in the cache folder: (images, labels, was_cached)."""
    cache_dir = cache_folder(cache_dir)
    # The generator's own source is part of the key: a changed generator never reads an old cache.
    version = hashlib.sha1(Path(synthetic.__file__).read_bytes()).hexdigest()[:10]
    f = cache_dir / f"synthetic-{version}-{seed}-{n}-{size}.npy"
    f_labels = f.with_suffix(".labels.npy")
    if f.exists() and f_labels.exists():
        return np.load(f, mmap_mode="r"), np.load(f_labels), True
    images, labels = synthetic.generate(n, size, seed)
    for target, arr in ((f_labels, labels), (f, images)):  # images last: their presence means complete
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp.npy")
        try:
            np.save(tmp, arr)
            os.replace(tmp, target)
        except BaseException:  # a full disk, say: no half file left behind
            tmp.unlink(missing_ok=True)
            raise
    return images, labels, False
