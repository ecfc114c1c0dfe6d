"""CPU facts that need no torch (the lean ONNX server reads them too): physical_cores, usable_cpus;
ort_options, the ONNX Runtime settings (threads, no spinning) that every use of it in bloodcell shares."""

from __future__ import annotations

import os


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


def usable_cpus() -> int:
    """The logical CPUs this process may run on: the most threads that can run at once."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def check_threads(threads: int, flag: str = "--threads") -> int:
    """``threads`` where this machine can run that many at once (0: the physical cores); more is a
    ValueError naming ``flag`` and what the machine has, rather than a thread pool that starves."""
    n = usable_cpus()
    if not 0 <= threads <= n:
        raise ValueError(f"{flag} must be in [0, {n}]: this machine runs {n} threads at once "
                         f"(0: its {physical_cores()} physical cores); got {threads}")
    return threads


def ort_options(threads: int):
    """ONNX Runtime session options on the CPU: ``threads`` intra-op threads that sleep when idle."""
    import onnxruntime as ort  # lazy: only a caller that runs ONNX Runtime needs it

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Idle ORT threads spin by default, taking the cores from decoding, HTTP and PyTorch; on a busy
    # or shared CPU that costs more than it saves.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts
