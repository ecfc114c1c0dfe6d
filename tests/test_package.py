"""The package's own rules: no side effect at import, the command line a layer no library module uses."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import bloodcell

SRC = Path(bloodcell.__file__).parent


def _modules() -> list[str]:
    return sorted("bloodcell." + ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
                  for p in SRC.rglob("*.py") if p.name != "__main__.py")


@pytest.mark.slow
def test_no_library_module_imports_the_cli() -> None:
    offenders = []
    for p in SRC.rglob("*.py"):
        rel = p.relative_to(SRC)
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{rel}: {n}" for n in names if n == "bloodcell.cli" or n.startswith("bloodcell.cli.")]
    assert offenders == []


@pytest.mark.slow
def test_importing_every_module_changes_no_global_state() -> None:
    # A fresh interpreter: Pillow's pixel limit and matplotlib's backend as a caller set them.
    code = (
        "import matplotlib; matplotlib.use('svg'); from PIL import Image; Image.MAX_IMAGE_PIXELS = 1234\n"
        "import importlib\n"
        f"for m in {_modules()!r}: importlib.import_module(m)\n"
        "print(Image.MAX_IMAGE_PIXELS, matplotlib.get_backend())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1234", "svg"]


def test_help_answers_without_loading_torch() -> None:
    code = ("import sys; from bloodcell.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_python_m_bloodcell_is_the_command() -> None:
    r = subprocess.run([sys.executable, "-m", "bloodcell", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"bloodcell {bloodcell.__version__}"


# The floors of the package, lowest first: a module imports only its own room or a lower floor, so
# every arrow runs down (docs/design.md draws them). The top-level modules are the ground floor.
FLOORS = (("ground",), ("data",), ("models",), ("training",), ("inference",), ("report",),
          ("studies", "serve"), ("tune",), ("cli",))
FLOOR = {room: k for k, rooms in enumerate(FLOORS) for room in rooms}


def _imports() -> dict[str, set[str]]:
    """Module -> the bloodcell modules it imports (at the top or inside a function)."""
    out: dict[str, set[str]] = {}
    known = set(_modules())
    for p in SRC.rglob("*.py"):
        if p.name == "__main__.py":
            continue
        mod = "bloodcell." + ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                         for a in node.names}
        out[mod] = {d for d in deps if d in known and d != mod and d != "bloodcell"}
    return out


def _room(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 2 or (SRC / parts[1]).is_dir() else "ground"


def test_every_import_runs_down_the_floors() -> None:
    assert {_room(m) for m in _modules() if m != "bloodcell"} == set(FLOOR)
    up = [f"{m} -> {d}" for m, deps in _imports().items() for d in deps
          if _room(d) != _room(m) and FLOOR[_room(d)] >= FLOOR[_room(m)]]
    assert up == []


def test_no_import_circle() -> None:
    graph = _imports()
    done: set[str] = set()

    def visit(mod: str, path: tuple[str, ...]) -> list[str]:
        if mod in path:
            return [" -> ".join(path[path.index(mod):] + (mod,))]
        if mod in done:
            return []
        found = [c for d in sorted(graph.get(mod, ())) for c in visit(d, path + (mod,))]
        done.add(mod)
        return found

    circles = [c for m in sorted(graph) for c in visit(m, ())]
    assert circles == []
