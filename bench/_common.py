"""Helpers shared by the training benchmarks (train_speed.py, scaling.py): data path, machine facts,
Markdown tables, process memory, seeded image subsets and the interleaving-friendly step iterator.

Not an entry point; the bench scripts import it as a sibling module (their folder is on sys.path when
they are run as ``python bench/<script>.py``).
"""

from __future__ import annotations

import datetime
import itertools
import os
import platform
import resource
import shlex
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from bloodcell.data.records import Item
from bloodcell.runtime import bf16_supported, cpuinfo, physical_cores

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"


def default_data() -> str:
    """$BLOODCELL_TEST_DATA/blood-cells, else ../shared/data/blood-cells next to the repository."""
    root = os.environ.get("BLOODCELL_TEST_DATA")
    base = Path(root) if root else ROOT.parent / "shared" / "data"
    return str(base / "blood-cells")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    return cpuinfo("model name") or platform.processor() or platform.machine()


def machine_info() -> dict:
    """What a timing depends on: CPU, cores, threads, library versions, date and the command run."""
    import torchvision

    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "torch_threads": torch.get_num_threads(),
        "native_bf16": bf16_supported(torch.device("cpu")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python " + shlex.join(sys.argv),
    }


def machine_md(info: dict) -> str:
    """The machine facts as a Markdown bullet list."""
    return "\n".join([
        f"- CPU: {info['cpu']} ({info['physical_cores']} physical cores, {info['logical_cpus']} logical CPUs; "
        f"native bf16: {'yes' if info['native_bf16'] else 'no'})",
        f"- torch {info['torch']}, torchvision {info['torchvision']}, numpy {info['numpy']}, "
        f"Python {info['python']}; torch threads: {info['torch_threads']}",
        f"- date: {info['date']}",
        f"- command: `{info['command']}`",
    ])


def md_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A Markdown table; ``align`` is one letter per column, l or r (default: first l, rest r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---" if a == "l" else "--:" for a in align]
    lines = [headers, sep, *[[str(c) for c in r] for r in rows]]
    return "\n".join("| " + " | ".join(r) + " |" for r in lines)


def proc_status_mb() -> dict[str, float]:
    """This process's resident memory now, in MB: total, anonymous and file-backed (/proc/self/status)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return out


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (getrusage ru_maxrss), in MB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def sample_items(items: list[Item], n: int, seed: int = 0) -> list[Item]:
    """A seeded, class-stratified sample of n items (all of them if n <= 0 or n >= len), in file order."""
    if n <= 0 or n >= len(items):
        return list(items)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_class[it.label].append(i)
    rng = np.random.default_rng(seed)
    quota = {c: len(ix) * n // len(items) for c, ix in by_class.items()}
    for c in sorted(by_class, key=lambda c: -len(by_class[c]))[: n - sum(quota.values())]:
        quota[c] += 1  # the rounding remainder goes to the largest classes
    keep = [i for c, ix in sorted(by_class.items()) for i in rng.permutation(ix)[: quota[c]]]
    return [items[i] for i in sorted(keep)]


def endless(loader):
    """The loader's batches epoch after epoch (set_epoch(1), 2, ...): one stream to take steps from."""
    for epoch in itertools.count(1):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader


def write_outputs(out_dir: str, stem: str, md: str, result: dict) -> Path:
    """Print the Markdown, write OUT/<stem>.md and .json; returns OUT/<stem> (no suffix)."""
    import json

    print()
    print(md)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    return out / stem
