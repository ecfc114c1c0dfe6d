"""The runtime: device, precision, threads, SIGINT and SIGTERM between batches, worker processes
that end with their parent, and the facts of this machine.

Nothing here is chosen by a config alone: ``auto`` resolves to what the hardware offers, and every
run folder records what it resolved to.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torchvision

from bloodcell import __version__
from bloodcell.cpu import check_threads, physical_cores  # noqa: F401 - re-exported
from bloodcell.errors import BloodcellError, ConfigError


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


def cpuinfo(key: str) -> str | None:
    """The first value of ``key`` in Linux's /proc/cpuinfo ("model name", "flags"); None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_has_amx() -> bool:
    """True where the CPU has AMX tiles for bf16 (Linux's cpuinfo flag ``amx_bf16``)."""
    return "amx_bf16" in (cpuinfo("flags") or "").split()


def depthwise(model: torch.nn.Module) -> bool:
    """True for a model with depthwise convolutions (one filter per input channel)."""
    return any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
               for m in model.modules())


def resolve_precision(precision: str, device: torch.device, train: torch.nn.Module | None = None) -> str:
    """auto -> bf16 where the hardware supports it natively, else fp32; given the model to be
    trained, also fp32 for a depthwise one on a CPU without AMX, where a bf16 training step is not
    faster (measured on AVX-512 BF16 without AMX, 2 threads: MobileNetV3-Small 0.51x of fp32,
    EfficientNet-B0 1.04x, while the study's models and ResNet-18 train 1.5-2.3x faster in bf16;
    scoring is faster in bf16 for all of them, 1.2-2.5x; ``bench/precision_speed.py``)."""
    if precision == "auto":
        if not bf16_supported(device):
            return "fp32"
        if train is not None and device.type == "cpu" and depthwise(train) and not cpu_has_amx():
            return "fp32"
        return "bf16"
    if precision == "bf16" and not bf16_supported(device):
        raise BloodcellError(f"--precision bf16 is not supported on this {device.type} "
                             "(no native bf16); use --precision fp32")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for a precision ('fp32' gives a no-op context)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_threads(threads: int, share: int = 1) -> int:
    """Use the physical cores (or the number given), split among ``share`` processes of one run on
    this machine; returns the number set."""
    try:  # a config made on a larger machine (a tune study's, a resumed run's) is refused here
        check_threads(threads)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    n = threads if threads > 0 else max(1, physical_cores() // max(share, 1))
    torch.set_num_threads(n)
    return n


def memory_bytes() -> int:
    """The machine's physical memory in bytes (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def check_batch_memory(batch_size: int, image_size: int) -> None:
    """Refuse, before any data is read, an image size whose training batch alone (float32 images,
    and their augmented copy) needs more memory than the machine has: a ConfigError naming both
    flags, instead of a cache that fills the disk or a process the OS kills."""
    need, have = 2 * batch_size * 3 * image_size ** 2 * 4, memory_bytes()
    if have and need > have:
        raise ConfigError(f"--image-size {image_size} with --batch-size {batch_size}: one training batch needs "
                          f"{need / 1e9:.1f} GB, more than this machine's {have / 1e9:.1f} GB of memory; "
                          "lower either")


# ---------------------------------------------------------------------------------------------
# SIGINT and SIGTERM between batches

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal: SIGINT (Ctrl-C) or SIGTERM (a scheduler's time limit, a
    container's shutdown, ``kill PID``). A KeyboardInterrupt, so every handler of Ctrl-C handles it."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


_stop = threading.Event()
_stop_signal = [int(signal.SIGINT)]  # which signal asked, for the message and the exit code
_active: list[bool] = []  # non-empty inside a stop_between_batches block


def pid_alive(pid: int) -> bool:
    """Whether a process of this id exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exit_code(e: BaseException) -> int:
    """The exit code for a KeyboardInterrupt: 128 + its signal (a plain one is SIGINT's, 130)."""
    return e.exit_code if isinstance(e, Interrupted) else 128 + signal.SIGINT


def stopped_by(e: KeyboardInterrupt) -> str:
    """'interrupted' for Ctrl-C, 'stopped by SIGTERM' for SIGTERM: the start of a closing line."""
    signum = getattr(e, "signum", signal.SIGINT)
    return "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


@contextlib.contextmanager
def stop_between_batches():
    """Make the first SIGINT or SIGTERM a request to stop that the training and scoring loops (and
    the cache build, between chunks) honour at their next batch, raising ``Interrupted`` there
    instead of wherever the signal lands (in the middle of a tuner's database write, say). A second
    signal of either kind interrupts at once.

    Does nothing off the main thread or inside another such block (the outer one keeps its
    requests); a signal that is ignored here (SIGINT in a background job) stays ignored. A request
    still pending when the block ends is raised there.
    """
    if threading.current_thread() is not threading.main_thread() or _active:
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    taken = [s for s, h in previous.items() if h not in (signal.SIG_IGN, None)]

    def put_back() -> None:
        for s in taken:
            signal.signal(s, previous[s])

    def request(signum, frame) -> None:
        if _stop.is_set():
            put_back()
            raise Interrupted(signum)
        _stop_signal[0] = int(signum)
        _stop.set()
        again = "Ctrl-C again" if signum == signal.SIGINT else "a second signal"
        name = "" if signum == signal.SIGINT else f"{signal.Signals(signum).name}: "
        if os.environ.get("RANK", "0") == "0" and not os.environ.get("BLOODCELL_NPROC_PARENT"):
            # once per run: rank 0 of several processes says it, the --nproc parent reports the end
            os.write(2, f"\nbloodcell: {name}stopping at the next batch ({again} to stop at once)\n".encode())

    _stop.clear()
    for s in taken:
        signal.signal(s, request)
    _active.append(True)
    try:
        yield
        check_stop()
    finally:
        _active.pop()
        put_back()
        _stop.clear()


def check_stop() -> None:
    """Raise ``Interrupted`` if a SIGINT or SIGTERM came in under stop_between_batches()."""
    if _stop.is_set():
        raise Interrupted(_stop_signal[0])


def stop_requested() -> int:
    """The signal whose stop request is pending under stop_between_batches(), else 0."""
    return _stop_signal[0] if _stop.is_set() else 0


def worker_init() -> None:
    """The start of every worker process bloodcell starts (cache builders): it ends with its parent.

    The parent's SIGINT and SIGTERM handlers are not the worker's: a Ctrl-C in the terminal reaches
    the whole process group, and the parent stops its workers itself between chunks, so the worker
    ignores SIGINT; SIGTERM ends it. Where Linux allows, the kernel sends it SIGTERM when its
    parent dies, SIGKILL included, so no worker outlives a killed run.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):  # not Linux: poll for the parent instead
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def worker_map(fn: Callable, jobs: Iterable, workers: int, chunksize: int = 1) -> Iterator:
    """``fn`` over ``jobs`` in ``workers`` processes (each started with worker_init), the results
    in order. A stop request (check_stop) is honoured between results; however the loop ends, the
    jobs not yet started are cancelled and the workers end before this returns or raises."""
    pool = ProcessPoolExecutor(workers, initializer=worker_init)
    try:
        for result in pool.map(fn, jobs, chunksize=chunksize):
            yield result
            check_stop()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


# ---------------------------------------------------------------------------------------------
# environment


def environment(device: str, precision: str, threads: int) -> dict:
    """Software versions and machine, for the report's protocol section."""
    cpu = cpuinfo("model name") or platform.processor() or platform.machine()
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "bloodcell": __version__,
            "platform": platform.platform(), "cpu": cpu, "cores": physical_cores(), "threads": threads,
            "device": device, "precision": precision}
