"""The training engine: train_one_epoch, evaluate and fit, one explicit loop each."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from bloodcell.cpu import ort_options
from bloodcell.data.transforms import TTA_VIEWS, tta_view
from bloodcell.errors import BloodcellError
from bloodcell.runtime import autocast, check_stop
from bloodcell.training import distributed
from bloodcell.training.distributed import World


class TrainingDiverged(BloodcellError):
    """The loss became NaN or infinite."""


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
    world: World | None = None  # several processes: the model is DistributedDataParallel


class EMA:
    """An exponential moving average of a model's weights and float buffers (evaluated instead of
    the raw weights): torch's ``AveragedModel`` with its EMA update. The average starts from the
    model as it is now, and the first update already blends (``n_averaged`` starts at 1), so the
    average after k steps is the usual EMA of the k+1 weights seen."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.n_averaged.fill_(1)
        self.averaged.eval()
        for p in self.averaged.parameters():
            p.requires_grad_(False)

    @property
    def model(self) -> torch.nn.Module:
        """The averaged network itself (its state_dict keys are the model's own)."""
        return self.averaged.module

    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards the current weights and float buffers (BN statistics)."""
        self.averaged.update_parameters(model)


def progress_bar(total: int, desc: str, enabled: bool = True) -> tqdm:
    """tqdm's bar on stderr: redrawn in place on a terminal; in a log, nothing for an epoch shorter
    than 30 s and then an update every 30 s at most."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, file=sys.stderr,
                mininterval=0.1 if tty else 30, delay=0 if tty else 30, unit="batch", dynamic_ncols=True)


def train_one_epoch(model: torch.nn.Module, loader, step: Step, progress: tqdm | None = None) -> dict:
    """One pass over the training loader; returns loss, accuracy, images/s and seconds."""
    model.train()
    t0 = time.perf_counter()
    total_loss, correct, seen = 0.0, 0, 0
    for i, (x, y) in enumerate(loader, 1):
        if step.world is None:
            check_stop()
        x, y = x.to(step.device, non_blocking=True), y.to(step.device, non_blocking=True)
        if step.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(step.device, step.precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, weight=step.class_weights,
                               label_smoothing=step.label_smoothing)
        bad = not torch.isfinite(loss)
        if step.world is not None:  # every rank stops at the same step, on a signal or a bad loss anywhere
            bad = distributed.check_stop(step.world, bad)
        if bad:
            raise TrainingDiverged(f"the loss became {loss.item()} at step {i}")
        step.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), step.clip_grad)
        step.optimizer.step()
        if step.scheduler is not None:
            step.scheduler.step()
        if step.ema is not None:
            step.ema.update(getattr(model, "module", model))
        n = y.shape[0]
        total_loss += loss.item() * n
        correct += (logits.argmax(1) == (y.argmax(1) if y.ndim == 2 else y)).sum().item()  # soft: its top class
        seen += n
        if progress is not None:
            progress.set_postfix_str(f"{seen / (time.perf_counter() - t0):,.0f} img/s, loss {total_loss / seen:.4f}",
                                     refresh=False)
            progress.update()
    if progress is not None:
        progress.close()
    secs = time.perf_counter() - t0
    if step.world is not None:  # the epoch's figures over every rank's images
        total_loss, correct, seen = distributed.sum_over(step.world, total_loss, correct, seen)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1),
            "seconds": secs, "images_per_s": seen / secs if secs > 0 else 0.0}


