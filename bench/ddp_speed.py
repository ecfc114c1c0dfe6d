#!/usr/bin/env python
"""Usage: python bench/ddp_speed.py [--data synthetic:1200] [--image-size 48] [--model cnn4x32]
                                 [--epochs 3] [--batch-size 64] [--nproc 1,2] [--rounds 3] [--device cpu]

Training throughput of ``bloodcell train`` on 1 process against N processes (torch.distributed,
DistributedDataParallel; ``--nproc N`` through torch's elastic launcher), side by side in one run.

Each round trains the same config once per process count, in turn (the order alternates between
rounds), each a full ``train(cfg)`` into a fresh run folder: the 1-process run in this process,
the others launched as ``--nproc N`` does. The threads per process are bloodcell's default: the
physical cores shared among the processes (a 2-core machine: 2 threads for 1 process, 1 each for 2).
The cache is built once before the first round, so no round decodes images, and one untimed
1-process training warms this process up (the launched processes start afresh every run: their
start-up is in the wall time, and the first epoch is left out of images/s for every count).

Reported per process count: the median over rounds of the training images/s (history.csv's
``images_per_s``: every rank's images of an epoch over its seconds, the first epoch left out as
warm-up, median of the rest), the wall time of the whole run (start-up, data, training, the final
evaluation), the test accuracy, and the ratio of each images/s to the 1-process one in the same
round. Writes bench/out/ddp_speed.md and .json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import OUT, machine_info, machine_md, md_table, write_outputs

from bloodcell.config import TrainConfig, make_config
from bloodcell.data.build import config_dataset
from bloodcell.runfiles import read_history
from bloodcell.training.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="synthetic:1200")
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--model", default="cnn4x32")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--nproc", default="1,2", help="process counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    counts = [int(n) for n in args.nproc.split(",")]

    with tempfile.TemporaryDirectory(prefix="ddp-speed-") as tmp:
        base = {"data": args.data, "image_size": args.image_size, "model": args.model, "epochs": args.epochs,
                "batch_size": args.batch_size, "device": args.device, "precision": "fp32",
                "cache_dir": str(Path(tmp) / "cache")}
        config_dataset(make_config(TrainConfig, base))  # build the cache once, outside the timings
        train(make_config(TrainConfig, base, {"epochs": 1}), Path(tmp) / "warm-up", log=lambda m: None,
              progress=False)
        runs: dict[int, list[dict]] = {n: [] for n in counts}
        for r in range(args.rounds):
            order = counts if r % 2 == 0 else counts[::-1]
            for n in order:
                cfg = make_config(TrainConfig, base, {"nproc": n})
                out = Path(tmp) / f"r{r}-n{n}"
                t0 = time.perf_counter()
                metrics = train(cfg, out, log=lambda m: None, progress=False)
                wall = time.perf_counter() - t0
                ips = read_history(out / "history.csv")["images_per_s"]
                row = {"round": r, "nproc": n, "images_per_s": float(statistics.median(ips[1:] if len(ips) > 1
                                                                                       else ips)),
                       "wall_s": wall, "test_accuracy": metrics["test"]["accuracy"],
                       "threads": metrics["run"]["threads"], "processes": metrics["run"]["processes"]}
                runs[n].append(row)
                print(f"round {r + 1}/{args.rounds}  {n} process(es): {row['images_per_s']:,.0f} img/s, "
                      f"{wall:.1f} s, test accuracy {row['test_accuracy']:.3f}", flush=True)

    one = {row["round"]: row["images_per_s"] for row in runs[counts[0]]}
    table = []
    result = {"machine": machine_info(), "config": {**base, "cache_dir": None}, "rounds": args.rounds, "runs": runs}
    for n in counts:
        ips = [row["images_per_s"] for row in runs[n]]
        ratios = [row["images_per_s"] / one[row["round"]] for row in runs[n]]
        walls = [row["wall_s"] for row in runs[n]]
        table.append([n, runs[n][0]["threads"], f"{statistics.median(ips):,.0f} [{min(ips):,.0f}-{max(ips):,.0f}]",
                      f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]",
                      f"{statistics.median(walls):.1f}",
                      f"{statistics.median(row['test_accuracy'] for row in runs[n]):.3f}"])
        result[f"median_images_per_s_{n}"] = statistics.median(ips)
        result[f"median_ratio_{n}"] = statistics.median(ratios)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    md = "\n\n".join([
        f"# bloodcell train on 1 and {', '.join(map(str, counts[1:]))} processes ({device})",
        machine_md(result["machine"]),
        f"Config: `{args.data}`, {args.image_size} px, {args.model}, batch {args.batch_size} per step (shared "
        f"among the processes), {args.epochs} epochs, fp32, {args.rounds} rounds alternating the order.",
        md_table(["processes", "threads each", "train images/s, median [min-max]", "ratio to 1 process",
                  "wall s (whole run)", "test accuracy"], table),
    ])
    write_outputs(args.out, "ddp_speed", md, result)


if __name__ == "__main__":
    main()
