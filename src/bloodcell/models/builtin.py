"""The models bloodcell ships (``builtin``): a white-cell classifier and a cell detector, inside the
package (``bloodcell/builtin/``), each with its model card and checksum, so ``predict``, ``count`` and
the rest work right after install, offline.

``resolve_run(name, kind)`` is what every command that takes a RUN calls: ``builtin`` becomes the
shipped file of that kind (checked against its recorded SHA-256), anything else is returned as given.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

from bloodcell.errors import BloodcellError

KINDS = {"classifier": "classifier.pt", "detector": "detector.pt"}
BUILTIN = "builtin"


def builtin_dir() -> Path:
    """Where the shipped models are (a folder inside the installed package)."""
    return Path(str(resources.files("bloodcell") / "builtin"))


def manifest() -> dict:
    """builtin/manifest.json: per kind its file, SHA-256, size and the command that rebuilds it."""
    p = builtin_dir() / "manifest.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def sha256(path: Path) -> str:
    """The file's SHA-256, as manifest.json records it."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def builtin_path(kind: str) -> Path:
    """The shipped file of a kind, checked against the manifest's checksum."""
    if kind not in KINDS:
        raise BloodcellError(f"unknown built-in kind {kind!r}; known: {', '.join(KINDS)}")
    p = builtin_dir() / KINDS[kind]
    entry = manifest().get(kind)
    if not p.is_file() or entry is None:
        raise BloodcellError(f"this install has no built-in {kind} ({p}); give a trained run instead")
    if sha256(p) != entry["sha256"]:
        raise BloodcellError(f"the built-in {kind} ({p}) does not match its recorded checksum: reinstall bloodcell")
    return p


def resolve_run(name: str, kind: str) -> str:
    """``builtin`` -> the shipped file of ``kind``; any other RUN as given."""
    return str(builtin_path(kind)) if name == BUILTIN else name
