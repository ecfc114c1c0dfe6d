"""Bad input of every kind is one line and exit 2, before any work: numbers out of their range, paths
that are not files, names that are not UTF-8, sources of several classes, a data set given twice, a
resumed run given other flags, weights that fit nothing."""

from __future__ import annotations

import math
import os
import signal
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodcell.config import TrainConfig, make_config
from bloodcell.errors import BloodcellError, ConfigError, DataError

# --- numbers: every field and every numeric flag has a range -------------------------------------


def ranged_fields():
    return [f for f in fields(TrainConfig) if f.metadata.get("range") is not None]


def test_every_numeric_field_has_a_range():
    numeric = [f.name for f in fields(TrainConfig) if f.type in ("int", "float", "int | None",
                                                                 "tuple[float, float, float]")]
    assert numeric and sorted(numeric) == sorted(f.name for f in ranged_fields())


@pytest.mark.parametrize("name", [f.name for f in ranged_fields()])
def test_a_field_refuses_nan_infinity_a_bool_and_values_outside_its_range(name):
    rng = next(f.metadata["range"] for f in ranged_fields() if f.name == name)
    bad = ["nan", math.inf, -math.inf, True, "1e999"]
    if rng.lo is not None:
        bad.append(rng.lo - 1)
    if rng.hi is not None:
        bad.append(rng.hi * 10 + 1)
    for value in bad:
        value = f"{value},1,1" if name == "fractions" and not isinstance(value, bool) else value
        with pytest.raises(ConfigError, match=name) as e:
            make_config(TrainConfig, {name: value})
        assert "\n" not in str(e.value)


def test_yaml_true_is_not_one_epoch(tmp_path):
    from bloodcell.config import load_yaml

    (tmp_path / "c.yaml").write_text("epochs: true\n")
    with pytest.raises(ConfigError, match="epochs"):
        make_config(TrainConfig, load_yaml(tmp_path / "c.yaml"))


