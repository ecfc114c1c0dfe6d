"""evaluate_checkpoint: another data set's classes, memory-mapped splits, several splits in one call."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import TINY, quiet, tiny

from bloodcell.cli import main
from bloodcell.training.train import train


def test_evaluate_other_class_set_is_an_error(tmp_path, class_folders, capsys):
    train(tiny(epochs=1), tmp_path / "r", log=quiet, progress=False)
    code = main(["evaluate", str(tmp_path / "r"), "--data", str(class_folders)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "no class of the data" in err[-1]
    # a class map makes them comparable
    code = main(["evaluate", str(tmp_path / "r"), "--data", str(class_folders), "--json",
                 "--class-map", "alpha=eosinophil,beta=lymphocyte,gamma=monocyte"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["all"]["n"] == 30
    assert len(res["all"]["confusion"]) == 4  # the model's four classes
    # --restrict scores only the classes the data has: three columns, renormalised
    code = main(["evaluate", str(tmp_path / "r"), "--data", str(class_folders), "--json", "--restrict",
                 "--class-map", "alpha=eosinophil,beta=lymphocyte,gamma=monocyte"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and len(res["all"]["confusion"]) == 3 and set(res["all"]["per_class"]) == {
        "eosinophil", "lymphocyte", "monocyte"}
    # a file that is not an image is skipped, and said so in one line; the rest is still scored
    (class_folders / "alpha" / "broken.png").write_bytes(b"not an image")
    code = main(["evaluate", str(tmp_path / "r"), "--data", str(class_folders), "--json",
                 "--class-map", "alpha=eosinophil,beta=lymphocyte,gamma=monocyte"])
    out = capsys.readouterr()
    assert code == 0 and json.loads(out.out)["all"]["n"] == 30
    assert "data: 1 file(s) could not be decoded and were skipped" in out.err


class CountingRows:
    """A split's images (or the memory map under them) that append the number of rows each read
    gives to ``read``; a copy of the whole counts as reading every row."""

    def __init__(self, a, read: list):
        self.a, self.read, self.shape, self.dtype = a, read, a.shape, a.dtype

    def __len__(self):
        return len(self.a)

    def __getitem__(self, k):
        out = self.a[k]
        self.read.append(len(out))
        return out

    def __array__(self, dtype=None, copy=None):
        self.read.append(len(self.a))
        return self.a


def test_evaluate_leaving_classes_out_reads_kept_images_from_the_memory_map(tmp_path, class_folders,
                                                                             monkeypatch):
    """A class map that leaves a class out keeps a memory-mapped split's other images as a view: each
    kept image is read from the map once, by the batch that scores it (the old code copied them into
    RAM first); a split already in RAM is copied, so its left-out images can be freed."""
    from bloodcell.data.dataset import _Rows
    from bloodcell.training import evaluate as ev

    train(tiny(epochs=1), tmp_path / "r", log=quiet, progress=False)
    cmap = "alpha=eosinophil,beta=lymphocyte"
    plain = ev.evaluate_checkpoint(tmp_path / "r", str(class_folders), class_map=cmap, log=quiet)["all"]

    loading, batches, read, scored, mapped = ev.load_sources, ev.BatchLoader, [], [], []

    def counting(*a, **k):
        ds = loading(*a, **k)
        for s in ds.splits.values():
            if isinstance(s.images, _Rows):
                s.images.base = CountingRows(s.images.base, read)
                mapped.append(s.labels)
        return ds

    monkeypatch.setattr(ev, "load_sources", counting)
    monkeypatch.setattr(ev, "BatchLoader", lambda split, *a, **k: scored.append((sum(read), split)) or
                        batches(split, *a, **k))
    logged = []
    counted = ev.evaluate_checkpoint(tmp_path / "r", str(class_folders), class_map=cmap, log=logged.append)["all"]
    assert counted == plain and counted["n"] == 20  # gamma's ten images left out
    assert logged == ["left out classes the model does not know: gamma"]
    assert len(mapped) == 1  # the 70 % train split is the one the loader maps rather than copies
    kept = int(np.isin(mapped[0], [0, 1]).sum())  # its images of alpha and beta
    lazy = [split for _, split in scored if isinstance(split.images, _Rows)]
    assert len(lazy) == 1 and len(lazy[0].labels) == kept
    assert all(r == 0 for r, split in scored if split is lazy[0])  # nothing read ahead of its scoring
    assert sum(read) == kept  # each kept image read once, by the batch that scores it
    assert all(isinstance(split.images, np.ndarray) for _, split in scored if split is not lazy[0])


def test_evaluate_several_splits_in_one_call(tmp_path, capsys, monkeypatch):
    """--split val,test,all: one load, each image scored once, the same figures as one split per call."""
    from bloodcell.training import evaluate as ev

    evaluate_checkpoint = ev.evaluate_checkpoint
    train(tiny(epochs=1), tmp_path / "r", log=quiet, progress=False)
    data = TINY["data"]
    seen = []
    scoring = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: seen.append(len(a[1].labels)) or scoring(*a, **k))
    both = evaluate_checkpoint(tmp_path / "r", data, split="val,test,all", log=quiet)
    assert list(both) == ["val", "test", "all"]
    assert sum(seen) == both["all"]["n"]  # "all" reuses the val and test scores
    monkeypatch.setattr(ev, "evaluate", scoring)
    for name in both:
        one = evaluate_checkpoint(tmp_path / "r", data, split=name, log=quiet)[name]
        assert one["accuracy"] == both[name]["accuracy"] and one["n"] == both[name]["n"]
    assert both["all"]["n"] > both["val"]["n"] + both["test"]["n"]

    loading = ev.load_sources

    def counting(*a, **k):
        ds = loading(*a, **k)
        ds.splits = {n: dataclasses.replace(s, images=CountingRows(s.images, read))
                     for n, s in ds.splits.items()}
        return ds

    read, sources = [], []
    batches = ev.BatchLoader
    monkeypatch.setattr(ev, "load_sources", counting)
    monkeypatch.setattr(ev, "BatchLoader", lambda split, *a, **k: sources.append(split.images) or
                        batches(split, *a, **k))
    assert evaluate_checkpoint(tmp_path / "r", data, split="all", log=quiet)["all"] == both["all"]
    assert sources and all(isinstance(s, CountingRows) for s in sources)  # scored from the memory map, not a copy
    assert sum(read) == both["all"]["n"]  # each image read once
    code = main(["evaluate", str(tmp_path / "r"), "--data", data, "--split", "val,nope",
                 "--out", str(tmp_path / "e")])
    assert code == 2 and "split 'nope' not in the data" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()  # refused before scoring or writing anything
    code = main(["evaluate", str(tmp_path / "r"), "--data", data, "--split", ","])
    assert code == 2 and "not in the data" in capsys.readouterr().err


def test_evaluate_joined_splits_score_as_one(tmp_path, capsys):
    """--split train+val: the two splits pooled (what tune --select lab-out scores a left-out lab on)."""
    from bloodcell.training.evaluate import evaluate_checkpoint

    train(tiny(epochs=1), tmp_path / "r", log=quiet, progress=False)
    data = TINY["data"]
    res = evaluate_checkpoint(tmp_path / "r", data, split="train,val,train+val,all", log=quiet)
    joined, tr, va = res["train+val"], res["train"], res["val"]
    assert joined["n"] == tr["n"] + va["n"] < res["all"]["n"]
    assert joined["accuracy"] == pytest.approx((tr["accuracy"] * tr["n"] + va["accuracy"] * va["n"])
                                               / joined["n"])
    code = main(["evaluate", str(tmp_path / "r"), "--data", data, "--split", "train+nope"])
    assert code == 2 and "split 'nope' not in the data" in capsys.readouterr().err
