"""evaluate_checkpoint: test a trained model on any data set whose classes match its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bloodcell.data import (
    BatchLoader,
    load_sources,
    parse_class_map,
    problem_lines,
    select_classes,
    source_names,
)
from bloodcell.errors import BloodcellError
from bloodcell.metrics import per_source_metrics, split_metrics
from bloodcell.models.checkpoint import load_model
from bloodcell.runfiles import check_out_dir, write_json, write_predictions
from bloodcell.runtime import resolve_device, resolve_precision, set_threads
from bloodcell.training.engine import evaluate


def as_sources(data) -> list[str]:
    """A config's or a caller's ``data`` (a path, or a list of them) as a list of sources."""
    return [str(data)] if isinstance(data, str | Path) or data is None else [str(d) for d in data]


def checkpoint_data(meta: dict, data: str | list[str], cache_dir: str | None = None, seed: int | None = None):
    """A data set decoded and split as a checkpoint's run would have it: its image size, resize,
    split fractions, groups and (unless given) seed, so its test split is the run's own where the
    data is the same."""
    cfg = meta.get("config", {})
    return load_sources(data, image_size=meta["image_size"], seed=cfg.get("seed", 0) if seed is None else seed,
                        resize=meta["resize"], cache_dir=cache_dir,
                        fractions=tuple(cfg.get("fractions", (0.7, 0.15, 0.15))),
                        val_fraction=cfg.get("val_fraction", 0.15), group_regex=cfg.get("group_regex"),
                        group_by=cfg.get("group_by", "auto"))


def evaluate_checkpoint(checkpoint: str | Path, data: str | list[str], split: str | None = None,
                        class_map: str | None = None, tta: bool = False, cache_dir: str | None = None,
                        device: str = "auto", precision: str = "auto", seed: int | None = None,
                        out: str | Path | None = None, log=print, restrict: bool = False) -> dict:
    """Metrics of a checkpoint on a data set's split(s); a whole class-folder set counts as one split.

    ``split`` names one split or several, comma-separated ("val,test,all": the model and the data
    are loaded once); "all" is every image of the data set, "train+val" those splits as one.

    ``restrict`` keeps only the model's outputs for the classes the data has, renormalised: the
    fair way to test an 8-class model on a 4-class set from another lab.

    ``data`` may be several sources (a list): each split is scored pooled and per source.
    """
    if out is not None:  # before the model and the data load
        check_out_dir(out)
    set_threads(0)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)  # scoring: bf16 is faster for every model (bench/precision_speed.py)
    model, meta = load_model(checkpoint, dev)
    same_data = as_sources(data) == as_sources(meta.get("config", {}).get("data"))
    ds = checkpoint_data(meta, data, cache_dir, seed)
    for line in problem_lines(ds, data):  # files skipped (unreadable, say): the figures below leave them out
        log(line)
    ds, dropped = select_classes(ds, meta["classes"], parse_class_map(class_map))
    if dropped:
        log(f"left out classes the model does not know: {', '.join(dropped)}")
    if split is None:
        # Another data set than the one trained on: every image of it is unseen, so use them all.
        names = ["test", "test_simple"] if same_data else ["all"]
    else:
        names = [n.strip() for n in split.split(",") if n.strip()] or [split]  # "" is an unknown split
    base = list(ds.splits)  # the data's own splits; "all" is made of them

    def parts(name: str) -> list[str]:
        return base if name == "all" else name.split("+")

    unknown = [p for n in names for p in parts(n) if p not in base]
    if unknown and split is not None:  # before scoring anything or writing a file
        raise BloodcellError(f"split {unknown[0]!r} not in the data; it has: {', '.join(base)}, all "
                             "(or several joined by +)")
    scored: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def score(name: str) -> tuple[np.ndarray, np.ndarray]:
        """Labels and probabilities of one of the data's splits, each image scored once per call."""
        if name not in scored:
            with torch.inference_mode():
                loader = BatchLoader(ds.splits[name], 256, device=dev, mean=meta["mean"], std=meta["std"])
                r = evaluate(model, loader, dev, prec, True, tta)
            scored[name] = r["labels"], r["probs"]
        return scored[name]

    results = {}
    for name in names:
        if name in ds.splits:
            labels, probs = score(name)
            groups, paths, sources = ds.splits[name].groups, ds.splits[name].paths, ds.splits[name].sources
        elif all(k in base for k in parts(name)):  # joined: the splits' own scores, each scored once
            joined = parts(name)
            pieces = [score(k) for k in joined]
            labels, probs = np.concatenate([q[0] for q in pieces]), np.concatenate([q[1] for q in pieces])
            groups = np.concatenate([ds.splits[k].groups for k in joined])
            paths = [q for k in joined for q in ds.splits[k].paths]
            sources = np.concatenate([ds.splits[k].sources for k in joined]) if ds.sources else None
        else:  # the default names where the data lacks one (no test_simple, say)
            continue
        classes = ds.classes
        if restrict:
            keep = sorted({int(k) for s in ds.splits.values() for k in np.unique(s.labels)})
            probs = probs[:, keep] / probs[:, keep].sum(1, keepdims=True)
            labels = np.searchsorted(keep, labels)
            classes = [ds.classes[k] for k in keep]
        results[name] = split_metrics(classes, groups, labels, probs)
        if sources is not None and len(ds.sources) > 1:
            results[name]["per_source"] = per_source_metrics(classes, groups, labels, probs, sources,
                                                             source_names(ds))
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            write_predictions(Path(out) / f"predictions_{name}.csv", paths, labels, probs, classes)
    if out:
        write_json(Path(out) / "metrics.json", results)
    return results
