"""Pretrained weights: where they come from, and the normalisation and input size they were trained at.

Two sources, each through its library's own API and cache:

- the torchvision baselines (``resnet18``, ``efficientnet_b0``, ``mobilenet_v3_small``, ``mobilenet_v2``) through
  torchvision's weights API (``ResNet18_Weights.IMAGENET1K_V1`` and the like): downloaded once into
  the torch cache, ``$TORCH_HOME/hub/checkpoints/<file>`` (``torch.hub.get_dir()``), and read from
  there ever after;
- any timm model, named ``timm/<name>``, through timm's ``create_model(pretrained=True)``, which reads
  the Hugging Face hub cache (``$HF_HOME``, ``$HF_HUB_CACHE``) and honours the hub's offline settings
  (``HF_HUB_OFFLINE=1``). timm is an optional extra (``pip install 'bloodcell[timm]'``), imported
  inside the functions that need it.

``HF_HUB_OFFLINE=1`` also keeps the torchvision weights from being downloaded: one switch for both.
Offline, a missing file is one line that names the file and where to put it. ``--weights FILE`` with
``--pretrained`` loads those weights from a file instead of a cache (the normalisation is still the
weights' own).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from bloodcell.catalog import MEAN, STD
from bloodcell.config import PRETRAINED_BASELINES
from bloodcell.errors import BloodcellError
from bloodcell.runfiles import check_in_file, shown

TIMM_PREFIX = "timm/"
# torchvision baseline -> the weights enum member its --pretrained loads (ImageNet-1k)
TORCHVISION_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "efficientnet_b0": "EfficientNet_B0_Weights.IMAGENET1K_V1",
    "mobilenet_v3_small": "MobileNet_V3_Small_Weights.IMAGENET1K_V1",
    "mobilenet_v2": "MobileNet_V2_Weights.IMAGENET1K_V1",
}
assert tuple(TORCHVISION_WEIGHTS) == PRETRAINED_BASELINES
TIMM_MISSING = "{name} needs the timm extra: pip install 'bloodcell[timm]'"


def is_timm(name: str) -> bool:
    """Whether a model name is a timm model (``timm/<name>``)."""
    return name.startswith(TIMM_PREFIX)


def offline() -> bool:
    """The hub's offline setting (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), read now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def _timm():
    try:
        import timm  # optional extra: only timm/<name> models need it
    except ImportError:
        return None
    return timm


def import_timm(name: str):
    """The timm module, or a BloodcellError saying how to install it."""
    timm = _timm()
    if timm is None:
        raise BloodcellError(TIMM_MISSING.format(name=name if is_timm(name) else TIMM_PREFIX + name))
    return timm


def _tv_weights(name: str):
    from torchvision import models as tvm  # the weights enums; torchvision is loaded by now anyway

    enum, member = TORCHVISION_WEIGHTS[name].split(".")
    return getattr(getattr(tvm, enum), member)


