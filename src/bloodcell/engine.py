"""The training engine: train_one_epoch, evaluate and fit, one explicit loop each."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bloodcell.errors import BloodcellError


class TrainingDiverged(BloodcellError):
    """The loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# runtime: device, precision, threads


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
# progress


class Progress:
    """A one-line progress bar on a terminal; plain log lines when output is not a terminal."""

    def __init__(self, total: int, desc: str, stream=None, enabled: bool = True):
        self.total, self.desc, self.stream = total, desc, stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.last_log = self.t0

    def update(self, step: int, images: int, loss: float) -> None:
        """Show step/total, images/s, running loss and ETA."""
        if not self.enabled:
            return
        now = time.perf_counter()
        el = now - self.t0
        ips = images / el if el > 0 else 0.0
        eta = el / step * (self.total - step) if step else 0.0
        msg = f"{self.desc} {step}/{self.total} | {ips:,.0f} img/s | loss {loss:.4f} | ETA {eta:4.0f}s"
        if self.tty:
            bar = "#" * int(20 * step / self.total)
            self.stream.write(f"\r[{bar:<20}] {msg}\033[K")
            self.stream.flush()
        elif now - self.last_log > 30:  # a line every 30 s at most in logs
            self.stream.write(msg + "\n")
            self.last_log = now

    def close(self) -> None:
        """End the bar's line."""
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


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
# loops


@dataclass
class Step:
    """What train_one_epoch needs besides the model and the data."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    device: torch.device
    precision: str = "fp32"
    label_smoothing: float = 0.0
    class_weights: torch.Tensor | None = None
    clip_grad: float = 0.0
    channels_last: bool = True
    ema: EMA | None = None


class EMA:
    """An exponential moving average of a model's weights (evaluated instead of the raw weights)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards the current weights; buffers (BN statistics) are copied."""
        for e, m in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if e.dtype.is_floating_point:
                e.lerp_(m, 1 - self.decay)
            else:
                e.copy_(m)


def train_one_epoch(model: torch.nn.Module, loader, step: Step, progress: Progress | None = None) -> dict:
    """One pass over the training loader; returns loss, accuracy, images/s and seconds."""
    model.train()
    t0 = time.perf_counter()
    total_loss, correct, seen = 0.0, 0, 0
    for i, (x, y) in enumerate(loader, 1):
        check_stop()
        x, y = x.to(step.device, non_blocking=True), y.to(step.device, non_blocking=True)
        if step.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(step.device, step.precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, weight=step.class_weights,
                               label_smoothing=step.label_smoothing)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"the loss became {loss.item()} at step {i}")
        step.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), step.clip_grad)
        step.optimizer.step()
        if step.scheduler is not None:
            step.scheduler.step()
        if step.ema is not None:
            step.ema.update(model)
        n = y.shape[0]
        total_loss += loss.item() * n
        correct += (logits.argmax(1) == (y.argmax(1) if y.ndim == 2 else y)).sum().item()  # soft: its top class
        seen += n
        if progress:
            progress.update(i, seen, total_loss / seen)
    if progress:
        progress.close()
    secs = time.perf_counter() - t0
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1),
            "seconds": secs, "images_per_s": seen / secs if secs > 0 else 0.0}


TTA_VIEWS = 8


