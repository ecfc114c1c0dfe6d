"""Training on several processes with torch.distributed: the world torchrun describes, each rank's
shard, whole-split predictions gathered without duplicates, batch-norm statistics averaged, stop
requests agreed (``--nproc N``, torch's own elastic launcher, is ``bloodcell.training.launch``).

torchrun (or a scheduler) sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; without them a run is one process and nothing here does anything. Every collective
below is called by every rank in the same order: that is the contract train() keeps.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from bloodcell.errors import BloodcellError
from bloodcell.runtime import Interrupted, stop_requested

PARENT_ENV = "BLOODCELL_NPROC_PARENT"  # set by launch() for its workers: the parent reports failures
SPLITS_ENV = "BLOODCELL_NPROC_SPLITS"  # set by launch(): the splits its workers keep (a trial: no test)
TIMEOUT_ENV = "BLOODCELL_DIST_TIMEOUT"  # seconds to join the rendezvous and to wait in a collective
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo; rank 0 may build the cache meanwhile


class Reported(BloodcellError):
    """An error another process (rank 0, the failing rank or the --nproc parent) tells the user
    about: the CLI exits non-zero without printing it, so a run of N processes says it once."""

    quiet = True


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank of size, and on its machine local_rank of local_size."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def active(self) -> bool:
        """Several processes (a process group to talk to)."""
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run folder and logs."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """A CUDA device means this rank's own GPU (cuda:LOCAL_RANK)."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.active else device


ONE = World()


def env_world() -> World:
    """The world torchrun's environment variables describe (one process when they are absent)."""
    if "WORLD_SIZE" not in os.environ:
        return ONE
    try:
        size = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    except ValueError as e:
        raise BloodcellError(f"RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be whole numbers "
                             f"({e})") from e
    if size < 1 or not 0 <= rank < size or not 0 <= local_rank < local_size:
        raise BloodcellError(f"RANK {rank} does not fit WORLD_SIZE {size} (or LOCAL_RANK {local_rank} "
                             f"LOCAL_WORLD_SIZE {local_size})")
    return World(rank, size, local_rank, local_size)


