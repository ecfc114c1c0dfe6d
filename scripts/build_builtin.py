#!/usr/bin/env python
"""python scripts/build_builtin.py [--work runs/builtin] [--stage detector|classifier|ship|examples|all]

Rebuilds the models bloodcell ships (src/bloodcell/builtin/) from $BLOODCELL_TEST_DATA (default
../shared/data), on a CPU:

- the cell detector: `bloodcell detector train` on the train splits of the three labs with boxed
  fields (smears/raabin, smears/pbc: every WBC, RBC and platelet; BCCD's VOC files: red cells only),
  40 epochs at 320 px, seed 0; thresholds chosen on their val splits;
- the white-cell classifier: `bloodcell compare --preset anylab` on the two labs of crops whose
  licences let weights ship (Kaggle blood-cells / BCCD: MIT; the PBC share: CC BY 4.0), on the five
  white-cell classes (basophil, eosinophil, lymphocyte, monocyte, neutrophil), seed 0, twice: in
  grey levels (the preset) and in colour (`--stain-norm lab`); then `bloodcell gate` joins the two
  (colour for an image whose colours look like the two labs', grey levels for any other). Tecom and
  CellaVision (GPL-3.0) are not trained on: they are the card's two labs never seen;
- ship: each checkpoint stripped to what inference needs (no optimiser state), copied into the
  package with its SHA-256 in builtin/manifest.json, and the figures of builtin/CARD.md (each lab's
  test split, at home, for the gated model and each branch; the two labs never seen; the detector
  on each lab's test fields) written into builtin/CARD.md;
- examples: the README's first examples, shipped in builtin/examples/ (PBC, CC BY 4.0): one cell
  per class, the first by name of the classifier's PBC test split (cells/<class>.jpg), and a slide of
  the first three PBC fields by name of the detector's test split that hold a boxed white cell
  (slide/). The cells are of a split no model trained on; the fields were not trained on by the
  detector, but they are PBC's own images, so the classifier may have seen the cells in them.

Each stage keeps its output in --work; a stage whose output exists is skipped (delete it to redo).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(os.environ.get("BLOODCELL_TEST_DATA", "../shared/data"))
SMEARS = [ROOT / "smears" / "raabin", ROOT / "smears" / "pbc", ROOT / "blood-cells" / "dataset-master"]
LABS = [ROOT / "blood-cells", ROOT / "pbc" / "PBC_dataset_normal_DIB"]
UNSEEN = {"Tecom": ROOT / "other-labs" / "tecom", "CellaVision": ROOT / "other-labs" / "cellavision"}
CLASSES = "basophil,eosinophil,lymphocyte,monocyte,neutrophil"
PACKAGE = Path(__file__).resolve().parents[1] / "src" / "bloodcell" / "builtin"
COMMAND = "python scripts/build_builtin.py"


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def detector(work: Path) -> None:
    if (work / "detector" / "detector.pt").is_file():
        return
    run(["bloodcell", "detector", "train", *map(str, SMEARS), "--out", str(work / "detector"), "--epochs", "40",
         "--no-progress"])


BRANCHES = {"classifier": [], "colour": ["--stain-norm", "lab"]}  # grey levels (the preset), colour


def classifier(work: Path) -> None:
    data = [a for lab in LABS for a in ("--data", str(lab))]
    for name, extra in BRANCHES.items():
        if not (work / name / "runs" / "cnn4x32" / "best.pt").is_file():
            run(["bloodcell", "compare", "--preset", "anylab", *data, "--classes", CLASSES, "--seed", "0", *extra,
                 "--out", str(work / name)])
    if not (work / "gated" / "DONE").is_file():
        run(["bloodcell", "gate", str(work / "colour" / "runs" / "cnn4x32"),
             str(work / "classifier" / "runs" / "cnn4x32"), "--out", str(work / "gated"), "--overwrite"])


def slim(src: Path, dst: Path, drop=("optimizer", "scheduler")) -> None:
    """The checkpoint with only what inference needs, saved for the package."""
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    for k in drop:
        ckpt.pop(k, None)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    dst.write_bytes(buf.getvalue())


def entry(name: str, state_dict: dict, summary: str) -> dict:
    """One shipped file's manifest entry: its checksum, size, learnt parameters and what it is."""
    from bloodcell.models.builtin import sha256

    path = PACKAGE / name
    # learnt weights only: not batch-norm statistics, nor the colour gate's fitted centres and threshold
    fitted = ("running", "num_batches", "centres", "precisions", "threshold")
    params = sum(v.numel() for k, v in state_dict.items() if not any(f in k for f in fitted))
    return {"file": name, "sha256": sha256(path), "bytes": path.stat().st_size, "params": params,
            "summary": summary, "command": COMMAND}


