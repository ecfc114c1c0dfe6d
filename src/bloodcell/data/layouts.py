"""Find the images under a path and say what layout they are in.

Layouts, tried in this order:
- ``synthetic`` (or ``synthetic:N``): bloodcell's built-in generated smears, no files needed;
- ``kaggle``: the Kaggle "Blood Cell Images" tree, ``images/{TRAIN,TEST,TEST_SIMPLE}/<CLASS>/*.jpeg``,
  found from ``images/``, ``dataset2-master/`` or the folder that holds ``dataset2-master/``;
- ``idc``: the Kaggle breast histopathology (IDC) patches, ``<patient>/{0,1}/*.png``, found from the
  folder of patient folders or the one above the release's nested ``IDC_regular_ps50_idx5/``; each
  patient is one group (``group_by`` ``patient``), whatever the class of its patches;
- ``table``: a CSV or TSV file of ``path,label`` rows (data.tables);
- ``medmnist``: a MedMNIST ``.npz`` file or name: its classes only, no items (data.medmnist);
- ``split-folders``: ``<root>/{train,val,test}/<class>/*`` (val optional);
- ``class-folders``: ``<root>/<class>/*`` (PBC is one).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from bloodcell.catalog import IMAGE_EXTENSIONS, INFO, SYNTHETIC_CLASSES
from bloodcell.config import CHOICES, Range
from bloodcell.data.medmnist import is_medmnist, locate, read_npz
from bloodcell.data.records import Item, Problem, Source
from bloodcell.data.tables import TABLE_SUFFIXES, is_file_group, read_table
from bloodcell.errors import DataError
from bloodcell.runfiles import shown

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
    "test_simple": "test_simple",
}
KAGGLE_NAME = re.compile(r"^_(\d+)_(\d+)\.jpe?g$", re.IGNORECASE)
IDC = INFO["breast-histopathology"]
IDC_NAME = re.compile(r"^(\w+?)_idx5_x\d+_y\d+_class(\d)\.png$", re.IGNORECASE)
# Groups that are sources holding images of any class (a patient, a table's group column): where
# class and source are confounded, splitting by them needs care (splits.missing_classes).
SOURCE_GROUPS = ("patient", "column")
SYNTHETIC_DEFAULT_N = 3000
SYNTHETIC_N = Range(40, 200_000)  # 200,000 generated images are 2.5 GB at 64 px


def is_synthetic(path: str | os.PathLike | None) -> bool:
    """True for the built-in data's names: ``synthetic`` or ``synthetic:N``."""
    return path is None or str(path) == "synthetic" or str(path).startswith("synthetic:")


def _list_dirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot read folder {path}: {e.strerror}") from e


