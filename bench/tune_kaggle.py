"""Tune cnn4x32 on the Kaggle blood-cell set (20 trials), then compare the tuned config's TEST
accuracy with the default config's, 3 seeds each. One command; prints a markdown table.

Usage:
    python bench/tune_kaggle.py                                  # ../shared/data/blood-cells
    python bench/tune_kaggle.py --data PATH --threads 2 --out bench/out/tune-kaggle
    python bench/tune_kaggle.py --data synthetic:400 --trials 3 --seeds 0   # a quick dry run

Steps, each timed: (1) decode the images once per image size of the space (the decoded cache
every trial then shares), (2) the study, maximising validation macro-F1 (the test split is never
seen), (3) train the default config and the tuned one (best.yaml) with each seed and evaluate them
on TEST. Re-running the command resumes: a finished study or run is read back, not redone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from bloodcell.config import TrainConfig, load_yaml, make_config
from bloodcell.data import load_dataset
from bloodcell.runtime import physical_cores
from bloodcell.training.train import train
from bloodcell.tune import tune

ROOT = Path(__file__).resolve().parents[1]
# The default space, sized so 20 trials fit 30 minutes on 2 cores (even on one thread each, which is
# how it was measured, so another job can share the machine). Measured on an idle machine: one
# Kaggle epoch of cnn4x32 at 64 px takes about 12 s (about 800 img/s, bf16, 2 threads); 96 and
# 128 px cost 2.3 and 4 times that, so they are left out, and trials get 3 to 8 epochs
# (early-stopped after 3 without progress, pruned by the median rule). Every other entry is the
# default space's.
SPACE = {"image_size": {"choices": [32, 48, 64]}, "epochs": {"low": 3, "high": 8}, "patience": 3}


def default_data() -> str:
    root = os.environ.get("BLOODCELL_TEST_DATA")
    base = Path(root) if root else ROOT.parent / "shared" / "data"
    return str(base / "blood-cells")


def run(cfg: TrainConfig, out: Path) -> dict:
    """Train one config into out (or read its finished metrics) -> the figures of the table."""
    if (out / "DONE").exists():
        m = json.loads((out / "metrics.json").read_text())
    else:
        m = train(cfg, out, overwrite=True, progress=False, log=lambda s: None)
    row = {"val_macro_f1": m["val"]["macro_f1"], "minutes": m["run"]["train_minutes"],
           "epochs": m["run"]["epochs_run"]}
    for split in ("test", "test_simple"):
        if split in m:
            row[f"{split}_accuracy"] = m[split]["accuracy"]
            row[f"{split}_macro_f1"] = m[split]["macro_f1"]
    if "test" in m:
        row["test_group_accuracy"] = m["test"].get("group_accuracy")
    return row


def fmt(xs: list[float], spec: str = ".4f") -> str:
    """Mean ± standard deviation over seeds (the value alone for one seed)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:{spec}}"
    return f"{statistics.mean(xs):{spec}} ± {statistics.stdev(xs):{spec}}"


def main() -> int:
    """Run the benchmark and print its table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=default_data())
    ap.add_argument("--model", default="cnn4x32")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=0, help="0: the physical cores")
    ap.add_argument("--timeout", type=float, default=None, metavar="MIN",
                    help="stop starting trials after MIN minutes (default: none)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "tune-kaggle"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    base = {"threads": args.threads} if args.threads else {}
    threads = args.threads or physical_cores()

    # (1) decode once per image size (what every later trial reads from the cache)
    from bloodcell.tune import load_space

    sizes = load_space(SPACE, args.model)["image_size"].values
    t0 = time.perf_counter()
    for size in sizes:
        load_dataset(args.data, image_size=size)
    decode_min = (time.perf_counter() - t0) / 60

    # (2) the study
    t0 = time.perf_counter()
    s = tune(args.data, args.model, args.trials, out / "study", space=SPACE, base=base,
             timeout_min=args.timeout, sampler_seed=0)
    tune_min = (time.perf_counter() - t0) / 60
    tuned = load_yaml(out / "study" / "best.yaml")

    # (3) default against tuned, on TEST, per seed
    rows = []
    for seed in seeds:
        for name, cfg in (("default", make_config(TrainConfig, base, {"data": args.data, "model": args.model,
                                                                      "seed": seed})),
                          ("tuned", make_config(TrainConfig, tuned, {"data": args.data, "seed": seed}))):
            r = run(cfg, out / f"{name}-seed{seed}")
            rows.append({"config": name, "seed": seed, **r})
            print(f"{name:8s} seed {seed}: test accuracy {r.get('test_accuracy', float('nan')):.4f}  "
                  f"val macro-F1 {r['val_macro_f1']:.4f}  {r['minutes']:.1f} min", flush=True)

    result = {"data": args.data, "model": args.model, "threads": threads, "cpu": platform.processor(),
              "decode_minutes": decode_min, "tune_minutes": tune_min, "study": s, "space": SPACE,
              "tuned_config": tuned, "runs": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))

    lines = [f"Tuning {args.model} on {args.data}: {s['complete'] + s['pruned']} trials "
             f"({s['complete']} completed, {s['pruned']} pruned) in {tune_min:.1f} min on {threads} "
             f"threads, after {decode_min:.1f} min decoding {len(sizes)} image sizes; "
             f"best val macro-F1 {s['best_value']:.4f}.",
             "", "Tuned: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in (s["best_params"] or {}).items()),
             "", "| config | seeds | TEST accuracy | TEST cell accuracy | TEST_SIMPLE accuracy "
                 "| TEST macro-F1 | val macro-F1 | epochs | minutes/run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("default", "tuned"):
        rs = [r for r in rows if r["config"] == name]
        def col(k: str, spec: str = ".4f", rs: list = rs) -> str:
            return fmt([r.get(k) for r in rs], spec)

        lines.append(f"| {name} | {len(rs)} | {col('test_accuracy')} | {col('test_group_accuracy')} | "
                     f"{col('test_simple_accuracy')} | {col('test_macro_f1')} | {col('val_macro_f1')} | "
                     f"{col('epochs', '.1f')} | {statistics.mean(r['minutes'] for r in rs):.1f} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