def ship(work: Path) -> None:
    PACKAGE.mkdir(parents=True, exist_ok=True)
    slim(work / "gated" / "best.pt", PACKAGE / "classifier.pt")
    shutil.copyfile(work / "detector" / "detector.pt", PACKAGE / "detector.pt")
    cls = torch.load(PACKAGE / "classifier.pt", map_location="cpu", weights_only=False)
    det = torch.load(PACKAGE / "detector.pt", map_location="cpu", weights_only=True)
    manifest = {
        "classifier": entry("classifier.pt", cls["state_dict"],
                            f"two cnn4x32 (colour, grey levels) and a colour gate at {cls['image_size']} px "
                            f"({cls['resize']}), classes {', '.join(cls['classes'])}; trained on two labs"),
        "detector": entry("detector.pt", det["state_dict"],
                          f"centre heat-map detector at {det['input_size']} px, classes "
                          f"{', '.join(det['classes'])}; trained on three labs' fields"),
    }
    (PACKAGE / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest, indent=1))
    (PACKAGE / "CARD.md").write_text(card(work, manifest))
    print((PACKAGE / "CARD.md").read_text())


def examples(work: Path) -> None:
    from bloodcell.data.boxes import discover_boxes

    out = PACKAGE / "examples"
    shutil.rmtree(out, ignore_errors=True)
    (out / "cells").mkdir(parents=True)
    (out / "slide").mkdir()
    test = json.loads((work / "classifier" / "runs" / "cnn4x32" / "splits.json").read_text())["test"]
    pbc = sorted(p for p in test if Path(p).is_relative_to(LABS[1].resolve()) or Path(p).is_relative_to(LABS[1]))
    for cls in CLASSES.split(","):
        first = next(Path(p) for p in pbc if Path(p).parent.name.lower() == cls)
        shutil.copyfile(first, out / "cells" / f"{cls}{first.suffix.lower()}")
    fields = [Path(f.path) for f in discover_boxes(SMEARS[1]).split("test") if f.count("wbc")][:3]
    for i, f in enumerate(fields, 1):
        shutil.copyfile(f, out / "slide" / f"field-{i}{f.suffix.lower()}")
    print("\n".join(sorted(str(p.relative_to(PACKAGE)) for p in out.rglob("*.*"))))