def cache_file(name: str) -> Path:
    """Where torchvision keeps a baseline's pretrained weights (the file its --pretrained reads)."""
    url = _tv_weights(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def torchvision_state(name: str) -> dict:
    """The pretrained state_dict of a torchvision baseline, from the torch cache (downloaded once)."""
    weights = _tv_weights(name)
    path = cache_file(name)
    fix = f"put {path.name} (from {weights.url}) at {path} (TORCH_HOME moves the folder), or give it with --weights FILE"
    if not path.is_file() and offline():
        raise BloodcellError(f"{name} --pretrained: {path.name} is not in the torch cache and HF_HUB_OFFLINE "
                             f"is set: {fix}")
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a hash mismatch a RuntimeError
        if path.is_file():  # present but unreadable
            raise BloodcellError(f"{name} --pretrained: {path} is not a readable weights file "
                                 f"({type(e).__name__}); delete it or {fix}") from e
        raise BloodcellError(f"{name} --pretrained: {path.name} could not be downloaded "
                             f"({type(e).__name__}): {fix}") from e


def read_state(path: str | Path) -> dict:
    """A state_dict file given with --weights (a bare state_dict, or a checkpoint dict holding one)."""
    check_in_file(path, "--weights")  # a FIFO would block torch.load for ever
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - missing, truncated or not a torch file: one line
        raise BloodcellError(f"--weights {shown(path)}: not a readable weights file ({type(e).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BloodcellError(f"--weights {shown(path)}: not a state_dict (a mapping of names to tensors)")
    return state


def _timm_repo(timm, name: str) -> tuple[str, str]:
    """(hub repository, file) that timm's pretrained=True reads for a timm model."""
    cfg = timm.models.get_pretrained_cfg(name) or {}
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return cfg.get("hf_hub_id") or "", cfg.get("hf_hub_filename") or "model.safetensors"


def timm_model(name: str, num_classes: int, pretrained: bool = False, weights: str | Path | None = None
               ) -> nn.Module:
    """A timm model (``timm/<name>``) with a new classifier for ``num_classes``; pretrained from the
    hub cache (timm's own loading, offline settings honoured) or, with ``weights``, from that file."""
    bare = name.removeprefix(TIMM_PREFIX)
    timm = import_timm(name)
    if not timm.is_model(bare):
        close = timm.list_models(f"*{bare[:6]}*")[:6]
        raise ValueError(f"unknown timm model '{bare}'" + (f"; close: {', '.join(close)}" if close else ""))
    if pretrained and weights is None and not timm.models.is_model_pretrained(bare):
        raise BloodcellError(f"{name} --pretrained: timm has no pretrained weights for {bare}")
    if pretrained and weights is not None:  # the pretrained weights from a file, loaded as timm loads its own
        if not Path(weights).is_file():
            raise BloodcellError(f"--weights {weights}: no such file")
        overlay = {"file": str(weights), "source": "", "hf_hub_id": None, "url": None}
        try:
            return timm.create_model(bare, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay)
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise BloodcellError(f"--weights {weights}: not {bare}'s weights ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:160]})") from e
    try:
        model = timm.create_model(bare, pretrained=pretrained, num_classes=num_classes)
    except OSError as e:  # the hub's LocalEntryNotFoundError and connection errors are OSErrors
        why = "HF_HUB_OFFLINE is set" if offline() else f"the hub could not be reached ({type(e).__name__})"
        raise BloodcellError(_not_in_hub_cache(timm, name, why)) from e
    return model


def _not_in_hub_cache(timm, name: str, why: str) -> str:
    repo, file = _timm_repo(timm, name.removeprefix(TIMM_PREFIX))
    return (f"{name} --pretrained: {file} of hf.co/{repo} is not in the Hugging Face cache ({hub_cache()}) "
            f"and {why}: run `hf download {repo}` where there is a network and copy that cache here, or "
            "give the file with --weights FILE")


def preflight(name: str) -> None:
    """Offline, refuse at once (before any data is read) weights that are in no cache."""
    if not offline():
        return  # a download may still bring them; get_model says so if it cannot
    if not is_timm(name):
        if not cache_file(name).is_file():
            torchvision_state(name)  # raises the offline line
        return
    timm = import_timm(name)
    repo, file = _timm_repo(timm, name.removeprefix(TIMM_PREFIX))
    if not repo:
        return  # weights from a URL: timm's own torch.hub cache, checked when loading
    from huggingface_hub import try_to_load_from_cache  # timm's dependency; lazy like timm

    if not any(isinstance(try_to_load_from_cache(repo, f), str) for f in (file, "pytorch_model.bin")):
        raise BloodcellError(_not_in_hub_cache(timm, name, "HF_HUB_OFFLINE is set"))


def hub_cache() -> str:
    """The Hugging Face hub cache folder timm reads (HF_HUB_CACHE, else HF_HOME/hub)."""
    try:
        from huggingface_hub import constants  # timm's own dependency; lazy like timm
    except ImportError:
        return os.environ.get("HF_HUB_CACHE") or str(Path(os.environ.get("HF_HOME", "~/.cache/huggingface"))
                                                      .expanduser() / "hub")
    return constants.HF_HUB_CACHE


def weights_info(name: str) -> dict:
    """What a model's pretrained weights were trained with: source, file, mean, std, input size."""
    if is_timm(name):
        timm = import_timm(name)
        bare = name.removeprefix(TIMM_PREFIX)
        cfg = timm.models.get_pretrained_cfg(bare)
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
        repo, file = _timm_repo(timm, bare)
        return {"source": f"timm {cfg.get('architecture', bare)}.{cfg.get('tag') or ''}".rstrip("."),
                "file": f"hf.co/{repo}/{file}" if repo else cfg.get("url", ""),
                "mean": [float(v) for v in cfg.get("mean", MEAN)], "std": [float(v) for v in cfg.get("std", STD)],
                "input_size": int(cfg.get("input_size", (3, 224, 224))[-1]),
                "interpolation": cfg.get("interpolation", "bilinear")}
    if name not in TORCHVISION_WEIGHTS:
        raise BloodcellError(f"{name} has no pretrained weights: --pretrained is for "
                             f"{', '.join(TORCHVISION_WEIGHTS)} and timm/<name>")
    w = _tv_weights(name)
    t = w.transforms()
    return {"source": f"torchvision {TORCHVISION_WEIGHTS[name]}", "file": str(cache_file(name)),
            "mean": [float(v) for v in t.mean], "std": [float(v) for v in t.std],
            "input_size": int(t.crop_size[0]), "interpolation": str(t.interpolation.value)}


def load_backbone(model: nn.Module, state: dict, source: str) -> nn.Module:
    """Load pretrained weights into a freshly built model, leaving the layers whose shape differs
    (the classifier for our classes) at their random init; marks those as the model's new layers."""
    own = model.state_dict()
    new = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
    unexpected = [k for k in state if k not in own]
    if unexpected or len(new) > 4:  # a classifier is a weight and a bias (two layers for some heads)
        raise BloodcellError(f"{source}: the weights do not fit the model (new: {', '.join(new[:4])}; "
                             f"unknown: {', '.join(unexpected[:4])})")
    model.load_state_dict({k: v for k, v in state.items() if k not in new}, strict=False)
    model._bloodcell_new = tuple(new)
    return model


def new_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters that pretrained weights did not provide (the new classifier), found
    on any submodule marked by ``load_backbone`` or, for timm models, their classifier."""
    names: set[str] = set()
    params = dict(model.named_parameters())
    for prefix, module in model.named_modules():
        dot = prefix + "." if prefix else ""
        marked = getattr(module, "_bloodcell_new", None)
        if marked is None and hasattr(module, "pretrained_cfg") and hasattr(module, "get_classifier"):
            head = module.get_classifier()
            marked = tuple(f"{n}.{p}" for n, m in module.named_modules() if m is head
                           for p, _ in m.named_parameters())
        for k in marked or ():
            if dot + k in params:
                names.add(dot + k)
    return names


def zero_head(model: nn.Module) -> nn.Module:
    """Start the new classifier at zero (BiT's fine-tuning recipe): every class at the same logit, so
    the first steps send the pretrained backbone no gradient from a random head. timm's own head
    init (uniform +-1/sqrt(classes) for EfficientNets) starts a 4-class head at a loss near 7."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in new_parameters(model):
            params[name].zero_()
    return model
