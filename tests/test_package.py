"""The package's own rules: no side effect at import, the command line a layer no library module uses."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import bloodcell

SRC = Path(bloodcell.__file__).parent


def _modules() -> list[str]:
    return sorted("bloodcell." + ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
                  for p in SRC.rglob("*.py") if p.name != "__main__.py")


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