def timeout_s() -> float:
    """How long to wait for the other processes (BLOODCELL_DIST_TIMEOUT, else 30 minutes)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError as e:
        raise BloodcellError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from e


def setup() -> World:
    """Join the process group the environment names (once per process): gloo for CPU tensors,
    NCCL for CUDA ones (each process on its machine's GPU LOCAL_RANK). A rendezvous that does not
    answer in time is one clear error."""
    world = env_world()
    if not world.active or dist.is_initialized():
        return world
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    t = timeout_s()
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=t))
    except (dist.DistError, RuntimeError, ValueError) as e:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BloodcellError(f"process {world.rank} of {world.size} could not join the run's rendezvous at "
                             f"{where} within {t:g} s ({reason}); start every process with the same "
                             "MASTER_ADDR, MASTER_PORT and WORLD_SIZE (torchrun sets them), rank 0 "
                             f"among them") from e
    # Leave the group before the interpreter tears down: gloo's threads still running at exit
    # end the process with "terminate called without an active exception" (SIGABRT), seen once
    # in CI on a run that had finished its work.
    atexit.register(leave)
    return world


def leave() -> None:
    """Destroy this process's group, if it has one (a local call: no peer needs to answer)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def kept_splits() -> list[str] | None:
    """The splits a launched worker keeps (None: all of them)."""
    raw = os.environ.get(SPLITS_ENV) if launched() else None
    return raw.split(",") if raw else None


def launched() -> bool:
    """Started by launch() (--nproc): the parent reports how the run ended."""
    return bool(os.environ.get(PARENT_ENV))


def speaks(world: World, e: BaseException) -> bool:
    """Whether this process prints the closing line for ``e`` (once per run, not once per rank)."""
    if getattr(e, "quiet", False):
        return False
    if isinstance(e, KeyboardInterrupt):
        return world.main and not launched()
    return True


def single_process(command: str) -> None:
    """Refuse a command that starts its trainings itself (compare, tune) under torchrun."""
    world = env_world()
    if world.active:
        raise (BloodcellError if world.main else Reported)(
            f"{command} starts its own trainings: run it once, not under torchrun; --nproc N trains "
            "each model on N processes of this machine")


# ---------------------------------------------------------------------------------------------
# collectives (CPU tensors go through gloo, so these work in a GPU run too)


def any_true(world: World, *flags: bool) -> list[bool]:
    """Each flag ORed over every rank (one all-reduce)."""
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
    if world.active:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def check_stop(world: World, diverged: bool = False) -> bool:
    """runtime.check_stop for every rank at once: where any rank got SIGINT or SIGTERM, all raise
    Interrupted at the same batch (none is left waiting in a collective). Also returns whether any
    rank's loss was not finite, so all of them stop on it together."""
    signum = stop_requested()
    stop, bad = any_true(world, signum > 0, diverged)
    if stop:
        raise Interrupted(signum or signal.SIGTERM)
    return bad


def sum_over(world: World, *values: float) -> list[float]:
    """Each value summed over every rank."""
    t = torch.tensor(values, dtype=torch.float64)
    if world.active:
        dist.all_reduce(t)
    return t.tolist()


def shard(n: int, world: World) -> slice:
    """This rank's contiguous block of n items: the blocks of all ranks in rank order are 0..n-1,
    each item exactly once (no padding)."""
    bounds = np.linspace(0, n, world.size + 1).round().astype(int)
    return slice(int(bounds[world.rank]), int(bounds[world.rank + 1]))


def gather(world: World, part: np.ndarray) -> np.ndarray:
    """The parts of every rank, concatenated in rank order (with shard(): the whole split, in order)."""
    if not world.active:
        return part
    parts: list = [None] * world.size
    dist.all_gather_object(parts, part)
    return np.concatenate([p for p in parts if len(p)] or parts[:1])


def broadcast(world: World, obj=None):
    """Rank 0's object on every rank."""
    if not world.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def sync_buffers(world: World, module: torch.nn.Module) -> None:
    """Average the float buffers (batch-norm running statistics) over the ranks: each rank gathered
    them from its own shard; evaluation and checkpoints need one set, the same everywhere."""
    if not world.active:
        return
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b.div_(world.size)


def on_main(world: World, fn: Callable):
    """``fn()`` on rank 0 only, its result on every rank; a BloodcellError there is raised on every
    rank (printed by rank 0 alone)."""
    if not world.active:
        return fn()
    outcome = None
    if world.main:
        try:
            outcome = ("ok", fn())
        except BloodcellError as e:
            broadcast(world, ("error", str(e)))
            raise
        except BaseException:
            broadcast(world, ("error", "rank 0 failed"))
            raise
    outcome = broadcast(world, outcome)
    if outcome[0] == "error":
        raise Reported(outcome[1])
    return outcome[1]


def node_first(world: World, fn: Callable, ordered: bool = True):
    """``fn()`` on every rank, the first process of each machine before the others (it builds the
    machine's decoded cache; they read it), or all at once when not ``ordered``. A BloodcellError
    on any rank stops every rank, said once: by rank 0, else by the rank it happened on."""
    def attempt(turn: bool):
        if not turn:
            error = None
        else:
            try:
                return_box[0] = fn()
                error = None
            except BloodcellError as e:
                error = e
        messages: list = [None] * world.size
        dist.all_gather_object(messages, None if error is None else str(error))
        if error is not None:
            if world.main or messages[0] is None:
                raise error
            raise Reported(str(error)) from error
        first = next((m for m in messages if m is not None), None)
        if first is not None:
            raise Reported(first)

    if not world.active:
        return fn()
    return_box = [None]
    if ordered:
        attempt(world.local_rank == 0)
        attempt(world.local_rank != 0)
    else:
        attempt(True)
    return return_box[0]


# What gloo and NCCL say, inside a plain RuntimeError (DDP's backward), when a peer is gone.
PEER_LOST = ("gloo", "NCCL", "c10d", "Connection reset", "Connection closed")


@contextlib.contextmanager
def peers_guard(world: World, out: Path):
    """A collective that fails because another rank is gone (killed, or stopped on its own error)
    becomes one line on rank 0 under torchrun, nothing elsewhere (the --nproc parent says it)."""
    if not world.active:
        yield
        return
    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        if not isinstance(e, dist.DistError) and not any(k in str(e) for k in PEER_LOST):
            raise
        msg = (f"another process of this run ended (its message is above, or it was killed); finished "
               f"epochs are saved in {out}: 'bloodcell train --resume {out}' continues")
        if world.main and not launched():
            raise BloodcellError(msg) from e
        raise Reported(msg) from e
