#!/usr/bin/env python
"""python bench/accuracy.py --task kaggle|pbc|idc|cross|ensemble [--preset best] [--models a,b] [--seeds 0,1,2]

The accuracy protocol: a `bloodcell compare` per seed (same preset, same data), then the mean and
spread over seeds of every figure, written as a Markdown table, and the test groups (copies of one
cell) where each model's errors concentrate. Nothing here looks at the test split
to choose anything: the preset fixes the settings, each run's epoch is chosen on validation.

Tasks:
  kaggle  blood-cells, official TEST split (and TEST_SIMPLE), group (cell) accuracy with its interval
  pbc     the PBC share, seeded grouped 70/15/15 split
  idc     the breast histopathology (IDC) subset, a seeded patient-grouped 70/15/15 split; the binary
          figures (balanced accuracy, F1 of IDC, ROC AUC, PR AUC); --preset none: bloodcell's defaults
  cross   models trained by the kaggle and pbc tasks (same --out), each tested on the other lab's
          images of the four shared classes: its val split (seed 0) to choose settings on, its
          test split (seed 0) as the figure that counts, and all its images as before
  ensemble  the uniform mean of the probabilities of every model the kaggle (or, with --of, pbc)
          task trained in the seed folders of --out and of each --also folder (same seeds, same
          split): val and test, beside each model alone; no weight is fitted, so nothing is chosen
          on test. Its predictions and table go to OUT/ensembles/<folders[-models]>/, one folder
          per combination, so one average never replaces another
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bloodcell.studies.compare import compare, load_protocol

ROOT = Path(os.environ.get("BLOODCELL_TEST_DATA", "../shared/data"))
DATA = {"kaggle": ROOT / "blood-cells", "pbc": ROOT / "pbc" / "PBC_dataset_normal_DIB",
        "idc": ROOT / "breast-histopathology"}


def mean_sd(values: list[float]) -> str:
    """'93.1 ± 0.4' in percent (sample standard deviation over seeds)."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def run_task(task: str, preset: str, models: list[str] | None, seeds: list[int], out: Path,
             extra: dict) -> None:
    """One compare per seed, each into OUT/<task>-seed<N> (resumable: a finished model is kept)."""
    shared, preset_models, overrides = load_protocol(None, None if preset == "none" else preset)
    shared.update({"data": str(DATA[task]), **extra})
    models = models or preset_models
    for seed in seeds:
        # a value may name its seed: init_from=OUT/pbc-seed{seed}/runs/cnn4x64/best.pt
        per_seed = {k: v.replace("{seed}", str(seed)) if isinstance(v, str) else v for k, v in shared.items()}
        compare(models, {**per_seed, "seed": seed}, out / f"{task}-seed{seed}", overrides,
                progress=False, report=True, command=f"bench/accuracy.py --task {task} seed {seed}")


def collect(task: str, models: list[str] | None, seeds: list[int], out: Path) -> list[dict]:
    """The per-seed results rows of every seed folder asked for (so seeds run by separate processes,
    side by side, make one table)."""
    rows = []
    for seed in seeds:
        path = out / f"{task}-seed{seed}" / "results.json"
        if not path.exists():
            raise SystemExit(f"error: {path} is missing: run --seeds {seed} first")
        for r in json.loads(path.read_text())["models"]:
            if models is None or r["model"] in models:
                rows.append({"seed": seed, **r})
    return rows