def capture(cmd: list[str]) -> dict:
    print("+", " ".join(cmd), flush=True)
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def card(work: Path, manifest: dict) -> str:
    """The model card, from the runs' own files and evaluations made here."""
    metrics = json.loads((work / "gated" / "metrics.json").read_text())  # the gated model and each branch
    gate = json.loads((work / "gated" / "gate.json").read_text())
    cls = torch.load(PACKAGE / "classifier.pt", map_location="cpu", weights_only=False)
    names = {"blood-cells": "Kaggle", "PBC_dataset_normal_DIB": "PBC"}
    home = []
    for root, m in metrics["gated"]["test"].get("per_source", {}).items():
        branch = {k: metrics[k]["test"]["per_source"][root]["accuracy"] for k in ("colour", "grey")}
        home.append(f"| {names.get(Path(root).name, Path(root).name)} | {m['n']} test images | "
                    f"{100 * m['accuracy']:.1f} % | {100 * m['macro_f1']:.1f} % | {100 * branch['colour']:.1f} % | "
                    f"{100 * branch['grey']:.1f} % |")
    routed = ", ".join(f"{names.get(Path(k).name, k)} {100 * r['to_colour']:.1f} %" for k, r in gate["labs"].items())
    unseen = []
    runs = {"gated": PACKAGE / "classifier.pt", "colour": work / "colour" / "runs" / "cnn4x32",
            "grey": work / "classifier" / "runs" / "cnn4x32"}
    for name, path in UNSEEN.items():
        got = {}
        for key, model in runs.items():
            r = capture(["bloodcell", "evaluate", str(model), "--data", str(path), "--split", "all", "--json"])
            got[key] = r["all"] if "all" in r else next(iter(r.values()))
        m = got["gated"]
        unseen.append(f"| {name} | {m['n']} images (all) | {100 * m['accuracy']:.1f} % | {100 * m['macro_f1']:.1f} % | "
                      f"{100 * got['colour']['accuracy']:.1f} % | {100 * got['grey']['accuracy']:.1f} % |")
    det_rows = []
    for lab in SMEARS:
        r = capture(["bloodcell", "detector", "evaluate", str(PACKAGE / "detector.pt"), "--data", str(lab),
                     "--split", "test", "--json"])
        for c, m in r.items():
            ap = "-" if m["ap50"] is None else f"{m['ap50']:.3f}"
            rec = "-" if m["recall"] is None else f"{m['recall']:.3f}"
            frec = "-" if m.get("found_recall") is None else f"{m['found_recall']:.3f}"
            wrec = "-" if m.get("whole_recall") is None else f"{m['whole_recall']:.3f} ({m['whole_true']})"
            det_rows.append(f"| {lab.name if lab.name != 'dataset-master' else 'BCCD'} | {c} | {m['true']} | {ap} | "
                            f"{m['precision']:.3f} | {rec} | {m.get('found_precision', 0):.3f} | {frec} | {wrec} |")
    c, d = manifest["classifier"], manifest["detector"]
    return f"""# bloodcell's built-in models

Rebuilt from `$BLOODCELL_TEST_DATA` (the project's `../shared/data`) by one command, on a CPU:
`{COMMAND}` (seed 0; each figure below is printed by it). Checksums (SHA-256) are in
`manifest.json`; bloodcell refuses a file that does not match.

## White-cell classifier (`classifier.pt`, {c['bytes'] / 1e6:.2f} MB, {c['params']:,} parameters)

- **Model**: two cnn4x32 (the study's Model 3) joined by a colour gate (`bloodcell gate`), input
  {cls['image_size']} x {cls['image_size']} px, resize `{cls['resize']}` (a square sized to the stained cell, found by
  its violet nucleus), batch norm, the `anylab` preset (16 epochs, blur up to 1.5 px, 8-view TTA at
  evaluation); the epoch kept was chosen on the two labs' pooled validation split. One branch reads colour
  (Reinhard's transfer to fixed l-alpha-beta statistics as its first layer), the other grey levels (each
  image's grey level standardised). The gate sends an image to the colour branch when its colours (the
  mean and spread of its l-alpha-beta channels) lie within those of the training labs' images (the
  distance that holds 99 % of them; of the train splits it reads in colour: {routed}), any other image
  to the grey-level branch: colour reads the labs it knows better, grey levels a lab it never saw.
- **Classes**: {', '.join(cls['classes'])} (one lower-case spelling, whatever case each lab's folders use).
  Basophils come from PBC alone (Kaggle has none). Cells that are not one of these (erythroblasts, immature
  granulocytes, platelets, smudge cells) are given one of these five: the model has no "other" class.
- **Trained on**: the Kaggle "Blood Cell Images" set (BCCD smears; MIT licence) and a 30 % share of PBC
  (Acevedo et al. 2020, CellaVision DM96, Barcelona; CC BY 4.0: attribution here), each split on its own
  (seeded, grouped: Kaggle's augmented copies of one cell stay on one side). Not trained on: Tecom and
  CellaVision blog cells (GPL-3.0, whose terms for weights are unclear), so they measure two labs never seen.
- **Licence decision**: only data whose licence lets derived weights ship (MIT, CC BY 4.0) is trained on.

At home (each lab's test split, never used to choose anything; with TTA), the gated model and each branch alone:

| lab | images | accuracy | macro-F1 | colour branch | grey branch |
|---|---|---|---|---|---|
{chr(10).join(home)}

Labs never seen (every image; `bloodcell evaluate builtin --data LAB --split all`, no TTA):

| lab | images | accuracy | macro-F1 | colour branch | grey branch |
|---|---|---|---|---|---|
{chr(10).join(unseen)}

Leave one lab out over four labs (bench/RESULTS.md, "The colour gate"; 48 px, 6 epochs, 3 seeds) the gate reads
a lab never seen as the grey-level recipe does on average (49-84 % of each held-out lab, mean 59.8 against 59.2)
and the training labs' test cells as the colour recipe does (84.8 against 78.1 %). **Where it is known to fail**:
another microscope's cells (the figures above: a lab's own fine-tune or `bloodcell adapt` helps, see the
README); a lab whose colours resemble a training lab's but whose cells look otherwise is read in colour;
eosinophils and neutrophils against each other in grey levels (a lab read by the grey branch); basophils
(few examples). It is not a medical device.

## Cell detector (`detector.pt`, {d['bytes'] / 1e6:.2f} MB, {d['params']:,} parameters)

- **Model**: a centre heat-map network (bloodcell.models.detector), fields scaled to 320 px on their long
  side; classes wbc, rbc, platelet; score thresholds chosen on the training labs' val splits.
- **Trained on** the train splits of three labs' whole fields: Raabin-WBC (575 x 575) and PBC (360 x 363)
  fields with every cell boxed (TXL-PBC re-annotation, MIT), and BCCD (640 x 480; MIT), whose VOC files box
  red cells only (its fields train the red-cell maps alone).

Each lab's test fields (IoU 0.5; "found": the detection and the true box hold each other's centre;
"whole cells": the recall of the cells not cut by the field's edge, the ones a differential types):

| lab | class | true | AP50 | precision | recall | found: precision | found: recall | whole cells: recall (true) |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(det_rows)}

Leave one lab out (`python bench/detect_lolo.py`, bench/RESULTS.md "Finding white cells"): a lab whose
annotators box white cells with their pale cytoplasm is found, but its boxes are drawn tighter than its
annotators drew them. **Where it is known to fail**: cells cut by the field's edge; platelets (few boxes).

## Examples (`examples/`)

`cells/`: one PBC cell per class (its file named by its true class), the first by name of each class in
the classifier's PBC test split. `slide/`: the first three fields by name of the detector's PBC test split
that hold a boxed white cell (PBC's own images, so the classifier may have trained on their cells). PBC:
Acevedo et al., Data in Brief 2020, CC BY 4.0. They are the README's first examples, not a measure.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/builtin")
    ap.add_argument("--stage", choices=["detector", "classifier", "ship", "examples", "all"], default="all")
    args = ap.parse_args()
    work = Path(args.work)
    if args.stage in ("detector", "all"):
        detector(work)
    if args.stage in ("classifier", "all"):
        classifier(work)
    if args.stage in ("ship", "all"):
        ship(work)
    if args.stage in ("examples", "all"):
        examples(work)


if __name__ == "__main__":
    main()
