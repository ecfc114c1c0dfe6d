"""runtime: Ctrl-C between batches (and the rest of device, precision and threads)."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import quiet, tiny

from bloodcell.checkpoint import read_checkpoint
from bloodcell.runtime import check_stop, stop_between_batches
from bloodcell.train import train


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