@pytest.mark.parametrize("flag, value", [
    ("--weight-decay", "nan"), ("--momentum", "nan"), ("--warmup-epochs", "nan"), ("--lr", "1e300"),
    ("--threads", "-2"), ("--clip-grad", "-1"), ("--image-size", "100000"),
])
def test_a_bad_train_number_names_its_own_flag(tmp_path, capsys, flag, value):
    from bloodcell.cli import main

    code = main(["train", "--data", "synthetic:40", "--out", str(tmp_path / "r"), flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and flag in err[0] and not (tmp_path / "r").exists(), err


@pytest.mark.parametrize("argv", [
    ["serve", "RUN", "--port", "70000"], ["serve", "RUN", "--max-upload-mb", "-5"],
    ["serve", "RUN", "--workers", "-2"], ["serve", "RUN", "--decoders", "-1"],
    ["serve", "RUN", "--threads", "100000"], ["tune", "--timeout", "-1"], ["tune", "--trials", "0"],
    ["adapt", "RUN", "--data", "x", "--out", "o", "--lr", "1e300"], ["predict", "RUN", "x.png", "--top-k", "0"],
    ["models", "--image-size", "nan"], ["data", "check", "--seed", "-1"],
])
def test_a_bad_number_of_any_command_is_argparse_s_one_error_line(capsys, argv):
    from bloodcell.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {argv[-2]}: " in err and "Traceback" not in err


def test_threads_beyond_the_machine_are_refused_saying_what_it_has():
    from bloodcell.cpu import usable_cpus
    from bloodcell.runtime import set_threads

    with pytest.raises(ConfigError, match=f"this machine runs {usable_cpus()} threads"):
        set_threads(usable_cpus() + 1)


def test_an_image_size_whose_batch_outgrows_memory_is_refused():
    from bloodcell.runtime import check_batch_memory

    with pytest.raises(ConfigError, match="--image-size 2048 with --batch-size 65536"):
        check_batch_memory(65536, 2048)
    check_batch_memory(64, 64)


def test_synthetic_n_has_a_bound():
    from bloodcell.data.layouts import discover

    with pytest.raises(DataError, match="synthetic:N takes 40 to"):
        discover("synthetic:99999999999")


# --- paths: opened as what they must be -----------------------------------------------------------


@pytest.fixture
def no_hang():
    """A test that would block for ever fails after 10 s instead."""
    def stop(*_):
        raise TimeoutError("blocked")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_a_fifo_is_an_error_row_not_a_hang(tmp_path, no_hang):
    from bloodcell.data.images import ImageError, decode_image
    from bloodcell.models.pretrained import read_state

    fifo = tmp_path / "p.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="FIFO"):
        decode_image(str(fifo), 32)
    with pytest.raises(BloodcellError, match="--weights .*FIFO"):
        read_state(fifo)


def write_cells(folder: Path, names: dict[str, list[bytes]]) -> Path:
    """Class folders of small distinct PNGs; names as bytes (they may not be UTF-8)."""
    rng = np.random.default_rng(0)
    for cls, files in names.items():
        d = os.path.join(os.fsencode(folder), cls.encode() if isinstance(cls, str) else cls)
        os.makedirs(d, exist_ok=True)
        for name in files:
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
                os.fsdecode(os.path.join(d, name)), format="PNG")
    return folder


def test_names_that_are_not_utf8_are_read_and_said_by_their_bytes(tmp_path):
    from bloodcell.cli.flags import names_as_bytes
    from bloodcell.data import load_dataset
    from bloodcell.data.check import check_data
    from bloodcell.runfiles import read_csv, write_csv

    data = write_cells(tmp_path / "d", {"A": [b"a%d.png" % i for i in range(10)] + [b"bad\xff.png"],
                                        b"B\xe9": [b"b%d.png" % i for i in range(10)]})
    report = check_data(data, cache_dir=tmp_path / "cache")
    odd = next(p for p in report["problems"] if p["kind"] == "non_utf8_names")
    assert "B\\xe9" in odd["detail"] and any(p.endswith("bad\\xff.png") for p in odd["paths"])
    ds = load_dataset(data, image_size=8, cache_dir=tmp_path / "cache")  # was a codec error
    assert sum(len(s) for s in ds.splits.values()) == 21
    path = next(p for s in ds.splits.values() for p in s.paths if "\udcff" in p)
    write_csv(tmp_path / "p.csv", [{"path": path}])
    assert read_csv(tmp_path / "p.csv") == [{"path": path}]  # the name's bytes, back as they were
    names_as_bytes()  # what a command prints: the bytes escaped, not a codec error
    assert "B\udce9".encode("utf-8", "bloodcell.bytes") == b"B\\xe9"


# --- groups: a source of several classes is one group in every split ------------------------------


def smears(tmp_path: Path) -> Path:
    return write_cells(tmp_path / "grp", {c: [f"smear{i % 4}_{c}{i}.png".encode() for i in range(12)]
                                          for c in ("A", "B")})


def test_a_smear_of_several_classes_stays_on_one_side(tmp_path):
    from bloodcell.data.layouts import discover
    from bloodcell.data.splits import make_splits

    src = discover(smears(tmp_path), group_regex=r"^(smear\d)_")
    assert len({it.group for it in src.items}) == 4
    for seed in range(5):
        side = {}
        for name, idx in make_splits(src.items, seed).items():
            for i in idx:
                assert side.setdefault(src.items[i].group, name) == name


def test_a_group_regex_that_matches_nothing_or_some_files_is_said(tmp_path):
    from bloodcell.data.layouts import discover

    data = smears(tmp_path)
    none = discover(data, group_regex=r"^(slide\d)_")
    assert any(p.kind == "group_regex_unmatched" and "matches no file name" in p.detail for p in none.problems)
    some = discover(data, group_regex=r"^(smear[01])_")
    p = next(p for p in some.problems if p.kind == "group_regex_unmatched")
    assert "12 of 24" in p.detail and len(p.paths) == 12
    with pytest.raises(DataError, match="not a regular expression"):
        discover(data, group_regex="([")
    with pytest.raises(ConfigError, match="not a regular expression"):
        TrainConfig(group_regex="([")


def test_a_class_missing_from_a_made_split_is_said_and_its_f1_not_measured(tmp_path):
    from bloodcell.data.layouts import discover
    from bloodcell.data.splits import lacking_classes, make_splits
    from bloodcell.metrics import compute_metrics

    src = discover(write_cells(tmp_path / "d", {"A": [b"a%d.png" % i for i in range(12)], "B": [b"b.png"]}))
    p = lacking_classes(src.items, make_splits(src.items, 0), src.classes)
    assert p is not None and p.paths == ["B"] and "val" in p.detail and "test" in p.detail
    m = compute_metrics(np.zeros(4, int), np.tile([0.9, 0.1], (4, 1)), ["A", "B"], n_boot=0)
    assert m["macro_f1"] == 1.0 and m["f1_positive"] is None


# --- one data set twice; resume with other flags; weights that fit nothing; a folder in use -------


def test_one_folder_under_two_spellings_is_given_twice(tmp_path):
    (tmp_path / "small").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "small")
    for other in (str(tmp_path / "small") + "/", str(tmp_path) + "/./small", str(tmp_path / "link")):
        with pytest.raises(ConfigError, match="same data set"):
            TrainConfig(data=(str(tmp_path / "small"), other))


