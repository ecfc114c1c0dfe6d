"""runtime: Ctrl-C between batches (and the rest of device, precision and threads)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from conftest import quiet, tiny

from bloodcell import runtime
from bloodcell.models import get_model
from bloodcell.models.checkpoint import read_checkpoint
from bloodcell.runtime import check_stop, depthwise, resolve_precision, stop_between_batches
from bloodcell.training.train import train


def test_ctrl_c_stops_at_the_next_batch_not_where_it_lands(tmp_path, terminal_sigint):
    """Under stop_between_batches the first SIGINT lets the code it lands in run to its end (a
    tuner's database write, say) and training stops at the next batch; a second one stops at once."""
    ran = []

    def bookkeeping(epoch, row):
        os.kill(os.getpid(), signal.SIGINT)  # lands here, in the middle of the caller's work
        ran.append(epoch)  # which still runs to its end

    with pytest.raises(KeyboardInterrupt), stop_between_batches():
        train(tiny(epochs=3), tmp_path / "r", log=quiet, progress=False, on_epoch=bookkeeping)
    assert ran == [1]  # stopped in epoch 2, before it finished
    assert read_checkpoint(tmp_path / "r" / "last.pt")["epoch"] == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back

    with pytest.raises(KeyboardInterrupt), stop_between_batches():
        os.kill(os.getpid(), signal.SIGINT)
        ran.append("first")
        os.kill(os.getpid(), signal.SIGINT)
        ran.append("second")
    assert ran == [1, "first"]
    with pytest.raises(KeyboardInterrupt), stop_between_batches():  # pending at the end: raised there
        os.kill(os.getpid(), signal.SIGINT)
    with stop_between_batches():  # a new block starts with no request pending
        check_stop()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job: SIGINT stays ignored
    try:
        with stop_between_batches():
            os.kill(os.getpid(), signal.SIGINT)
            check_stop()
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.parametrize("name,expected", [("cnn4x32", False), ("resnet18", False),
                                           ("mobilenet_v3_small", True), ("efficientnet_b0", True),
                                           ("mobilenet_v2", True)])
def test_depthwise_models_are_told_apart(name, expected) -> None:
    assert depthwise(get_model(name, 4, image_size=64)) is expected


@pytest.mark.parametrize("amx", [False, True])
def test_auto_precision_is_fp32_for_a_depthwise_model_on_a_cpu_without_amx(monkeypatch, amx) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: True)
    monkeypatch.setattr(runtime, "cpu_has_amx", lambda: amx)
    mobile, plain = get_model("mobilenet_v3_small", 4), get_model("cnn4x32", 4)
    assert resolve_precision("auto", cpu, plain) == "bf16"
    assert resolve_precision("auto", cpu, mobile) == ("bf16" if amx else "fp32")
    assert resolve_precision("auto", cpu) == "bf16"  # no model given: the hardware alone
    assert resolve_precision("bf16", cpu, mobile) == "bf16"  # asked for: given
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: False)
    assert resolve_precision("auto", cpu, plain) == "fp32"


def test_a_run_records_and_says_the_precision_auto_measured(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: True)
    monkeypatch.setattr(runtime, "cpu_has_amx", lambda: False)
    monkeypatch.setenv("BLOODCELL_CACHE", str(tmp_path / "cache"))
    timed = []
    monkeypatch.setattr(runtime, "time_train_step",
                        lambda model, shape, precision: timed.append(precision) or {"fp32": 0.010, "bf16": 0.020}[precision])
    lines: list[str] = []
    m = train(tiny(model="cnn2x32", epochs=1, threads=1, precision="auto"), tmp_path / "r", log=lines.append,
              progress=False)
    assert m["run"]["precision"] == "fp32" and timed == ["fp32", "bf16"]
    assert any("measured 10 ms in fp32, 20 ms in bf16 on this CPU: fp32" in s for s in lines)
    assert any(s.startswith("model: cnn2x32") and "fp32 (auto: bf16 measured no faster" in s for s in lines)
    # remembered: the same model and batch on this CPU are not timed again
    train(tiny(model="cnn2x32", epochs=1, threads=1, precision="auto"), tmp_path / "r2", log=lambda _: None,
          progress=False)
    assert timed == ["fp32", "bf16"]
    # a cache that is not JSON is measured again and written whole
    (tmp_path / "cache" / "precision.json").write_text("{not json")
    model = get_model("cnn2x32", 4, image_size=32)
    assert runtime.measured_train_precision(model, (8, 3, 32, 32)) == "fp32"
    assert timed[-2:] == ["fp32", "bf16"] and json.loads((tmp_path / "cache" / "precision.json").read_text())


def test_a_training_step_is_timed_in_each_precision() -> None:
    model = get_model("cnn2x32", 4, image_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for precision in ("fp32", "bf16"):
        assert 0 < runtime.time_train_step(model, (4, 3, 32, 32), precision, steps=1) < 10
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy was timed