def binary_table(task: str, rows: list[dict]) -> str:
    """Mean ± sd over seeds per model of the binary figures (test split; val balanced accuracy)."""
    lines = [f"### {task}: {len({r['seed'] for r in rows})} seeds", "",
             "| model | image px | test acc | test balanced acc | test F1 (positive) | test ROC AUC | "
             "test PR AUC | val balanced acc | train min |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in dict.fromkeys(r["model"] for r in rows):
        t = [r["test"] for r in rows if r["model"] == m]
        rs = [r for r in rows if r["model"] == m]
        lines.append(f"| {m} | {rs[0]['image_size']} | " + " | ".join(
            mean_sd([x.get(k) for x in t]) for k in ("accuracy", "balanced_accuracy", "f1_positive", "auc", "pr_auc"))
            + f" | {mean_sd([r['val']['balanced_accuracy'] for r in rs])} | "
            f"{statistics.mean(r['train_minutes'] for r in rs):.1f} |")
    return "\n".join(lines)


def table(task: str, rows: list[dict]) -> str:
    """Mean ± sd over seeds per model."""
    if task == "idc":
        return binary_table(task, rows)
    lines = [f"### {task}: {len({r['seed'] for r in rows})} seeds",
             "",
             "| model | image px | test acc | test group acc | group acc 95 % CI (per seed) | TEST_SIMPLE acc | "
             "val acc | train min |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for m in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == m]
        cis = "; ".join(
            f"[{100 * r['test']['group_accuracy_ci'][0]:.1f}, {100 * r['test']['group_accuracy_ci'][1]:.1f}]"
            for r in rs if r["test"].get("group_accuracy_ci"))
        lines.append(
            f"| {m} | {rs[0]['image_size']} | {mean_sd([r['test']['accuracy'] for r in rs])} | "
            f"{mean_sd([r['test'].get('group_accuracy') for r in rs])} | {cis} | "
            f"{mean_sd([r.get('test_simple', {}).get('accuracy') for r in rs])} | "
            f"{mean_sd([r['val']['accuracy'] for r in rs])} | "
            f"{statistics.mean(r['train_minutes'] for r in rs):.1f} |")
    return "\n".join(lines)


def hardest_groups(task: str, rows: list[dict], out: Path, top: int = 3) -> str:
    """Per model, the test groups (copies of one cell) holding the most wrong images, averaged over
    seeds: where the errors concentrate (read from each run's predictions_test.csv)."""
    import csv

    from bloodcell.data import discover_grouped

    group_of = {it.path: it.group for it in discover_grouped(str(DATA[task])).items}
    lines = ["### test groups holding the most errors (share of a group's images called wrong, mean over "
             "seeds)", "",
             "| model | class | images | example file | wrong (mean) | wholly wrong in |", "|---|---|---:|---|---:|---:|"]
    for m in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == m]
        shares: dict[str, list[float]] = {}
        info: dict[str, tuple[str, int, str]] = {}
        for r in rs:
            with open(out / f"{task}-seed{r['seed']}" / r["run_dir"] / "predictions_test.csv", newline="") as f:
                preds = list(csv.DictReader(f))
            by_group: dict[str, list[dict]] = {}
            for row in preds:
                by_group.setdefault(group_of[row["path"]], []).append(row)
            for g, g_rows in by_group.items():
                shares.setdefault(g, []).append(sum(p["pred"] != p["label"] for p in g_rows) / len(g_rows))
                info[g] = (g_rows[0]["label"], len(g_rows), Path(g_rows[0]["path"]).name)
        for g in sorted(shares, key=lambda k: -statistics.mean(shares[k]) * info[k][1])[:top]:  # errors
            label, n, example = info[g]
            whole = sum(v == 1.0 for v in shares[g])
            lines.append(f"| {m} | {label} | {n} | {example} | {100 * statistics.mean(shares[g]):.0f} % | "
                         f"{whole} of {len(shares[g])} seeds |")
    return "\n".join(lines)


def cross(out: Path, seeds: list[int]) -> str:
    """Each lab's models on the other lab's four shared classes.

    Two figures per direction, on the other lab's split of seed 0 (the same images for every model):
    its val split, the one to choose settings on (resize, stain normalisation), and its test split,
    which chooses nothing and is the figure that counts. Every image of the other set ("all", the
    older figure) is shown too, for comparison with earlier tables; it includes the test split, so
    it chooses nothing either.
    """
    from bloodcell.training.evaluate import evaluate_checkpoint

    lines = ["### cross-lab (four shared classes of the other set; the PBC models' outputs restricted to "
             "those four; the other set split with seed 0)", "",
             "| trained on | tested on | model | val acc (choose here) | test acc | test macro-F1 | all images acc |",
             "|---|---|---|---:|---:|---:|---:|"]
    for src, dst in (("kaggle", "pbc"), ("pbc", "kaggle")):
        by_model: dict[str, dict[str, list[dict]]] = {}
        for ck in sorted(out.glob(f"{src}-seed*/runs/*/best.pt")):
            if int(ck.parts[-4].split("seed")[1]) not in seeds:
                continue
            # the 8-class PBC model scores only Kaggle's 4 classes (evaluate --restrict)
            res = evaluate_checkpoint(ck.parent, str(DATA[dst]), split="val,test,all", seed=0, log=lambda m: None,
                                      restrict=src == "pbc")
            for split, r in res.items():
                by_model.setdefault(ck.parent.name, {}).setdefault(split, []).append(r)
        for m, rs in by_model.items():
            lines.append(f"| {src} | {dst} | {m} | {mean_sd([r['accuracy'] for r in rs['val']])} | "
                         f"{mean_sd([r['accuracy'] for r in rs['test']])} | "
                         f"{mean_sd([r['macro_f1'] for r in rs['test']])} | "
                         f"{mean_sd([r['accuracy'] for r in rs['all']])} |")
    return "\n".join(lines)


def ensemble_dir(outs: list[Path], models: list[str] | None = None) -> Path:
    """Where one combination's averages go: OUT/ensembles/<folder+folder...>[-<model-model...>]."""
    return outs[0] / "ensembles" / ("+".join(o.name for o in outs) + ("-" + "-".join(models) if models else ""))


def ensemble(outs: list[Path], seeds: list[int], task: str = "kaggle", models: list[str] | None = None) -> str:
    """Each model alone and the mean of all their probabilities (compare's own ensemble row, which
    writes ensemble_dir/<task>-seedN/runs/ensemble), per split, mean ± sd over seeds; ``models``
    keeps only those architectures from each folder."""
    from bloodcell.config import TrainConfig, load_yaml, make_config
    from bloodcell.data.build import config_dataset
    from bloodcell.studies.compare import ensemble_row

    scores: dict[str, list[dict]] = {}
    for seed in seeds:
        rows = []
        for o in outs:
            folder = o / f"{task}-seed{seed}"
            if not (folder / "results.json").is_file():
                raise SystemExit(f"error: no finished {task} comparison in {folder} (no results.json)")
            rows += [{**r, "run_dir": str((folder / r["run_dir"]).resolve()),  # absolute: any folder
                      "folder": o.name}
                     for r in json.loads((folder / "results.json").read_text())["models"]
                     if r["model"] != "ensemble" and (not models or r["model"] in models)]
        if len({r["model"] for r in rows}) < len(rows):  # one model from several folders (schedules, say)
            rows = [{**r, "model": f"{r['model']} ({r['folder']})"} for r in rows]
        if len(rows) < 2:
            raise SystemExit(f"error: fewer than two finished {task} models for seed {seed} in {outs}")
        ds = config_dataset(make_config(TrainConfig, load_yaml(Path(rows[0]["run_dir"]) / "config.yaml")))
        row = ensemble_row(ensemble_dir(outs, models) / f"{task}-seed{seed}", rows, ds)
        if row is None:
            raise SystemExit(f"error: seed {seed}: the models' images differ (another split?)")
        for r in [*rows, {**row, "model": "ensemble of " + "+".join(row["members"])}]:
            scores.setdefault(r["model"], []).append(r)
    lines = [f"### {task}: each model and the mean of their probabilities, {len(seeds)} seeds", "",
             "| model | val acc | test acc | test group acc | test macro-F1 |", "|---|---:|---:|---:|---:|"]
    for name, rs in scores.items():
        v, t = [r["val"] for r in rs], [r["test"] for r in rs]
        lines.append(f"| {name} | {mean_sd([m['accuracy'] for m in v])} | {mean_sd([m['accuracy'] for m in t])} | "
                     f"{mean_sd([m.get('group_accuracy') for m in t])} | {mean_sd([m['macro_f1'] for m in t])} |")
    return "\n".join(lines)


def main() -> None:
    """Run one task and write its table to OUT/<task>.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["kaggle", "pbc", "idc", "cross", "ensemble"], required=True)
    ap.add_argument("--preset", default="best")
    ap.add_argument("--models", help="comma-separated (default: the preset's)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="bench/out/accuracy")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra config keys on top of the preset (recorded in the table's heading); "
                         "{seed} in a value becomes the run's seed")
    ap.add_argument("--also", default="", help="ensemble: more --out folders whose models join in "
                                                "(comma-separated)")
    ap.add_argument("--of", choices=["kaggle", "pbc"], default="kaggle",
                    help="ensemble: which data set's runs (the <of>-seedN folders) to average")
    ap.add_argument("--table-only", action="store_true",
                    help="only gather the seed folders already in --out into the table (seeds run side by side)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = dict(kv.split("=", 1) for kv in args.set)
    models = args.models.split(",") if args.models else None
    if args.task == "cross":
        text = cross(out, seeds)
    elif args.task == "ensemble":
        outs = [out, *[Path(p) for p in args.also.split(",") if p]]
        text = ensemble(outs, seeds, args.of, models)
        out = ensemble_dir(outs, models)  # the table goes beside this combination's predictions
    else:
        if not args.table_only:
            run_task(args.task, args.preset, models, seeds, out, extra)
        rows = collect(args.task, models, seeds, out)
        (out / f"{args.task}-rows.json").write_text(json.dumps(rows, indent=1))
        text = table(args.task, rows) + f"\n\npreset `{args.preset}`" + (f", with {extra}" if extra else "")
        text += "\n\n" + hardest_groups(args.task, rows, out)
    stamp = time.strftime("%Y-%m-%d")
    preset = f" --preset {args.preset}" if args.task in ("kaggle", "pbc", "idc") else ""  # cross, ensemble: none used
    cmd = f"python bench/accuracy.py --task {args.task}{preset} --seeds {args.seeds}" + (
        f" --of {args.of}" if args.task == "ensemble" else "") + f" --out {args.out}" + (f" --also {args.also}" if args.also else "") + (
        f" --models {args.models}" if args.models else "") + (f" --set {' '.join(args.set)}" if args.set else "")
    text += f"\n\n{stamp}, `{cmd}`\n"
    (out / f"{args.task}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