def class_balance(labels, n_classes: int, present_only: bool = False) -> torch.Tensor:
    """Loss weights per class, inverse to its count among ``labels``, so that each class weighs alike
    in the loss: count.sum() / (k x count). Over every class (k = n_classes; a class with no label
    counted as one, as ``--class-weights`` does on a train split), or ``present_only`` (k = the
    classes with a label; a class with none keeps weight 1: a few labelled cells of a new lab
    often miss a class, which then only meets the loss through label smoothing)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    if not present_only:
        w = counts.sum() / (n_classes * np.maximum(counts, 1))
    else:
        present = counts > 0
        w = np.ones(n_classes)
        w[present] = counts[present].sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


ONNX_MIN_IMAGES = 4096  # forward passes (images x views) from which scoring in ONNX Runtime repays its export


def onnx_scorer(model: torch.nn.Module, image_size: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """The model's logits through ONNX Runtime on the CPU (its own kernels: several times PyTorch's
    eager fp32 on the study's small CNNs, bench/infer_speed.py), as a function of a normalised
    float32 batch N x 3 x S x S; None where the model does not export (PyTorch scores it then)."""
    import onnxruntime as ort  # lazy: only a CPU scoring of many images needs it

    from bloodcell.models.onnx import onnx_graph

    try:
        graph = onnx_graph(model, image_size)
    except Exception:  # noqa: BLE001 - any model the exporter cannot write is scored in PyTorch
        return None
    session = ort.InferenceSession(graph, ort_options(torch.get_num_threads()), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": np.ascontiguousarray(x, np.float32)})[0]


def scoring_backend(backend: str, device: torch.device, precision: str, images: int,
                    world: World | None = None) -> str:
    """auto -> "onnx" for fp32 on the CPU from ONNX_MIN_IMAGES forward passes (one process), else
    "torch" (a GPU, bf16 autocast, a few images, or ranks that score their own blocks)."""
    if backend != "auto":
        return backend
    fast = device.type == "cpu" and precision == "fp32" and world is None and images >= ONNX_MIN_IMAGES
    return "onnx" if fast else "torch"


@torch.no_grad()
def predict_probs(model: torch.nn.Module, loader, device: torch.device, precision: str = "fp32",
                  channels_last: bool = True, tta: bool = False,
                  world: World | None = None, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities for every image of a loader (in order), with optional 8-view TTA. With
    a world, the loader holds this rank's block and the result is every rank's, in order. The
    forward passes run in PyTorch, or in ONNX Runtime (``scoring_backend``: fp32 on the CPU over
    many images), whose probabilities agree with PyTorch's to float32 rounding."""
    model.eval()
    n = len(getattr(loader, "labels", ()))
    use = scoring_backend(backend, torch.device(device), precision, n * (TTA_VIEWS if tta else 1), world)
    scorer, first = None, True
    probs, labels = [], []
    for x, y in loader:
        if world is None:  # ranks' blocks may differ by a batch: they agree on stopping after it
            check_stop()
        if first and use == "onnx":
            scorer = onnx_scorer(model, x.shape[-1]) if x.shape[2] == x.shape[3] else None
        first = False
        views = range(TTA_VIEWS) if tta and x.shape[2] == x.shape[3] else range(1)
        p = 0
        if scorer is not None:
            x = x.cpu().float()
            for k in views:
                p = p + torch.softmax(torch.from_numpy(scorer(tta_view(x, k).numpy())).float(), 1)
        else:
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for k in views:
                with autocast(device, precision):
                    p = p + torch.softmax(model(tta_view(x, k)).float(), 1)
        probs.append((p / len(views)).cpu().numpy())
        labels.append(y.cpu().numpy())
    probs_, labels_ = (np.concatenate(probs), np.concatenate(labels)) if probs else \
        (np.zeros((0, 0), np.float32), np.zeros(0, np.int64))
    if world is not None:
        probs_, labels_ = distributed.gather(world, probs_), distributed.gather(world, labels_)
        distributed.check_stop(world)
    return probs_, labels_


def evaluate(model: torch.nn.Module, loader, device: torch.device, precision: str = "fp32",
             channels_last: bool = True, tta: bool = False, world: World | None = None) -> dict:
    """Loss and accuracy over a whole split (computed from all predictions, not batch averages)."""
    probs, labels = predict_probs(model, loader, device, precision, channels_last, tta, world)
    p_true = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return {"loss": float(-np.log(p_true).mean()), "accuracy": float((probs.argmax(1) == labels).mean()),
            "probs": probs, "labels": labels}


# ---------------------------------------------------------------------------------------------
# optimiser and schedule


