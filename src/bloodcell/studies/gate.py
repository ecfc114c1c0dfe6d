"""``bloodcell gate COLOUR GREY --out DIR``: two runs of one task, one trained on colour and one on
grey levels (``--stain-norm gray``), joined into one model with a colour gate (models.gate): an
image whose colours look like a training lab's is read by the colour run, any other by the grey one.

The gate is fitted on the train split of the colour run's own data (each ``--data`` source one
lab), decoded as the run decoded it; nothing of a test split or of a lab held out takes part.
DIR is a run folder every command takes as a RUN: best.pt, config.yaml (the colour run's), gate.json
(what the gate learnt: per lab the share of its train images read in colour) and metrics.json (the
gated model and each branch on the data's val and test splits, with TTA where the runs use it).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bloodcell.data import source_names
from bloodcell.errors import BloodcellError
from bloodcell.models.checkpoint import model_kwargs_of, model_of, read_checkpoint, save_checkpoint
from bloodcell.models.gate import NAME, QUANTILE, fit_gate
from bloodcell.runfiles import (
    check_out_dir,
    clear_run_dir,
    mark_done,
    prepare_run_dir,
    run_lock,
    write_json,
    write_yaml,
)
from bloodcell.training.evaluate import as_sources, checkpoint_data, evaluate_checkpoint


def stain_of(ckpt: dict) -> str:
    return ckpt["model"]["kwargs"].get("stain_norm", "none")


def check_pair(colour: dict, grey: dict, names: tuple[str, str]) -> None:
    """Refuse, in one line, two checkpoints that cannot be joined."""
    for ck, name in zip((colour, grey), names, strict=True):
        if ck["model"]["name"] == NAME:
            raise BloodcellError(f"{name} is already a gated model; give the two runs it was joined from")
    if stain_of(grey) != "gray":
        raise BloodcellError(f"{names[1]} must read grey levels (trained with --stain-norm gray); it has "
                             f"stain_norm {stain_of(grey)}")
    if stain_of(colour) == "gray":
        raise BloodcellError(f"{names[0]} reads grey levels (--stain-norm gray): give a run trained on colour "
                             "(--stain-norm lab, image or none)")
    for key in ("classes", "image_size", "resize", "mean", "std"):
        if colour[key] != grey[key]:
            raise BloodcellError(f"the two runs differ in {key} ({colour[key]} against {grey[key]}): train both "
                                 "on one task, at one size and resize")


def join(colour_run: str | Path, grey_run: str | Path, out: str | Path, data: list[str] | None = None,
         quantile: float = QUANTILE, cache_dir: str | None = None, overwrite: bool = False, log=print) -> dict:
    """Write the gated model's run folder OUT; returns gate.json's content."""
    out = Path(out)
    check_out_dir(out)
    prepare_run_dir(out, overwrite, resume=False)
    colour, grey = read_checkpoint(colour_run), read_checkpoint(grey_run)
    check_pair(colour, grey, (str(colour_run), str(grey_run)))
    config = dict(colour.get("config") or {})
    sources = as_sources(data or config.get("data"))
    if sources == ["None"]:
        raise BloodcellError(f"{colour_run} does not name its data; give --data")
    ds = checkpoint_data(colour, sources, cache_dir=cache_dir)
    train = ds.splits.get("train")
    if train is None:
        raise BloodcellError(f"{', '.join(sources)}: no train split to fit the gate on")
    names = source_names(ds)
    at = train.sources if train.sources is not None else np.zeros(len(train), int)
    images = {name: np.asarray(train.images[np.flatnonzero(at == i)]) for i, name in enumerate(names)}
    gate, info = fit_gate(model_of(colour).eval(), model_of(grey).eval(), images, quantile)
    for name, r in info["labs"].items():
        log(f"gate: {name}: {r['images']:,} train images, {100 * r['to_colour']:.1f} % read in colour")
    kwargs = {"colour": {"name": colour["model"]["name"], "kwargs": model_kwargs_of(colour)},
              "grey": {"name": grey["model"]["name"], "kwargs": model_kwargs_of(grey)}, "labs": names}
    info = {**info, "colour": str(colour_run), "grey": str(grey_run), "data": sources}
    config = {**config, "data": sources if len(sources) > 1 else sources[0]}
    with run_lock(out, "gated model"):
        prepare_run_dir(out, overwrite, resume=False)  # again, under the lock
        clear_run_dir(out)
        save_checkpoint(out / "best.pt", gate, model_name=NAME, model_kwargs=kwargs, classes=colour["classes"],
                        image_size=colour["image_size"], resize=colour["resize"], config=config,
                        mean=colour["mean"], std=colour["std"], extra={"gate": info})
        write_yaml(out / "config.yaml", config)
        write_json(out / "gate.json", info)
        scored = ",".join(k for k in ("val", "test") if k in ds.splits)
        metrics = {}
        if scored:
            tta = bool(config.get("tta", False))
            for key, run in (("gated", out), ("colour", colour_run), ("grey", grey_run)):
                got = evaluate_checkpoint(run, sources, split=scored, tta=tta, cache_dir=cache_dir,
                                          log=lambda _: None)
                metrics[key] = got
                log(f"gate: {key:6s} " + "  ".join(f"{k} accuracy {got[k]['accuracy']:.4f}" for k in got))
        write_json(out / "metrics.json", metrics)
        mark_done(out, time.strftime("%Y-%m-%d %H:%M:%S\n"))
    log(f"gate: wrote {out / 'best.pt'}")
    return info