def _views(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 flips/transpositions of a square image batch."""
    if k & 1:
        x = x.flip(3)
    if k & 2:
        x = x.flip(2)
    if k & 4:
        x = x.transpose(2, 3)
    return x


@torch.no_grad()
def predict_probs(model: torch.nn.Module, loader, device: torch.device, precision: str = "fp32",
                  channels_last: bool = True, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities for every image of a loader (in order), with optional 8-view TTA."""
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        check_stop()
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        views = range(TTA_VIEWS) if tta and x.shape[2] == x.shape[3] else range(1)
        p = 0
        for k in views:
            with autocast(device, precision):
                p = p + torch.softmax(model(_views(x, k)).float(), 1)
        probs.append((p / len(views)).cpu().numpy())
        labels.append(y.cpu().numpy())
    return np.concatenate(probs), np.concatenate(labels)


def evaluate(model: torch.nn.Module, loader, device: torch.device, precision: str = "fp32",
             channels_last: bool = True, tta: bool = False) -> dict:
    """Loss and accuracy over a whole split (computed from all predictions, not batch averages)."""
    probs, labels = predict_probs(model, loader, device, precision, channels_last, tta)
    p_true = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return {"loss": float(-np.log(p_true).mean()), "accuracy": float((probs.argmax(1) == labels).mean()),
            "probs": probs, "labels": labels}


# ---------------------------------------------------------------------------------------------
# optimiser and schedule


def make_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float, momentum: float):
    """AdamW or SGD; no weight decay on biases and normalisation weights."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def make_scheduler(optimizer, name: str, total_steps: int, warmup_steps: int):
    """Per-step schedule: cosine or one-cycle with linear warm-up, or constant after warm-up."""
    total_steps = max(total_steps, 1)
    warmup_steps = min(warmup_steps, total_steps - 1) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name == "constant":
            return 1.0
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if name == "onecycle":  # linear decay to zero after the warm-up peak
            return max(0.0, 1.0 - t)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# fit


@dataclass
class FitState:
    """What fit() keeps between epochs and saves for resuming."""

    epoch: int = 0  # epochs completed
    best_metric: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list | None = None


def better(monitor: str, value: float, best: float | None) -> bool:
    """Is value an improvement on best for this monitor (loss lower, others higher)?"""
    if best is None:
        return True
    return value < best if monitor.endswith("loss") else value > best


def fit(model: torch.nn.Module, train_loader, val_loader, step: Step, *, epochs: int, monitor: str,
        patience: int, seed: int, state: FitState, val_metrics: Callable[[np.ndarray, np.ndarray], dict],
        save_last: Callable[[FitState], None], save_best: Callable[[FitState], None],
        log: Callable[[str], None] = print, progress: bool = True,
        on_epoch: Callable[[int, dict], None] | None = None) -> FitState:
    """Train for the remaining epochs, keeping the best checkpoint (a true copy, on disk) and the last."""
    state.history = state.history or []
    eval_model = step.ema.model if step.ema is not None else model
    while state.epoch < epochs:
        epoch = state.epoch + 1
        # One seed per epoch fixes dropout and anything else drawn from torch's global RNG, so a
        # resumed run draws exactly what the uninterrupted run would have drawn.
        torch.manual_seed(seed * 1_000_003 + epoch)
        train_loader.set_epoch(epoch)
        bar = Progress(len(train_loader), f"epoch {epoch}/{epochs}", enabled=progress)
        lr = step.optimizer.param_groups[0]["lr"]
        train = train_one_epoch(model, train_loader, step, bar)
        t0 = time.perf_counter()
        probs, labels = predict_probs(eval_model, val_loader, step.device, step.precision, step.channels_last)
        val = val_metrics(labels, probs)
        row = {"epoch": epoch, "train_loss": train["loss"], "train_acc": train["accuracy"],
               "val_loss": val["loss"], "val_acc": val["accuracy"], "val_macro_f1": val["macro_f1"],
               "lr": lr, "seconds": train["seconds"] + time.perf_counter() - t0,
               "images_per_s": train["images_per_s"]}
        state.history.append(row)
        state.epoch = epoch
        value = {"val_macro_f1": val["macro_f1"], "val_accuracy": val["accuracy"],
                 "val_loss": val["loss"]}[monitor]
        improved = better(monitor, value, state.best_metric)
        if improved:
            state.best_metric, state.best_epoch, state.bad_epochs = value, epoch, 0
            save_best(state)
        else:
            state.bad_epochs += 1
        save_last(state)
        log(f"epoch {epoch:>3}/{epochs}  train loss {train['loss']:.4f} acc {train['accuracy']:.4f}  "
            f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f} f1 {val['macro_f1']:.4f}  "
            f"{train['images_per_s']:,.0f} img/s  {row['seconds']:.1f}s{'  *' if improved else ''}")
        check_stop()  # a Ctrl-C during validation or the saves: stop before the caller's bookkeeping
        if on_epoch is not None:  # e.g. a tuner's pruning check; it may raise to stop the run
            on_epoch(epoch, row)
        if patience and state.bad_epochs >= patience:
            log(f"early stop: {monitor} did not improve for {patience} epochs (best {state.best_metric:.4f} "
                f"at epoch {state.best_epoch})")
            break
    return state
