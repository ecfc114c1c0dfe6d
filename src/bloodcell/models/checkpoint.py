"""One checkpoint format that rebuilds its model from the file alone (predict, evaluate, export, serve)."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import torch

from bloodcell import __version__
from bloodcell.catalog import MEAN, STD
from bloodcell.errors import BloodcellError
from bloodcell.models import gate
from bloodcell.models.builtin import BUILTIN, builtin_path
from bloodcell.models.registry import get_model, model_info
from bloodcell.runfiles import atomic_write

FORMAT = "bloodcell-checkpoint/1"


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, model_name: str, model_kwargs: dict,
                    classes: list[str], image_size: int, resize: str, config: dict | None = None,
                    epoch: int = 0, optimizer=None, scheduler=None, best_metric: float | None = None,
                    extra: dict | None = None, mean=MEAN, std=STD) -> None:
    """Write a checkpoint atomically (runfiles.atomic_write: the old file or the new, never half);
    ``mean``/``std`` are the normalisation the model was trained with (pretrained: the weights')."""
    ckpt = {
        "format": FORMAT, "bloodcell_version": __version__,
        "model": {"name": model_name, "kwargs": dict(model_kwargs)},
        "classes": list(classes), "image_size": int(image_size), "resize": resize,
        "mean": [float(v) for v in mean], "std": [float(v) for v in std],
        "state_dict": {k: v.detach().clone().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch), "best_metric": best_metric, "config": config or {},
    }
    ckpt.update(extra or {})
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write(path, buf.getvalue())


_SAID: set[str] = set()  # the cross-validation folders already named on stderr


def resolve(path: str | os.PathLike) -> Path:
    """A run folder means its best.pt; a file means itself; a cross-validation folder (folds.json,
    bloodcell.studies.kfold) means the best.pt of its fold chosen on validation, said once on stderr;
    ``builtin`` means the classifier bloodcell ships (models.builtin). Raise a clear error if none
    exists."""
    if str(path) == BUILTIN:
        return builtin_path("classifier")
    p = Path(path)
    if p.is_dir() and (p / "folds.json").is_file() and not (p / "best.pt").is_file():
        try:
            cv = json.loads((p / "folds.json").read_text())
            fold = p / cv["per_fold"][cv["chosen"]]["run_dir"]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise BloodcellError(f"{p / 'folds.json'} could not be read ({type(e).__name__}); give one "
                                 f"fold's folder, {p / 'folds' / '0'} say") from e
        if str(p) not in _SAID:
            _SAID.add(str(p))
            print(f"{p} is a {cv['folds']}-fold cross-validation: using fold {cv['chosen']}, chosen on "
                  f"validation ({fold}); give another fold's folder for another", file=sys.stderr)
        return resolve(fold)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise BloodcellError(f"no checkpoint (best.pt or last.pt) in run folder {p}")
    if p.exists() and not p.is_file():
        raise BloodcellError(f"{p}: not a regular file (a FIFO, device or socket), so not a checkpoint")
    if not p.is_file():
        raise BloodcellError(f"checkpoint not found: {p}")
    return p


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint dict on the CPU, checking that it is one of ours."""
    p = resolve(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise BloodcellError(f"{p} is not a readable checkpoint ({type(e).__name__})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise BloodcellError(f"{p} is not a bloodcell checkpoint")
    return ckpt


def model_kwargs_of(ckpt: dict) -> dict:
    """The arguments that rebuild a checkpoint's model (``get_model(name, **them)``)."""
    name = ckpt["model"]["name"]
    if name == gate.NAME:  # two models and a colour gate (models.gate): their own arguments
        return dict(ckpt["model"]["kwargs"])
    kwargs = {k: v for k, v in ckpt["model"]["kwargs"].items() if k not in ("weights", "pretrained")}
    if "pool_first" in model_info(name)["options"] and "pool_first" not in kwargs:
        # Written before the study models pooled first, or by hand: the layer order whose
        # parameter names the weights carry (BatchNorm sits one place later when pooled first).
        for order in (True, False):
            if get_model(name, **kwargs, pool_first=order).state_dict().keys() == ckpt["state_dict"].keys():
                kwargs["pool_first"] = order
                break
    return kwargs


def model_of(ckpt: dict) -> torch.nn.Module:
    """A read checkpoint's model with its weights (a registered model, or a colour gate's pair)."""
    name = ckpt["model"]["name"]
    build = gate.from_kwargs if name == gate.NAME else lambda **kw: get_model(name, **kw)
    model = build(**model_kwargs_of(ckpt))
    model.load_state_dict(ckpt["state_dict"])
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from a run folder or checkpoint file; returns (model in eval mode, meta)."""
    ckpt = read_checkpoint(path)
    model = model_of(ckpt)
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scheduler")}
    meta["path"] = str(resolve(path))
    return model, meta
