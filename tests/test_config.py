"""config: frozen dataclasses, unknown keys rejected, values coerced and checked."""

from __future__ import annotations

import pytest

from bloodcell.cli import main
from bloodcell.config import TrainConfig, make_config
from bloodcell.errors import ConfigError


def test_unknown_config_key_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'epoch'"):
        make_config(TrainConfig, {"epoch": 3})
    (tmp_path / "c.yaml").write_text("image_size: 48\nbogus: 1\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")]) == 2


def test_tune_settings_identity_leaves_out_what_may_differ_between_workers() -> None:
    from bloodcell.config import TuneSettings

    a = TuneSettings(trials=10, base={"epochs": 3, "threads": 1, "cache_dir": "/a"})
    b = TuneSettings(trials=40, timeout_min=5.0, base={"epochs": 3, "threads": 8, "cache_dir": "/b"})
    assert a.identity() == b.identity()
    assert a.identity() != TuneSettings(base={"epochs": 4}).identity()
    assert a.study_name() == "bloodcell-cnn4x32"


def test_coerce_names_the_key_it_cannot_read() -> None:
    from bloodcell.config import coerce

    assert coerce("fractions", tuple[float, float, float], "0.6,0.2,0.2") == (0.6, 0.2, 0.2)
    assert coerce("cache_dir", str | None, "none") is None
    with pytest.raises(ConfigError, match="epochs must be int"):
        coerce("epochs", int, "1.5")
