"""The run-folder contract: what a run, a comparison or an evaluation writes, and how it is read back.

Every file goes through ``atomic_write``: written under a temporary name in the same folder, then
renamed over the old one, so a reader (or a rerun after a kill) sees the old file or the new one,
never half of one. docs/design.md lists the files of each folder.

A train run folder: ``config.yaml`` (the config as given, for --resume), ``resolved.yaml``,
``history.csv``, ``best.pt``, ``last.pt``, ``splits.json``, ``metrics.json``,
``predictions_<split>.csv`` and the ``DONE`` marker.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import yaml

from bloodcell.errors import BloodcellError

LOCK_FILE = ".lock"  # the run-folder lock (run_lock); never part of a run's results
RUN_FILES = ("config.yaml", "history.csv", "best.pt", "last.pt", "splits.json", "metrics.json", "DONE")


# --- writing ----------------------------------------------------------------------------------


def _file_mode() -> int:
    """The mode a plainly created file gets here (0o666 less the umask), read without changing it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text (UTF-8; a non-UTF-8 file name in it as its own bytes) or bytes to ``path`` via a
    temporary file in its folder and a rename.

    The file gets the permissions a plain write would give it (mkstemp's private 0600 is not kept).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            # a file name that is not UTF-8 (a path in a CSV) is written as its bytes, as on disk
            f.write(data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data)
            os.fchmod(f.fileno(), _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data, indent: int | None = 1, **kwargs) -> Path:
    """A JSON file, atomically."""
    return atomic_write(path, json.dumps(data, indent=indent, **kwargs))


def write_yaml(path: str | os.PathLike, data: dict) -> Path:
    """A YAML mapping, keys in the order given, atomically."""
    return atomic_write(path, yaml.safe_dump(data, sort_keys=False))


def write_csv(path: str | os.PathLike, rows: list[dict] | list[list], fieldnames: list[str] | None = None,
              **kwargs) -> Path:
    """A CSV file, atomically: dict rows under ``fieldnames`` (default: the first row's keys), or
    plain rows where ``fieldnames`` is a header list and rows are lists."""
    buf = io.StringIO(newline="")
    if rows and isinstance(rows[0], dict):
        w = csv.DictWriter(buf, fieldnames=fieldnames or list(rows[0]), **kwargs)
        w.writeheader()
        w.writerows(rows)
    else:
        w = csv.writer(buf, **kwargs)
        if fieldnames is not None:
            w.writerow(fieldnames)
        w.writerows(rows)
    return atomic_write(path, buf.getvalue())


# --- checking where output goes, before any work -----------------------------------------------


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (what a mkdir(parents=True) would start from)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A folder output may go to, created nowhere: a BloodcellError naming ``flag`` if it is a file,
    if a part of it is a file, or if it (or the folder it would be created in) is not writable."""
    path = Path(path)
    base = _first_existing(path)
    if base == path and not path.is_dir():
        raise BloodcellError(f"{flag} {path}: is a file, not a folder")
    if not base.is_dir():
        raise BloodcellError(f"{flag} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only(base) else "permission denied"
        raise BloodcellError(f"{flag} {path}: cannot write in {base} ({why})")
    return path


def check_out_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A file output may be written to: not a folder, its folder as check_out_dir wants it."""
    path = Path(path)
    if path.is_dir():
        raise BloodcellError(f"{flag} {path}: is a folder, not a file name")
    try:
        check_out_dir(path.parent, flag)
    except BloodcellError as e:
        raise BloodcellError(str(e).replace(f"{flag} {path.parent}:", f"{flag} {path}:", 1)) from None
    return path


def file_kind(path: str | os.PathLike) -> str | None:
    """None where ``path`` is a regular file (after links); else what it is instead ("missing", "a
    folder", "a FIFO", "a device", "a socket"): what must not be opened as a file, since opening a
    FIFO waits for a writer for ever and a device never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return e.strerror or "unreadable"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), not a file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a file"
    return "a device, not a file"


def check_in_file(path: str | os.PathLike, what: str) -> Path:
    """An input file that must be a regular file: else a BloodcellError naming ``what`` (a flag, or
    'config file') and what the path is instead, before anything opens it."""
    kind = file_kind(path)
    if kind is not None:
        raise BloodcellError(f"{what} {shown(path)}: {'not found' if kind == 'missing' else kind}")
    return Path(path)


def shown(path: str | os.PathLike) -> str:
    """A path as a line may show it: a name that is not UTF-8 keeps its bytes as backslash escapes
    (b'\\xff' as \\xff) instead of failing to print."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _read_only(p: Path) -> bool:
    try:
        return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def os_error_line(e: OSError) -> str:
    """An OSError as the one line the CLI prints: what failed, on which path, and that nothing
    already written was lost (every file goes through atomic_write)."""
    where = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    what = e.strerror or str(e)
    line = f"{what}: {where}" if where is not None else what
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        line += " (disk full: files already written are whole; free space and run the command again)"
    return line


# --- one process per run folder -----------------------------------------------------------------


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, what: str = "run"):
    """Hold ``folder``/.lock exclusively (fcntl.flock) while the block runs; a second process gets
    a BloodcellError at once. The OS releases the lock when the process dies (SIGKILL included),
    so a killed run never leaves a stale lock: the file may stay, the lock does not."""
    import fcntl  # POSIX only: importing bloodcell elsewhere still works

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise BloodcellError(f"{folder} is in use by another bloodcell {what} (pid {holder}); wait "
                                 "for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield folder
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def check_not_in_use(folder: str | os.PathLike, what: str = "run") -> None:
    """Refuse a folder whose lock another process holds now (a BloodcellError naming its pid), before
    any other check of its files gives advice (--overwrite, --resume) that does not apply to it."""
    if (Path(folder) / LOCK_FILE).is_file():
        with run_lock(folder, what):
            pass


def has_files(folder: Path) -> bool:
    """Whether ``folder`` holds anything but the lock file."""
    return folder.is_dir() and any(p.name != LOCK_FILE for p in folder.iterdir())


# --- reading ----------------------------------------------------------------------------------


def read_csv(path: str | os.PathLike) -> list[dict] | None:
    """Rows of a CSV file as dicts, or None when it is missing or unreadable."""
    try:
        with open(path, newline="", errors="surrogateescape") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def read_json(path: str | os.PathLike):
    """A JSON file's content (a missing or broken file raises, as a caller may want to know)."""
    return json.loads(Path(path).read_text())


# --- a train run folder -----------------------------------------------------------------------


def prepare_run_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to clobber a finished run unless asked; create the folder. An overwritten run's files
    stay until clear_run_dir, once the new run's data and model have loaded. Nothing is created
    here: run_lock creates the folder when the run is about to write in it."""
    if resume:
        if not (out / "config.yaml").is_file():
            raise BloodcellError(f"--resume: {out} holds no run to resume (no config.yaml)")
        return
    if has_files(out) and not overwrite:
        what = "a finished run" if (out / "DONE").exists() else "files (an unfinished run?)"
        raise BloodcellError(f"{out} already holds {what}; use --overwrite to replace it"
                             + ("" if (out / "DONE").exists() else " or --resume to continue it"))


def clear_run_dir(out: Path) -> None:
    """Remove the files of the run being overwritten (a bad path or --init-from fails before this,
    and leaves that run whole)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for p in out.glob("predictions_*.csv"):
        p.unlink()


def write_history(rows: list[dict], path: Path) -> None:
    """history.csv, one row per epoch."""
    if rows:
        write_csv(path, rows)


def write_predictions(path: Path, paths: list[str], labels: np.ndarray, probs: np.ndarray,
                      classes: list[str]) -> None:
    """predictions_<split>.csv: path, true label, predicted label, confidence and every probability."""
    pred = probs.argmax(1)
    rows = [[p, classes[y], classes[k], f"{row[k]:.6f}", *[f"{v:.6f}" for v in row]]
            for p, y, k, row in zip(paths, labels, pred, probs, strict=True)]
    write_csv(path, rows, ["path", "label", "pred", "confidence", *[f"p_{c}" for c in classes]])


def read_predictions(path: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read predictions_<split>.csv back: (probabilities N x C, label indices, paths)."""
    index = {c: i for i, c in enumerate(classes)}
    with open(path, newline="", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows], dtype=np.float64)
    probs /= probs.sum(1, keepdims=True)  # undo the rounding of the 6-decimal file
    return probs, np.array([index[r["label"]] for r in rows], dtype=np.int64), [r["path"] for r in rows]


def read_history(path: Path) -> dict[str, np.ndarray] | None:
    """history.csv as float columns (NaN where empty or unparsable), or None when there is no epoch."""
    rows = read_csv(path)
    if not rows or "epoch" not in rows[0]:
        return None
    return {k: np.array([_float(r.get(k)) for r in rows], dtype=float) for k in rows[0]}


def _float(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v if np.isfinite(v) else float("nan")


def mark_done(out: Path, stamp: str) -> None:
    """The DONE marker: the run finished and its metrics.json is whole."""
    atomic_write(out / "DONE", stamp)


# --- a compare folder -------------------------------------------------------------------------


def load_results(d: Path) -> dict:
    """results.json of a compare folder; a BloodcellError when it is missing or unreadable."""
    path = d / "results.json"
    if not path.is_file():
        raise BloodcellError(f"{d} holds no results.json (not a compare folder? "
                             "'bloodcell compare --out DIR' writes one)")
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BloodcellError(f"{path} could not be read: {e}") from e
    if not isinstance(res, dict) or not isinstance(res.get("models"), list):
        raise BloodcellError(f"{path} has no 'models' list; is it a bloodcell compare result?")
    return res


def run_dir(d: Path, row: dict) -> Path:
    """A model's run folder (results.json gives it relative to the compare folder)."""
    return d / (row.get("run_dir") or f"runs/{row.get('model')}")
