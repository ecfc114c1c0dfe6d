"""The runtime: device, precision, threads, SIGINT and SIGTERM between batches, worker processes
that end with their parent, and the facts of this machine.

Nothing here is chosen by a config alone: ``auto`` resolves to what the hardware offers, and every
run folder records what it resolved to.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import os
import platform
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision

from bloodcell import __version__
from bloodcell.cpu import check_threads, physical_cores  # noqa: F401 - re-exported
from bloodcell.errors import BloodcellError, ConfigError
from bloodcell.runfiles import read_json, write_json


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


def user_cache_dir() -> Path:
    """The user's cache folder: $BLOODCELL_CACHE, else $XDG_CACHE_HOME/bloodcell, else ~/.cache/bloodcell."""
    if os.environ.get("BLOODCELL_CACHE"):
        return Path(os.environ["BLOODCELL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bloodcell"


BF16_GAIN = 1.1  # auto trains in bf16 where its measured step is at least this much faster than fp32


def time_train_step(model: torch.nn.Module, shape: tuple[int, ...], precision: str, steps: int = 3) -> float:
    """Seconds of the best of ``steps`` forward + backward passes of a copy of ``model`` on a random
    channels-last batch of ``shape`` (after one untimed pass), in ``precision``, on the CPU."""
    net = copy.deepcopy(model).cpu().train().to(memory_format=torch.channels_last)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    best = float("inf")
    for i in range(steps + 1):
        t = time.perf_counter()
        with autocast(torch.device("cpu"), precision):
            out = net(x)
        out.float().sum().backward()
        if i:
            best = min(best, time.perf_counter() - t)
    return best


def measured_train_precision(model: torch.nn.Module, shape: tuple[int, ...], log=None) -> str:
    """bf16 or fp32 for training ``model`` on batches of ``shape`` on this CPU: whichever step
    measures faster (bf16 only at ``BF16_GAIN`` or more), timed once per CPU, torch, thread count,
    model and shape and remembered in the user's cache (``precision.json``)."""
    key = "|".join(map(str, (cpuinfo("model name") or platform.processor(), torch.__version__,
                             torch.get_num_threads(), type(model).__name__,
                             sum(p.numel() for p in model.parameters()), "x".join(map(str, shape)))))
    path = user_cache_dir() / "precision.json"
    try:
        known = read_json(path)
    except (OSError, ValueError):
        known = None
    known = known if isinstance(known, dict) else {}
    seconds = known.get(key)
    if not isinstance(seconds, dict):
        seconds = known[key] = {p: time_train_step(model, shape, p) for p in ("fp32", "bf16")}
        try:  # a cache that cannot be written only means measuring again next time
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, known)
        except OSError:
            pass
    choice = "bf16" if seconds["fp32"] >= BF16_GAIN * seconds["bf16"] else "fp32"
    if log:
        log(f"precision auto: a training step measured {1000 * seconds['fp32']:.0f} ms in fp32, "
            f"{1000 * seconds['bf16']:.0f} ms in bf16 on this CPU: {choice}")
    return choice


def resolve_precision(precision: str, device: torch.device, train: torch.nn.Module | None = None,
                      shape: tuple[int, ...] | None = None, log=None) -> str:
    """auto -> bf16 where the hardware supports it natively, else fp32. Given the model to be
    trained and its batch shape, on a CPU with native bf16 but no AMX (AVX-512 BF16), auto measures
    a training step in both and takes the faster (measured there, 2 threads: the study's models and
    ResNet-18 train 1.5-2.3x faster in bf16, MobileNetV3-Small 0.51x, EfficientNet-B0 1.04x;
    ``bench/precision_speed.py``); without the shape, the depthwise models train in fp32 there. With
    AMX, bf16; scoring is faster in bf16 for every model measured (1.2-2.5x)."""
    if precision == "auto":
        if not bf16_supported(device):
            return "fp32"
        if train is None or device.type != "cpu" or cpu_has_amx():
            return "bf16"
        if shape is not None:
            return measured_train_precision(train, shape, log)
        return "fp32" if depthwise(train) else "bf16"
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