def make_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float, momentum: float,
                   head: set[str] | None = None, backbone_lr: float = 1.0):
    """AdamW or SGD; no weight decay on biases and normalisation weights. With ``head`` (the names of
    a pretrained model's new parameters), every other parameter is the backbone, at ``backbone_lr``
    x ``lr`` in groups marked ``backbone`` (after the head's: param_groups[0] is at ``lr``)."""
    parts: dict[tuple[bool, bool], list] = {(b, d): [] for b in (False, True) for d in (True, False)}
    for n, p in model.named_parameters():
        if p.requires_grad:
            parts[(head is not None and n not in head, p.ndim > 1)].append(p)
    groups = [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "backbone": backbone,
               "lr": lr * (backbone_lr if backbone else 1.0)}
              for (backbone, decay), ps in parts.items() if ps or not backbone]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def make_scheduler(optimizer, name: str, total_steps: int, warmup_steps: int, freeze_steps: int = 0):
    """Per-step schedule: cosine or one-cycle with linear warm-up, or constant after warm-up. The
    ``backbone`` groups stay at 0 for the first ``freeze_steps`` (the frozen-backbone warm-up), then
    warm up linearly over ``warmup_steps`` into the same schedule."""
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

    def backbone_factor(step: int) -> float:
        if step < freeze_steps:
            return 0.0
        return factor(step) * min(1.0, (step - freeze_steps + 1) / (warmup_steps + 1))

    lambdas = [backbone_factor if g.get("backbone") and freeze_steps > 0 else factor
               for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


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
    """Is value an improvement on best for this monitor (loss lower, others higher; ``last``: every
    epoch is, so the last one is kept)?"""
    if best is None or monitor == "last":
        return True
    return value < best if monitor.endswith("loss") else value > best


def fit(model: torch.nn.Module, train_loader, val_loader, step: Step, *, epochs: int, monitor: str,
        patience: int, seed: int, state: FitState, val_metrics: Callable[[np.ndarray, np.ndarray], dict],
        save_last: Callable[[FitState], None], save_best: Callable[[FitState], None],
        log: Callable[[str], None] = print, progress: bool = True,
        on_epoch: Callable[[int, dict], None] | None = None) -> FitState:
    """Train for the remaining epochs, keeping the best checkpoint (a true copy, on disk) and the last."""
    state.history = state.history or []
    raw = getattr(model, "module", model)  # DistributedDataParallel's network
    eval_model = step.ema.model if step.ema is not None else raw
    while state.epoch < epochs:
        epoch = state.epoch + 1
        # One seed per epoch fixes dropout and anything else drawn from torch's global RNG, so a
        # resumed run draws exactly what the uninterrupted run would have drawn.
        torch.manual_seed(seed * 1_000_003 + epoch)
        train_loader.set_epoch(epoch)
        bar = progress_bar(len(train_loader), f"epoch {epoch}/{epochs}", enabled=progress)
        lr = step.optimizer.param_groups[0]["lr"]
        train = train_one_epoch(model, train_loader, step, bar)
        t0 = time.perf_counter()
        if step.world is not None:  # one set of batch-norm statistics for validation and the checkpoints
            distributed.sync_buffers(step.world, raw)
            if step.ema is not None:
                distributed.sync_buffers(step.world, step.ema.model)
        probs, labels = predict_probs(eval_model, val_loader, step.device, step.precision, step.channels_last,
                                      world=step.world)
        val = val_metrics(labels, probs)
        row = {"epoch": epoch, "train_loss": train["loss"], "train_acc": train["accuracy"],
               "val_loss": val["loss"], "val_acc": val["accuracy"], "val_macro_f1": val["macro_f1"],
               "lr": lr, "seconds": train["seconds"] + time.perf_counter() - t0,
               "images_per_s": train["images_per_s"]}
        state.history.append(row)
        state.epoch = epoch
        value = {"val_macro_f1": val["macro_f1"], "val_accuracy": val["accuracy"],
                 "val_loss": val["loss"], "last": float(epoch)}[monitor]
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
        # a Ctrl-C during validation or the saves: stop before the caller's bookkeeping
        check_stop() if step.world is None else distributed.check_stop(step.world)
        if on_epoch is not None:  # e.g. a tuner's pruning check; it may raise to stop the run
            on_epoch(epoch, row)
        if patience and state.bad_epochs >= patience:
            log(f"early stop: {monitor} did not improve for {patience} epochs (best {state.best_metric:.4f} "
                f"at epoch {state.best_epoch})")
            break
    return state
