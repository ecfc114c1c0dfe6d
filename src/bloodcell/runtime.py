"""The runtime: device, precision, threads, Ctrl-C between batches, and the facts of this machine.

Nothing here is chosen by a config alone: ``auto`` resolves to what the hardware offers, and every
run folder records what it resolved to.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import threading

import numpy as np
import torch
import torchvision

from bloodcell import __version__
from bloodcell.errors import BloodcellError


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads do not help convolution)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        cpus = set(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/core_id") as f:
                core = f.read().strip()
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/physical_package_id") as f:
                pkg = f.read().strip()
            cores.add((pkg, core))
        except OSError:
            cores.add(("?", c))
    return max(1, len(cores))


def resolve_device(device: str) -> torch.device:
    """auto -> cuda if available, else cpu; asking for cuda without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BloodcellError("--device cuda asked for, but no CUDA GPU is available")
    return torch.device(device)


def bf16_supported(device: torch.device) -> bool:
    """True where bf16 autocast runs natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 where the hardware supports it natively, else fp32."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "bf16" and not bf16_supported(device):
        raise BloodcellError(f"--precision bf16 is not supported on this {device.type} "
                             "(no native bf16); use --precision fp32")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for a precision ('fp32' gives a no-op context)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_threads(threads: int) -> int:
    """Use the physical cores (or the number given); returns the number set."""
    n = threads if threads > 0 else physical_cores()
    torch.set_num_threads(n)
    return n


# ---------------------------------------------------------------------------------------------
# Ctrl-C between batches

_stop = threading.Event()


@contextlib.contextmanager
def stop_between_batches():
    """Make the first Ctrl-C (SIGINT) a request to stop that the training and scoring loops honour
    at their next batch, raising KeyboardInterrupt there instead of wherever the signal lands (in
    the middle of a tuner's database write, say). A second Ctrl-C interrupts at once.

    Does nothing off the main thread or where SIGINT is ignored (a background job); a request
    still pending when the block ends is raised there.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield
        return

    def request(signum, frame) -> None:
        if _stop.is_set():
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        _stop.set()
        os.write(2, b"\nbloodcell: stopping at the next batch (Ctrl-C again to stop at once)\n")

    _stop.clear()
    signal.signal(signal.SIGINT, request)
    try:
        yield
        check_stop()
    finally:
        signal.signal(signal.SIGINT, previous)
        _stop.clear()


def check_stop() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C came in under stop_between_batches()."""
    if _stop.is_set():
        raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------
# environment


def environment(device: str, precision: str, threads: int) -> dict:
    """Software versions and machine, for the report's protocol section."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "bloodcell": __version__,
            "platform": platform.platform(), "cpu": cpu, "cores": physical_cores(), "threads": threads,
            "device": device, "precision": precision}