def test_resume_refuses_flags_that_differ_from_the_run(tmp_path):
    from bloodcell.cli import build_parser
    from bloodcell.cli.train import check_resume_flags
    from bloodcell.runfiles import write_yaml

    write_yaml(tmp_path / "config.yaml", TrainConfig(epochs=1).to_dict())
    args = build_parser().parse_args(["train", "--resume", str(tmp_path), "--epochs", "2", "--lr", "5"])
    with pytest.raises(ConfigError, match=r"--epochs 2 \(the run's 1\), --lr 5.0 \(the run's 0.002\)"):
        check_resume_flags(args)
    check_resume_flags(build_parser().parse_args(["train", "--resume", str(tmp_path), "--epochs", "1"]))


def test_weights_that_are_not_weights_or_fit_nothing_are_errors(tmp_path):
    import torch

    from bloodcell.models import get_model, load_weights

    model = get_model("cnn2x32", num_classes=2, image_size=32)
    (tmp_path / "fake.pt").write_text("not a checkpoint")
    with pytest.raises(BloodcellError, match="not a readable weights file"):
        load_weights(model, tmp_path / "fake.pt")
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(BloodcellError, match="fits a layer"):
        load_weights(model, tmp_path / "other.pt")


def test_a_folder_another_training_writes_is_in_use_not_a_case_for_overwrite(tmp_path):
    from conftest import tiny

    from bloodcell.runfiles import run_lock
    from bloodcell.training.train import train

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("epochs: 1\n")
    with run_lock(out, "training"), pytest.raises(BloodcellError, match="in use by another bloodcell training"):
        train(tiny(epochs=1), out, progress=False)


def test_a_fifo_given_as_a_model_is_one_line_not_a_hang(tmp_path, capsys):
    import os

    from bloodcell.cli import main

    os.mkfifo(tmp_path / "model.pt")
    assert main(["predict", str(tmp_path / "model.pt"), str(tmp_path / "x.jpg")]) == 2
    assert "not a regular file" in capsys.readouterr().err


def test_a_closed_pipe_is_no_error(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(f"{sys.executable} -m bloodcell models | head -1", shell=True, capture_output=True,
                       text=True, timeout=120)
    assert r.stdout.startswith("name") and "error" not in r.stderr.lower()