def _walk_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """All files below folder (following links, loops cut), split into images and non-images."""
    images, others, seen = [], [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop: visit each real folder once
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            (images if p.suffix.lower() in IMAGE_EXTENSIONS else others).append(p)
    return images, others


def _find_kaggle_images(path: Path) -> Path | None:
    for cand in (path, path / "images", path / "dataset2-master" / "images",
                 path / "dataset2-master" / "dataset2-master" / "images"):
        if (cand / "TRAIN").is_dir() and (cand / "TEST").is_dir():
            return cand
    return None


def _idc_patients(folder: Path) -> list[Path] | None:
    """The patient folders of an IDC tree at ``folder`` (each holds only ``0`` and ``1`` folders), or None."""
    patients = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return None
    for e in entries:
        if e.name.startswith(".") or e.name == IDC["nested_folder"] or not e.is_dir():
            continue
        try:
            subs = {s.name for s in os.scandir(e.path) if s.is_dir() and not s.name.startswith(".")}
        except OSError:
            return None
        if not subs or not subs <= set(IDC["classes"]):
            return None
        patients.append(Path(e.path))
    return patients or None


def _find_idc(path: Path) -> tuple[Path, list[Path]] | None:
    """(root, patient folders) of the IDC layout at ``path`` or in its nested release folder."""
    for cand in (path, path / IDC["nested_folder"]):
        patients = _idc_patients(cand) if cand.is_dir() else None
        if patients:
            return cand, patients
    return None


def _file_item(p: Path, label: int, group: str, split: str) -> Item:
    try:
        st = p.stat()
    except OSError:  # a dangling link or a file gone since listing: counted as empty, so skipped
        return Item(str(p), label, group, split, 0, 0)
    return Item(str(p), label, group, split, st.st_size, st.st_mtime_ns)


GROUP_BY = CHOICES["group_by"]


def resolve_group_by(group_by: str, layout: str, group_regex: str | None) -> str:
    """``auto``: the file name's group where --group-regex says how to read it, else look-alike
    images for the Kaggle layout (whose _K_N names do not identify the cell), the patient for the
    IDC layout (``name`` too: the patient id leads its file names), the group column of a table
    that has one, else each file alone."""
    if group_by not in GROUP_BY:
        raise DataError(f"group_by must be one of {', '.join(GROUP_BY)}; got {group_by!r}")
    if layout == "idc" and (group_by == "auto" or (group_by == "name" and not group_regex)):
        return "patient"
    if layout == "table-groups" and group_by == "auto" and not group_regex:
        return "column"
    if group_by != "auto":
        return group_by
    if group_regex:
        return "name"
    return "similar" if layout == "kaggle" else "file"


def discover(path: str | os.PathLike | None, group_regex: str | None = None, group_by: str = "auto") -> Source:
    """Detect the layout under ``path`` and list every image with its class, group and split.

    Groups (images of one source, never split apart) follow ``group_by``: ``name`` (the part of the
    file name ``group_regex`` matches; the Kaggle ``_K_N`` K without one), ``similar`` (look-alike
    images), ``file`` (each file alone) or ``auto`` (resolve_group_by). Byte-identical files always
    share a group. Look-alike groups need the images decoded and are not made here: where
    ``group_by`` resolves to ``similar``, the items keep their file (and duplicate) groups until
    ``groups.similar_groups`` sets them; ``dataset.discover_grouped`` does both.
    """
    if is_synthetic(path):
        n = SYNTHETIC_DEFAULT_N
        if path and ":" in str(path):
            try:
                n = int(str(path).split(":", 1)[1])
            except ValueError as e:
                raise DataError(f"synthetic:N needs a whole number of images, got {path!r}") from e
            if not SYNTHETIC_N.lo <= n <= SYNTHETIC_N.hi:  # generated in RAM: a bound the machine holds
                raise DataError(f"synthetic:N takes {SYNTHETIC_N.lo:,} to {SYNTHETIC_N.hi:,} images, got {n:,}")
        return Source("synthetic", "synthetic", list(SYNTHETIC_CLASSES), [], synthetic_n=n)

    if is_medmnist(path):  # no files: load_dataset reads its arrays (data.medmnist); here, its classes
        file = locate(path)
        _, classes, _, problems = read_npz(file)
        return Source(str(file), "medmnist", classes, [], problems)
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data path does not exist: {root}")
    if root.is_file() and root.suffix.lower() in TABLE_SUFFIXES:
        src = read_table(root, SPLIT_ALIASES)
        has_groups = not all(is_file_group(it.group) for it in src.items)
        how = resolve_group_by(group_by, "table-groups" if has_groups else "table", group_regex)
        regex = compile_group_regex(group_regex) if how == "name" else None
        for it in src.items:
            if how != "column" or is_file_group(it.group):
                it.group = _group_for(Path(it.path).name, src.classes[it.label], regex, False, "", it.path)
        _note_unmatched(src, regex)
        return _finish(src, how)
    if not root.is_dir():
        raise DataError(f"data path is a file, not a folder of images or a label table "
                        f"({', '.join(TABLE_SUFFIXES)}): {root}")
    kaggle = _find_kaggle_images(root)
    idc = _find_idc(root) if kaggle is None else None
    how = resolve_group_by(group_by, "kaggle" if kaggle is not None else "idc" if idc else "", group_regex)
    regex = compile_group_regex(group_regex) if how == "name" else None
    if kaggle is not None:
        src = _discover_split_folders(kaggle, regex, kaggle_names=how == "name")
        src.layout = "kaggle"
    elif idc is not None:
        src = _discover_idc(*idc, how, regex)
    else:
        split_dirs = [d for d in _list_dirs(root) if d.name.lower() in SPLIT_ALIASES]
        if split_dirs and any(SPLIT_ALIASES[d.name.lower()] == "train" for d in split_dirs):
            src = _discover_split_folders(root, regex, kaggle_names=False)
        else:
            src = _discover_class_folders(root, regex)
    _note_unmatched(src, regex)
    return _finish(src, how)


def compile_group_regex(group_regex: str | None) -> re.Pattern | None:
    """--group-regex compiled; one that is not a regular expression is a DataError saying why."""
    if not group_regex:
        return None
    try:
        return re.compile(group_regex)
    except re.error as e:
        raise DataError(f"--group-regex {group_regex!r} is not a regular expression: {e}") from None


def _note_unmatched(src: Source, regex: re.Pattern | None) -> None:
    """A --group-regex that names no file's group, or only some files', said with those files: each
    of them is then a group of its own, which is rarely what was meant."""
    if regex is None or not src.items:
        return
    alone = [it.path for it in src.items if it.group == it.path]
    if alone:
        how = "no file name" if len(alone) == len(src.items) else \
            f"{len(src.items) - len(alone):,} of {len(src.items):,} file names"
        src.problems.append(Problem(
            "group_regex_unmatched", f"--group-regex '{regex.pattern}' matches {how}: "
            f"{len(alone):,} file(s) it does not match are each a group of their own", alone))


def _finish(src: Source, how: str) -> Source:
    """The checks every layout gets: duplicates merged, usability."""
    src.group_by = how
    _hash_and_merge_duplicates(src)
    _check_usable(src)
    _note_non_utf8(src)
    return src


def _note_non_utf8(src: Source) -> None:
    """Files (or class folders) whose names are not UTF-8: read and kept, and said, since another
    program may not read them; shown with their bytes escaped (\\xff)."""
    odd = [shown(it.path) for it in src.items if not _is_utf8(it.path)]
    classes = [shown(c) for c in src.classes if not _is_utf8(c)]
    if odd:
        src.problems.append(Problem(
            "non_utf8_names", f"{len(odd):,} file name(s) are not UTF-8 (read and kept; shown with their "
            "bytes as \\xNN" + (f"; classes {', '.join(classes)}" if classes else "") + ")", odd))


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _group_for(name: str, cls: str, regex: re.Pattern | None, kaggle_names: bool, split: str,
               path: str) -> str:
    if kaggle_names:
        m = KAGGLE_NAME.match(name)
        if m:  # _K_N.jpeg: K as the group (it is not the source cell: see data.groups)
            origin = "test" if split in ("test", "test_simple") else split
            return f"{origin}/{cls}/{m.group(1)}"
    if regex is not None:
        m = regex.search(name)
        if m:  # a source (a smear, a patient) of any class: one group whatever the class
            return f"name/{m.group(1) if m.groups() else m.group(0)}"
    return path


def _discover_split_folders(root: Path, regex, kaggle_names: bool) -> Source:
    splits = {}
    for d in _list_dirs(root):
        key = d.name.lower()
        if key in SPLIT_ALIASES:
            splits[SPLIT_ALIASES[key]] = d
    # Classes are matched case-insensitively across splits; names come from the train folder.
    class_names: dict[str, str] = {}
    for split_dir in [splits[s] for s in ("train", "val", "test", "test_simple") if s in splits]:
        for c in _list_dirs(split_dir):
            class_names.setdefault(c.name.lower(), c.name)
    classes = sorted(class_names.values(), key=str.lower)
    index = {c.lower(): i for i, c in enumerate(classes)}
    src = Source(str(root), "split-folders", classes, [])
    for split, split_dir in splits.items():
        for c in _list_dirs(split_dir):
            images, others = _walk_files(c)
            _note_non_images(src, others)
            for p in images:
                label = index[c.name.lower()]
                src.items.append(_file_item(
                    p, label, _group_for(p.name, classes[label], regex, kaggle_names, split, str(p)),
                    split))
    return src


def _discover_idc(root: Path, patients: list[Path], how: str, regex) -> Source:
    folders = list(IDC["classes"])  # "0", "1": the label index is the folder's position
    src = Source(str(root), "idc", list(IDC["classes"].values()), [])
    if root.joinpath(IDC["nested_folder"]).is_dir():
        src.problems.append(Problem("idc_nested_copy", f"{IDC['nested_folder']}/ (the release's second copy of "
                                    "the patient folders) is not read: its patches are the ones beside it"))
    others_all, mismatch = [], []
    for d in patients:
        for label, folder in enumerate(folders):
            images, others = _walk_files(d / folder) if (d / folder).is_dir() else ([], [])
            others_all += others
            for p in images:
                m = IDC_NAME.match(p.name)
                if m and m.group(2) != folder:  # the name's class<C> contradicts the folder
                    mismatch.append(str(p))
                    continue
                group = f"patient/{d.name}" if how == "patient" else _group_for(
                    p.name, src.classes[label], regex, False, "", str(p))
                src.items.append(_file_item(p, label, group, ""))
    _note_non_images(src, others_all)
    if mismatch:
        src.problems.append(Problem("idc_label_conflict", f"{len(mismatch)} patch(es) whose name's class "
                                    "differs from their folder's (left out)", mismatch))
    return src


def _discover_class_folders(root: Path, regex) -> Source:
    dirs = _list_dirs(root)
    classes = [d.name for d in dirs]
    src = Source(str(root), "class-folders", classes, [])
    for label, d in enumerate(dirs):
        images, others = _walk_files(d)
        _note_non_images(src, others)
        for p in images:
            src.items.append(_file_item(p, label, _group_for(p.name, d.name, regex, False, "", str(p)), ""))
    return src


def _note_non_images(src: Source, others: list[Path]) -> None:
    if others:
        src.problems.append(Problem(
            "non_image_files", f"{len(others)} file(s) without an image extension skipped",
            [str(p) for p in others]))


def _sha1(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def _hash_and_merge_duplicates(src: Source) -> None:
    """Byte-identical files become one group; across classes they are a label conflict and dropped."""
    by_hash: dict[str, list[Item]] = {}
    empty = []
    for it in src.items:
        if it.size == 0:
            empty.append(it)
            continue
        it.sha1 = _sha1(it.path)
        by_hash.setdefault(it.sha1, []).append(it)
    if empty:
        src.problems.append(Problem("empty_files", f"{len(empty)} empty or unreadable file(s) skipped",
                                    [it.path for it in empty]))
    drop = {id(it) for it in empty}
    within, across, leak = [], [], []
    # Union groups that share a file so that no split separates them.
    parent: dict[str, str] = {}

    def find(g: str) -> str:
        while parent.get(g, g) != g:
            g = parent[g]
        return g

    for dups in by_hash.values():
        if len(dups) < 2:
            continue
        labels = {it.label for it in dups}
        given = {it.split for it in dups}
        if len(labels) > 1:
            across.append([it.path for it in dups])
            drop.update(id(it) for it in dups)
            continue
        if len(given) > 1 and "" not in given:
            leak.append([it.path for it in dups])
            # Splits given by folders stay as given for test; the copies outside test are dropped.
            keep_split = "test" if "test" in given else sorted(given)[0]
            drop.update(id(it) for it in dups if it.split != keep_split and it.split != "test_simple")
        else:
            within.append([it.path for it in dups])
        roots = {find(it.group) for it in dups}
        first = min(roots)
        for r in roots:
            parent[r] = first
    for it in src.items:
        it.group = find(it.group)
    if within:
        src.problems.append(Problem(
            "duplicates_within_class",
            f"{sum(len(d) for d in within)} byte-identical files in {len(within)} sets (kept, one group each)",
            [" == ".join(d) for d in within]))
    if across:
        src.problems.append(Problem(
            "duplicates_across_classes",
            f"{len(across)} file(s) stored under two classes (label conflict; all copies left out)",
            [" == ".join(d) for d in across]))
    if leak:
        src.problems.append(Problem(
            "duplicates_across_splits",
            f"{len(leak)} file(s) in more than one split folder (leakage; copies outside test left out)",
            [" == ".join(d) for d in leak]))
    src.excluded = [it.path for it in src.items if id(it) in drop]
    src.items = [it for it in src.items if id(it) not in drop]


def _check_usable(src: Source) -> None:
    counts = [0] * len(src.classes)
    for it in src.items:
        counts[it.label] += 1
    empty = [c for c, n in zip(src.classes, counts, strict=True) if n == 0]
    if empty:
        src.problems.append(Problem("empty_classes", f"class folder(s) with no images (left out): "
                                    f"{', '.join(empty)}", empty))
        keep = [i for i, n in enumerate(counts) if n > 0]
        remap = {old: new for new, old in enumerate(keep)}
        src.classes = [src.classes[i] for i in keep]
        counts = [counts[i] for i in keep]
        for it in src.items:
            it.label = remap[it.label]
    loose = [p for p in Path(src.root).glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS] if not src.items else []
    if loose:
        src.problems.append(Problem("unlabelled_images", f"{len(loose)} image(s) directly in {src.root} and no "
                                    "class folders: unlabelled images are for `bloodcell predict RUN FOLDER` and "
                                    "`bloodcell adapt RUN --data FOLDER`; to train, put them in <class>/ folders or "
                                    "list them in a label table", fatal=True))
    elif not src.items:
        src.problems.append(Problem("no_images", f"no images found under {src.root} "
                                    f"(looked for {', '.join(IMAGE_EXTENSIONS)})", fatal=True))
    elif sum(1 for n in counts if n > 0) < 2:
        src.problems.append(Problem("one_class", "only one class has images; a classifier needs two or more",
                                    fatal=True))
    if any(it.split for it in src.items):
        for split in sorted({it.split for it in src.items}):
            present = {it.label for it in src.items if it.split == split}
            missing = [c for i, c in enumerate(src.classes) if i not in present and counts[i] > 0]
            if missing:
                src.problems.append(Problem("class_missing_from_split",
                                            f"split {split!r} has no images of: {', '.join(missing)}",
                                            missing))


def raise_if_fatal(src: Source) -> None:
    """Raise DataError with the first fatal problem's one-line description."""
    for p in src.problems:
        if p.fatal:
            raise DataError(p.detail)
