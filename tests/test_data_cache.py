"""data.cache: the decoded-image cache, its keys and its atomic build."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import write_image

from bloodcell.data.cache import build_cache
from bloodcell.data.images import load_image
from bloodcell.data.layouts import discover


def test_cache_hit_miss_and_invalidation(class_folders, tmp_path):
    cache = tmp_path / "c"
    items = discover(class_folders).items
    _, errors, cached = build_cache(items, 16, cache_dir=cache)
    assert not cached and not any(errors)
    _, _, cached = build_cache(discover(class_folders).items, 16, cache_dir=cache)
    assert cached  # second run decodes nothing
    _, _, cached = build_cache(discover(class_folders).items, 24, cache_dir=cache)
    assert not cached  # another size is another cache
    target = class_folders / "alpha" / "alpha_0.png"
    write_image(target, seed=777)
    os.utime(target, ns=(1, 1))
    _, _, cached = build_cache(discover(class_folders).items, 16, cache_dir=cache)
    assert not cached  # a changed file
    write_image(class_folders / "beta" / "new.png", seed=778)
    _, _, cached = build_cache(discover(class_folders).items, 16, cache_dir=cache)
    assert not cached  # an added file
    (class_folders / "beta" / "new.png").unlink()
    (class_folders / "gamma" / "gamma_3.bmp").unlink()
    _, _, cached = build_cache(discover(class_folders).items, 16, cache_dir=cache)
    assert not cached  # a removed file


def test_interrupted_cache_build_leaves_no_cache(class_folders, tmp_path, monkeypatch):
    from bloodcell.data import cache as cache_mod

    cache = tmp_path / "c"
    items = discover(class_folders).items

    def boom(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "_decode_chunk", boom)
    with pytest.raises(KeyboardInterrupt):
        build_cache(items, 16, cache_dir=cache)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    _, errors, cached = build_cache(items, 16, cache_dir=cache)
    assert not cached and not any(errors)


def test_cached_images_equal_fresh_decode(class_folders, tmp_path):
    items = discover(class_folders).items
    arr, _, _ = build_cache(items, 20, cache_dir=tmp_path / "c", workers=2)
    for k in (0, 7, 29):
        assert np.array_equal(arr[k], load_image(items[k].path, 20))


def test_a_killed_builds_temporary_is_removed_by_the_next_build(class_folders, tmp_path):
    """A SIGKILLed build leaves its temporary (as big as the cache); the next build of that key
    removes those of dead processes, and keeps a live builder's."""
    import subprocess
    import sys

    from bloodcell.data.cache import fingerprint

    cache = tmp_path / "c"
    cache.mkdir()
    items = discover(class_folders).items
    key = fingerprint(items, 16, "squash")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = cache / f".{key}.{gone.pid}.x1y2.npy"
    live = cache / f".{key}.{os.getppid()}.x1y2.npy"
    for p in (dead, live):
        p.write_bytes(b"\0" * 4096)
    build_cache(items, 16, cache_dir=cache)
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted([live.name, f"{key}.npy", f"{key}.json"])
