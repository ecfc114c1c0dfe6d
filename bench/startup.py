"""How long `bloodcell --help` and a tiny `bloodcell train` take, optionally beside another source tree.

Usage:
    python bench/startup.py                          # this checkout, 5 rounds
    python bench/startup.py --other /tmp/oldtree/src # side by side with another tree's src/ (a
                                                     # `git worktree add /tmp/oldtree <commit>`),
                                                     # the two run alternately in each round

Each command runs in a fresh interpreter (`python -c "from bloodcell.cli import main; ..."` with
PYTHONPATH set to the tree's src/), so import time is part of the figure. The train command is the
test suite's tiny run (synthetic:160, 32 px, cnn2x32, 2 epochs, 1 thread, fp32): it checks that
nothing in the training path got slower. The figures are medians; the ratio other / this is the
number to read, since both ran in the same minutes of a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"
RUN = "import sys; from bloodcell.cli import main; sys.exit(main(sys.argv[1:]))"
TRAIN = ["train", "--data", "synthetic:160", "--image-size", "32", "--batch-size", "16", "--epochs", "2",
         "--model", "cnn2x32", "--threads", "1", "--precision", "fp32", "--quiet", "--overwrite"]


def timed(src: Path, args: list[str], cache: str) -> float:
    """Seconds for one `bloodcell ARGS` with the package from ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src), "BLOODCELL_CACHE": cache}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", RUN, *args], env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> int:
    """Print the median seconds of each command for each tree, and the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--other", type=Path, help="another tree's src/ folder to run beside this one")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    trees = {"this": HERE, **({"other": args.other.resolve()} if args.other else {})}
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, src in trees.items():  # warm the synthetic cache and the OS file cache once
            timed(src, [*TRAIN, "--out", f"{tmp}/{name}"], tmp)
        for _ in range(args.rounds):
            for name, src in trees.items():
                times.setdefault((name, "help"), []).append(timed(src, ["--help"], tmp))
                times.setdefault((name, "train"), []).append(timed(src, [*TRAIN, "--out", f"{tmp}/{name}"], tmp))
    med = {k: statistics.median(v) for k, v in times.items()}
    for (name, cmd), v in sorted(med.items()):
        print(f"{name:6s} {cmd:6s} median {v:6.2f} s  (runs: {', '.join(f'{x:.2f}' for x in times[(name, cmd)])})")
    if args.other:
        for cmd in ("help", "train"):
            print(f"ratio other / this, {cmd}: {med[('other', cmd)] / med[('this', cmd)]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
