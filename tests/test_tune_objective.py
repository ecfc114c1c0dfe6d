"""One trial's data: loaded once per image size, decoded once for all the processes of a study."""

from __future__ import annotations

import collections

import pytest

optuna = pytest.importorskip("optuna")

from test_tune_study import TINY, finished_trials  # noqa: E402

from bloodcell.tune import tune  # noqa: E402


@pytest.mark.slow
def test_no_image_is_decoded_twice(class_folders, tmp_path, monkeypatch):
    import bloodcell.data.cache as cache

    decoded = collections.Counter()
    real = cache.load_image

    def counting(path, size, resize="squash"):
        decoded[path, size] += 1
        return real(path, size, resize)

    monkeypatch.setattr(cache, "load_image", counting)
    out = tmp_path / "t"
    space = {**TINY, "image_size": {"choices": [32, 40]}, "epochs": 1}
    kw = {"space": space, "base": {"threads": 1}, "sampler_seed": 1, "report": False, "log": lambda m: None}
    tune(str(class_folders), "cnn4x32", 2, out, **kw)
    tune(str(class_folders), "cnn4x32", 4, out, **kw)  # a second run: a fresh process's view
    images = len(list(class_folders.rglob("*.*")))
    sizes = {size for _, size in decoded}
    assert len(finished_trials(f"sqlite:///{out}/study.db", "bloodcell-cnn4x32")) == 4
    assert max(decoded.values()) == 1 and len(decoded) == images * len(sizes)
