"""What model a training config makes: ``build_model`` (with --init-from's weights), the
arguments that rebuild it (``model_kwargs``, saved in every checkpoint) and its pretrained recipe.

>>> from bloodcell.models.build import build_model
>>> model, kwargs = build_model(cfg, ds.classes)
"""

from __future__ import annotations

import torch

from bloodcell.config import TrainConfig
from bloodcell.errors import BloodcellError
from bloodcell.models import gate
from bloodcell.models.checkpoint import model_kwargs_of, read_checkpoint
from bloodcell.models.pretrained import weights_info
from bloodcell.models.registry import get_model, model_info


def model_kwargs(cfg: TrainConfig, num_classes: int) -> dict:
    """The arguments that rebuild the model (saved in every checkpoint)."""
    kw = {"num_classes": num_classes, "image_size": cfg.image_size}
    options = model_info(cfg.model)["options"]
    if "norm" in options:
        kw["norm"] = cfg.norm
    if "pool_first" in options:
        kw["pool_first"] = True  # saved, so a checkpoint names its layer order (load_model)
    if cfg.stem != "auto" and "small_stem" not in options:
        raise BloodcellError(f"--stem {cfg.stem}: model {cfg.model} has no choice of stem (resnet18 has)")
    if "small_stem" in options and cfg.pretrained:
        if cfg.stem == "small":
            raise BloodcellError("--stem small cannot start from --pretrained weights: they were trained "
                                 "with the ImageNet stem")
        kw["small_stem"] = False  # the ImageNet stem the weights were trained with, at any size
    elif "small_stem" in options and cfg.stem != "auto":
        kw["small_stem"] = cfg.stem == "small"
    if cfg.stain_norm != "none":
        kw["stain_norm"] = cfg.stain_norm
    return kw


def pretrained_recipe(cfg: TrainConfig) -> dict | None:
    """What a --pretrained run starts from and how it fine-tunes (resolved.yaml, metrics.json), or
    None: the weights' source and file, the normalisation and input size they were trained at, and
    the learning rates of the new classifier and of the pretrained backbone."""
    if not cfg.pretrained:
        return None
    info = weights_info(cfg.model)
    if cfg.weights:
        info["file"] = str(cfg.weights)
    return {**info, "image_size": cfg.image_size, "head_lr": cfg.lr, "backbone_lr": cfg.lr * cfg.backbone_lr,
            "freeze_epochs": cfg.freeze_epochs}


def build_model(cfg: TrainConfig, classes: list[str]) -> tuple[torch.nn.Module, dict]:
    """The model for a config, with local pretrained weights or another run's weights if asked."""
    kw = model_kwargs(cfg, len(classes))
    model = get_model(cfg.model, weights=cfg.weights, pretrained=cfg.pretrained, **kw)
    if cfg.init_from:
        src = read_checkpoint(cfg.init_from)
        layout = model_kwargs_of(src).get("pool_first"), kw.get("pool_first")
        if None not in layout and layout[0] != layout[1]:
            raise BloodcellError(f"--init-from {cfg.init_from}: its model pools after the ReLU (an "
                                 "older bloodcell's layer order), so its weights do not map onto "
                                 "today's: train it again")
        own = model.state_dict()
        state = src["state_dict"]
        if src["model"]["name"] == gate.NAME:  # a gated model: the branch that reads as this run will
            state = gate.branch_state(state, cfg.stain_norm)
        # A stain-normalised model keeps its weights under "net.": match names without it.
        bare = {k.removeprefix("net."): k for k in own}
        take = {bare[k]: v for k, v in ((k.removeprefix("net."), v) for k, v in state.items())
                if k in bare and own[bare[k]].shape == v.shape}
        if not take:
            raise BloodcellError(f"--init-from {cfg.init_from}: no weights fit model {cfg.model}")
        model.load_state_dict(take, strict=False)
    return model, kw
