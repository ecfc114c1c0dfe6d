"""Shared fixtures: real data through BLOODCELL_TEST_DATA (skipped when unset), tiny image folders."""

from __future__ import annotations

import io
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodcell.config import TrainConfig, make_config

KAGGLE_CLASSES = ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Every test session gets its own decoded-image cache, never the user's."""
    old = os.environ.get("BLOODCELL_CACHE")
    os.environ["BLOODCELL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("BLOODCELL_CACHE", None)
    else:
        os.environ["BLOODCELL_CACHE"] = old


@pytest.fixture
def terminal_sigint():
    """SIGINT raising KeyboardInterrupt, as in a terminal: a test run started in the background
    (`cmd &` in a script, nohup) inherits SIGINT ignored, and Python then leaves it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _real_root() -> Path | None:
    root = os.environ.get("BLOODCELL_TEST_DATA")
    return Path(root) if root else None


@pytest.fixture(scope="session")
def kaggle_root() -> Path:
    """The Kaggle blood-cells copy (…/blood-cells); skips when BLOODCELL_TEST_DATA is unset."""
    root = _real_root()
    if root is None:
        pytest.skip("BLOODCELL_TEST_DATA is not set")
    p = root / "blood-cells"
    if not p.is_dir():
        pytest.skip(f"{p} not found")
    return p


@pytest.fixture(scope="session")
def pbc_root() -> Path:
    """The PBC share (…/PBC_dataset_normal_DIB); skips when BLOODCELL_TEST_DATA is unset."""
    root = _real_root()
    if root is None:
        pytest.skip("BLOODCELL_TEST_DATA is not set")
    p = root / "pbc" / "PBC_dataset_normal_DIB"
    if not p.is_dir():
        pytest.skip(f"{p} not found")
    return p


@pytest.fixture(scope="session")
def other_labs() -> Path:
    """The two small labs' folders (…/other-labs: tecom, cellavision); skips without BLOODCELL_TEST_DATA."""
    real_folder("other-labs", "cellavision")
    return real_folder("other-labs", "tecom").parent


def real_folder(*parts: str) -> Path:
    """BLOODCELL_TEST_DATA/<parts>, or skip the test (the variable unset, or the folder not there)."""
    root = _real_root()
    if root is None:
        pytest.skip("BLOODCELL_TEST_DATA is not set")
    if not root.joinpath(*parts).is_dir():
        pytest.skip(f"{root.joinpath(*parts)} not found")
    return root.joinpath(*parts)


@pytest.fixture(scope="session")
def idc_root() -> Path:
    """The breast histopathology (IDC) subset (…/breast-histopathology: 19 patients, 4,026 patches)."""
    return real_folder("breast-histopathology")


@pytest.fixture(scope="session")
def idc_subset(idc_root, tmp_path_factory) -> Path:
    """A few hundred real IDC patches in the IDC layout (links): every 12th patch of each patient and class."""
    dst = tmp_path_factory.mktemp("idc-subset")
    for folder in sorted(idc_root.glob("*/[01]")):
        out = dst / folder.parent.name / folder.name
        out.mkdir(parents=True)
        for f in sorted(folder.glob("*.png"))[::12]:
            (out / f.name).symlink_to(f.resolve())
    return dst


@pytest.fixture(scope="session")
def kaggle_subset(kaggle_root, tmp_path_factory) -> Path:
    """A small real Kaggle-layout subset (links to real files): a few K values per class (K is not the
    cell, so the subset holds copies of more cells than that: data.groups)."""
    src = kaggle_root / "dataset2-master" / "images"
    dst = tmp_path_factory.mktemp("kaggle-subset") / "images"
    rng = random.Random(0)
    for split, n_groups, per_group in (("TRAIN", 6, 6), ("TEST", 3, 4), ("TEST_SIMPLE", 3, 1)):
        for cls in KAGGLE_CLASSES:
            files = sorted((src / split / cls).glob("*.jpeg"))
            by_group: dict[str, list[Path]] = {}
            for f in files:
                by_group.setdefault(f.name.split("_")[1], []).append(f)
            out = dst / split / cls
            out.mkdir(parents=True)
            for g in sorted(by_group, key=int)[:n_groups]:
                for f in rng.sample(by_group[g], min(per_group, len(by_group[g]))):
                    (out / f.name).symlink_to(f.resolve())
    return dst


def write_image(path: Path, size=(40, 30), mode="RGB", color=None, seed=0) -> Path:
    """A small random image file in the given mode (format from the extension)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode == "I;16":
        arr = rng.integers(0, 65535, (h, w), dtype=np.uint16)
        Image.fromarray(arr).save(path)
        return path
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    if color is not None:  # a class colour under the noise, so classes are learnable and files differ
        arr = (arr // 4 + np.asarray(color, dtype=np.uint16) * 3 // 4).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode == "P":
        im = im.quantize(16)
    elif mode != "RGB":
        im = im.convert(mode)
    im.save(path)
    return path


def other_lab(root: Path) -> Path:
    """<root>/{ALPHA,Beta,delta}/*: ten images each, the first two classes named as class_folders' in
    another case, the third not one of them."""
    for c, cls in enumerate(("ALPHA", "Beta", "delta")):
        for i in range(10):
            write_image(root / cls / f"x{cls}_{i}.png", color=(80 * c, 90, 200 - 60 * c), seed=1000 + c * 100 + i)
    return root


@pytest.fixture
def class_folders(tmp_path) -> Path:
    """<root>/<class>/*: three classes of ten small images each, mixed extensions."""
    root = tmp_path / "cells"
    exts = [".png", ".jpg", ".JPEG", ".bmp", ".tif"]
    for c, cls in enumerate(("alpha", "beta", "gamma")):
        for i in range(10):
            write_image(root / cls / f"{cls}_{i}{exts[i % len(exts)]}", color=(80 * c, 40, 200 - 60 * c),
                        seed=c * 100 + i)
    return root


# --- training and prediction helpers shared by several test files -------------------------------

TINY = dict(data="synthetic:96", image_size=32, batch_size=16, epochs=2, model="cnn2x32", threads=1,
            precision="fp32")


def quiet(msg: str) -> None:
    """A log function that drops every line."""


def tiny(**kw) -> TrainConfig:
    """A training config that runs in seconds (synthetic data, 32 px, 2 epochs), with ``kw`` on top."""
    return make_config(TrainConfig, TINY, kw)


def png_bytes(seed: int = 0, size=(48, 36), fmt: str = "PNG") -> bytes:
    """A small random RGB image file's bytes."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def images(tmp_path) -> list[Path]:
    """Five small random image files in PNG, JPEG, BMP and TIFF."""
    out = []
    for i, fmt in enumerate(["PNG", "JPEG", "BMP", "PNG", "TIFF"]):
        p = tmp_path / "imgs" / f"cell{i}.{fmt.lower()}"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(png_bytes(i, fmt=fmt))
        out.append(p)
    return out


# --- pretrained weights in caches filled here (tests never download) -----------------------

REPO = "models--timm--tf_efficientnet_lite0.in1k"
REV = "1" * 40


def _no_download(*args, **kwargs):
    raise AssertionError("a test tried to download")


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch cache (TORCH_HOME), where any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    import torch

    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    return tmp_path / "torch"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache, offline (the hub reads its settings at import: patched)."""
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


def fill_torch_cache(name: str) -> dict:
    """A seeded random ImageNet-shaped state_dict of a baseline, at the file its weights API reads."""
    import torch
    import torchvision

    from bloodcell.models import pretrained as pre

    torch.manual_seed(1)
    builder = {"resnet18": torchvision.models.resnet18, "efficientnet_b0": torchvision.models.efficientnet_b0,
               "mobilenet_v3_small": torchvision.models.mobilenet_v3_small,
               "mobilenet_v2": torchvision.models.mobilenet_v2}[name]
    state = builder(weights=None).state_dict()
    path = pre.cache_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def fill_hf_cache(hub: Path) -> dict:
    """Random tf_efficientnet_lite0 weights where the hub keeps timm/tf_efficientnet_lite0.in1k."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(2)
    state = timm.create_model("tf_efficientnet_lite0").state_dict()
    repo = hub / REPO
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    (repo / "snapshots" / REV).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, repo / "snapshots" / REV / "model.safetensors")
    return state
# --- disks that fail: a read-only folder and a full one ------------------------------------------


def _mount_tmpfs(path: Path, options: str) -> bool:
    """Mount a tmpfs at ``path`` (root with CAP_SYS_ADMIN only); False where that is not allowed."""
    import subprocess

    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def unwritable_dir(tmp_path) -> Path:
    """A folder nothing can be written in: mode 0o500 for a normal user; for root (whom modes do not
    stop) a read-only tmpfs; skipped where neither is possible."""
    path = tmp_path / "read-only"
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o500)
        yield path
        path.chmod(0o700)
        return
    if not _mount_tmpfs(path, "ro,size=64k"):
        pytest.skip("running as root without the right to mount a read-only tmpfs")
    yield path
    _umount(path)


class SmallDisk:
    """A folder on a disk that can be filled: a real tmpfs of a few MB where this process may mount
    one (``real``), else the same folder with ENOSPC simulated in-process: once ``fill()`` is called,
    every write of a file under it (runfiles.atomic_write's file object, posix_fallocate, open for
    writing) raises OSError(ENOSPC) after ``left`` bytes, as a full disk does."""

    def __init__(self, path: Path, real: bool, monkeypatch):
        self.path, self.real, self._mp, self._filler = path, real, monkeypatch, None

    def fill(self, left: int = 16 * 1024) -> None:
        """Leave about ``left`` bytes free."""
        if self.real:
            self._filler = self.path / "filler"
            st = os.statvfs(self.path)
            with open(self._filler, "wb") as f:
                f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - left))
            return
        self._simulate(left)

    def free(self) -> None:
        """Free the space taken by fill()."""
        if self.real:
            if self._filler is not None:
                self._filler.unlink(missing_ok=True)
        else:
            self._mp.undo()

    def _simulate(self, left: int) -> None:
        import builtins
        import errno

        root = str(self.path.resolve())
        budget = [left]

        def under(p) -> bool:
            try:
                return os.path.realpath(p).startswith(root + os.sep)
            except (TypeError, ValueError):
                return False

        def enospc(p):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(p))

        class Full:
            """A file object whose writes stop when the budget is spent."""

            def __init__(self, f, name):
                self._f, self._name = f, name

            def write(self, b):
                if len(b) > budget[0]:
                    self._f.write(b[:budget[0]])
                    budget[0] = 0
                    raise enospc(self._name)
                budget[0] -= len(b)
                return self._f.write(b)

            def __getattr__(self, k):
                return getattr(self._f, k)

            def __enter__(self):
                return self

            def __exit__(self, *a):
                return self._f.__exit__(*a)

        real_fdopen, real_open, real_falloc = os.fdopen, builtins.open, os.posix_fallocate

        def fdopen(fd, *a, **k):
            f = real_fdopen(fd, *a, **k)
            name = os.readlink(f"/proc/self/fd/{fd}")
            return Full(f, name) if under(name) else f

        def open_(file, mode="r", *a, **k):
            f = real_open(file, mode, *a, **k)
            writing = any(c in mode for c in "wax+")
            return Full(f, file) if writing and isinstance(file, (str, os.PathLike)) and under(file) else f

        def fallocate(fd, offset, length):
            name = os.readlink(f"/proc/self/fd/{fd}")
            if under(name) and length > budget[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_falloc(fd, offset, length)

        self._mp.setattr(os, "fdopen", fdopen)
        self._mp.setattr(builtins, "open", open_)
        self._mp.setattr(os, "posix_fallocate", fallocate)


@pytest.fixture(params=["tmpfs", "simulated"])
def small_disk(request, tmp_path):
    """A SmallDisk of 8 MB: a real tmpfs (skipped where it cannot be mounted) and the in-process
    simulation (run everywhere)."""
    path = tmp_path / "disk"
    real = request.param == "tmpfs"
    if real and not _mount_tmpfs(path, "size=8m"):
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN): the simulated disk runs")
    path.mkdir(exist_ok=True)
    mp = pytest.MonkeyPatch()
    yield SmallDisk(path, real, mp)
    mp.undo()
    if real:
        _umount(path)


CHROMIUM = os.environ.get("BLOODCELL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """Chromium through Playwright (what a person sees); skips where Chromium or Playwright is absent."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()
