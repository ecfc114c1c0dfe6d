"""Kill campaign: `compare`, `tune` and a decoded-cache build killed with SIGKILL at seeded random
moments, then run again to the end; the final results must equal an uninterrupted run's, every time.

Usage:
    python bench/kill_campaign.py                       # 20 kills of each, tiny synthetic budgets
    python bench/kill_campaign.py --kills 3 --only compare --json out.json

Each kill: the command starts in its own process group (so the cache's worker processes die with
it), is SIGKILLed after a time drawn uniformly from (0, T) where T is the uninterrupted run's wall
time, and the same command is run again in the same folder. "Equal" means: compare's per-model
rows (every metric, best epoch, epochs run; not the timings), tune's (parameters -> state, value)
of every finished trial and its best trial, the cache's array bytes (SHA-256) and per-file errors.
Also counted: the rerun's exit code, temporary files left behind by the kill.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TIMING = {"train_minutes", "train_images_per_s"}


def env(cache: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "BLOODCELL_CACHE": str(cache),
            "OMP_NUM_THREADS": "1"}


# --- the three commands and what their "final result" is ------------------------------------------


def compare_cmd(out: Path) -> list[str]:
    return [PY, "-m", "bloodcell", "compare", "--models", "cnn2x32,cnn4x32", "--data", "synthetic:192",
            "--image-size", "32", "--epochs", "3", "--batch-size", "16", "--threads", "1", "--quiet",
            "--no-report", "--out", str(out)]


def compare_result(out: Path) -> object:
    rows = json.loads((out / "results.json").read_text())["models"]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def tune_cmd(out: Path) -> list[str]:
    base = out.parent / "base.yaml"
    base.write_text("image_size: 32\nbatch_size: 16\nthreads: 1\nepochs: 3\n")
    return [PY, "-m", "bloodcell", "tune", "--data", "synthetic:160", "--model", "cnn2x32", "--grid",
            "lr=0.01,0.03", "--config", str(base), "--sampler-seed", "0", "--pruner", "none", "--no-report",
            "--out", str(out)]


def tune_result(out: Path) -> object:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="bloodcell-cnn2x32", storage=f"sqlite:///{out / 'study.db'}")
    done = sorted((json.dumps(t.params, sort_keys=True), t.state.name, t.value) for t in study.trials
                  if t.state.name in ("COMPLETE", "PRUNED"))
    summary = json.loads((out / "summary.json").read_text())
    return {"finished": done, "best_value": summary["best_value"], "best_params": summary["best_params"]}


CACHE_CHILD = """
import hashlib, json, sys
from bloodcell.data.cache import build_cache
from bloodcell.data.layouts import discover
arr, errors, _ = build_cache(discover(sys.argv[1]).items, 48, cache_dir=sys.argv[2], workers=2)
print(json.dumps({"sha256": hashlib.sha256(arr.tobytes()).hexdigest(), "shape": list(arr.shape),
                  "errors": errors}))
"""


def cache_images(folder: Path, n: int = 1600) -> Path:
    """n small PNGs in 4 class folders (made once), one of them not an image."""
    import numpy as np
    from PIL import Image

    if (folder / "DONE").exists():
        return folder
    rng = np.random.default_rng(0)
    for i in range(n):
        d = folder / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (folder / "class0" / "broken.png").write_bytes(b"not a png")
    (folder / "DONE").write_text("")
    return folder


def cache_cmd(out: Path, images: Path) -> list[str]:
    return [PY, "-c", CACHE_CHILD, str(images), str(out)]


# --- one campaign ---------------------------------------------------------------------------------


def run(cmd: list[str], cache: Path, kill_after: float | None = None) -> tuple[int, str, bool]:
    """Run cmd (killed after kill_after s with SIGKILL to its process group): (rc, stdout, killed)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(cache),
                         start_new_session=True, text=True)
    killed = False
    try:
        out, err = p.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        killed = True
    if p.returncode not in (0, -9) and not killed:
        sys.stderr.write(err[-2000:])
    return p.returncode, out, killed


def leftovers(folder: Path) -> int:
    """Temporary files (atomic_write's and the cache's) a kill left behind."""
    return sum(1 for p in folder.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or ".tmp." in p.name
                                                                or (p.name.startswith(".") and p.suffix == ".npy")))


def campaign(name: str, kills: int, rng: random.Random, work: Path, log=print) -> dict:
    images = cache_images(work / "images") if name == "cache" else None

    def cmd(out: Path) -> list[str]:
        return {"compare": lambda: compare_cmd(out), "tune": lambda: tune_cmd(out),
                "cache": lambda: cache_cmd(out, images)}[name]()

    def result(out: Path, stdout: str) -> object:
        if name == "cache":
            return json.loads(stdout.strip().splitlines()[-1])
        return {"compare": compare_result, "tune": tune_result}[name](out)

    ref_dir = work / name / "reference"
    ref_dir.parent.mkdir(parents=True, exist_ok=True)
    cache = work / name / "cache-ref"  # the synthetic set's cache: warm for both runs alike
    t0 = time.perf_counter()
    rc, out, _ = run(cmd(ref_dir), cache)
    wall = time.perf_counter() - t0
    assert rc == 0, f"{name}: the uninterrupted run failed"
    reference = result(ref_dir, out)
    rows = []
    for k in range(kills):
        d = work / name / f"kill{k:02d}"
        at = rng.uniform(0.02, 0.98) * wall
        c = d / "cache" if name == "cache" else cache
        rc1, _, killed = run(cmd(d if name != "cache" else c), c, kill_after=at)
        left = leftovers(d)
        t1 = time.perf_counter()
        rc2, out2, _ = run(cmd(d if name != "cache" else c), c)
        rerun_s = time.perf_counter() - t1
        left_after = leftovers(d)
        equal = rc2 == 0 and result(d if name != "cache" else c, out2) == reference
        rows.append({"kill_at_s": round(at, 2), "killed": killed, "first_rc": rc1, "temporaries_left": left,
                     "temporaries_after_rerun": left_after, "rerun_rc": rc2, "rerun_s": round(rerun_s, 1), "equal": equal})
        log(f"{name} kill {k + 1:2d}/{kills} at {at:5.1f}s of {wall:4.1f}s: {'killed' if killed else 'ended first'}, "
            f"{left} temporaries left ({left_after} after the rerun), rerun rc {rc2} in {rerun_s:4.1f}s: {'EQUAL' if equal else 'DIFFERENT'}")
    return {"command": " ".join(cmd(ref_dir)[1:]), "uninterrupted_s": round(wall, 1),
            "kills": kills, "killed": sum(r["killed"] for r in rows), "equal": sum(r["equal"] for r in rows),
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="compare,tune,cache", help="comma-separated: compare, tune, cache")
    ap.add_argument("--work", help="working folder (default: a temporary one)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="kill-campaign-"))
    rng = random.Random(args.seed)
    res = {name: campaign(name, args.kills, rng, work) for name in args.only.split(",")}
    for name, r in res.items():
        print(f"{name}: {r['equal']}/{r['kills']} reruns equal to the uninterrupted run "
              f"({r['killed']} killed before the end; uninterrupted {r['uninterrupted_s']} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if all(r["equal"] == r["kills"] for r in res.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
