"""Every command's path flags: a file where a folder is expected and the reverse, a missing path, a
folder that cannot be written, a full disk, names with spaces and non-ASCII letters. Each bad case
is one line on stderr and a non-zero exit, never a traceback, and nothing already written is lost."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import quiet, tiny, write_image

from bloodcell.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run folder (best.pt and all)."""
    from bloodcell.training.train import train

    run = tmp_path_factory.mktemp("trained") / "run"
    train(tiny(epochs=1), run, log=quiet, progress=False)
    return run


@pytest.fixture
def places(tmp_path, trained) -> dict:
    """The paths a row may name: {file}, {dir} (an empty folder), {missing}, {run}, {img}."""
    f = tmp_path / "a file"
    f.write_text("not a folder\n")
    d = tmp_path / "a folder"
    d.mkdir()
    img = write_image(tmp_path / "cell.png")
    return {"file": str(f), "dir": str(d), "missing": str(tmp_path / "missing"), "run": str(trained),
            "img": str(img)}


T = ["--data", "synthetic:96", "--image-size", "32", "--epochs", "1", "--batch-size", "16", "--threads", "1",
     "--quiet"]

# (argv, a phrase of the one error line); {name} is a path of `places` (or {ro}: unwritable_dir)
ROWS = [
    (["compare", "--models", "cnn2x32", *T, "--out", "{file}"], "is a file, not a folder"),
    (["compare", "--models", "cnn2x32", *T, "--out", "{file}/sub"], "is a file, not a folder"),
    (["compare", "--models", "cnn2x32", *T, "--config", "{dir}"], "is a folder, not a YAML file"),
    (["compare", "--models", "cnn2x32", *T, "--config", "{missing}"], "config file not found"),
    (["compare", "--models", "cnn2x32", "--data", "{file}"], "data path is a file"),
    (["compare", "--models", "cnn2x32", "--data", "{missing}"], "data path does not exist"),
    (["compare", "--models", "cnn2x32", *T, "--cache-dir", "{file}", "--out", "{dir}/c"], "cache folder"),
    (["crosslab", "--data", "synthetic:96", "--data", "synthetic:80", "--out", "{file}"], "is a file"),
    (["crosslab", "--config", "{dir}", "--out", "{dir}/x"], "is a folder, not a YAML file"),
    (["train", *T, "--out", "{file}"], "is a file, not a folder"),
    (["train", *T, "--out", "{file}/run"], "is a file, not a folder"),
    (["train", "--resume", "{file}"], "holds no run to resume"),
    (["train", "--resume", "{missing}"], "holds no run to resume"),
    (["train", *T, "--config", "{dir}"], "is a folder, not a YAML file"),
    (["train", *T, "--config", "{missing}"], "config file not found"),
    (["train", "--data", "{file}", "--out", "{dir}/r"], "data path is a file"),
    (["train", *T, "--weights", "{dir}", "--out", "{dir}/r"], "{dir}"),
    (["train", *T, "--weights", "{missing}", "--out", "{dir}/r"], "{missing}"),
    (["train", *T, "--init-from", "{file}", "--out", "{dir}/r"], "not a readable checkpoint"),
    (["train", *T, "--init-from", "{missing}", "--out", "{dir}/r"], "checkpoint not found"),
    (["train", *T, "--cache-dir", "{file}", "--out", "{dir}/r"], "cache folder"),
    (["train", *T, "--extra-train", "{file}", "--out", "{dir}/r"], "data path is a file"),
    (["evaluate", "{file}", "--data", "synthetic:96"], "not a readable checkpoint"),
    (["evaluate", "{dir}", "--data", "synthetic:96"], "no checkpoint"),
    (["evaluate", "{missing}", "--data", "synthetic:96"], "checkpoint not found"),
    (["evaluate", "{run}", "--data", "{missing}"], "data path does not exist"),
    (["evaluate", "{run}", "--data", "synthetic:96", "--out", "{file}"], "is a file, not a folder"),
    (["evaluate", "{run}", "--data", "synthetic:96", "--cache-dir", "{file}"], "cache folder"),
    (["data", "check", "{file}"], "data path is a file"),
    (["data", "check", "{missing}"], "data path does not exist"),
    (["report", "{file}"], "holds no results.json"),
    (["report", "{dir}"], "holds no results.json"),
    (["tune", "--trials", "1", "--out", "{file}"], "is a file, not a folder"),
    (["tune", "--trials", "1", "--out", "{dir}/t", "--space", "{dir}"], "is a folder, not a YAML file"),
    (["tune", "--trials", "1", "--out", "{dir}/t", "--space", "{missing}"], "config file not found"),
    (["tune", "--trials", "1", "--out", "{dir}/t", "--config", "{dir}"], "is a folder, not a YAML file"),
    (["tune", "--trials", "1", "--out", "{dir}/t", "--data", "{missing}"], "data path does not exist"),
    (["tune", "--trials", "1", "--out", "{dir}/t", "--storage", "sqlite:///{file}/x.db"], "cannot open storage"),
    (["tune", "--trials", "1", "--out", "{dir}/t", "--cache-dir", "{file}"], "--cache-dir"),
    (["tune", "--resume", "{file}"], "--resume"),
    (["tune", "--resume", "{missing}"], "holds no study"),
    (["tune", "report", "{file}"], "holds no study"),
    (["predict", "{missing}.pt", "{img}"], "checkpoint not found"),
    (["predict", "{run}"], "give the images to predict after the model"),
    (["predict", "{run}", "{img}", "--cam", "{file}"], "--cam"),
    (["export", "{missing}"], "checkpoint not found"),
    (["export", "{run}", "--out", "{dir}"], "is a folder, not a file name"),
    (["export", "{run}", "--out", "{file}/m.onnx"], "is a file, not a folder"),
    (["serve", "{file}"], "not a readable checkpoint"),
    (["serve", "{missing}"], "checkpoint not found"),
]

UNWRITABLE = [
    ["compare", "--models", "cnn2x32", *T, "--out", "{ro}/c"],
    ["crosslab", "--data", "synthetic:96", "--data", "synthetic:80", "--out", "{ro}/x"],
    ["train", *T, "--out", "{ro}/r"],
    ["train", *T, "--cache-dir", "{ro}/cache", "--out", "{dir}/r"],
    ["evaluate", "{run}", "--data", "synthetic:96", "--out", "{ro}/e"],
    ["tune", "--trials", "1", "--out", "{ro}/t"],
    ["tune", "--trials", "1", "--out", "{dir}/t", "--cache-dir", "{ro}/cache"],
    ["predict", "{run}", "{img}", "--cam", "{ro}/cams"],
    ["export", "{run}", "--out", "{ro}/m.onnx"],
]


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """main(argv): its exit code and stderr's lines."""
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def fill(argv: list[str], places: dict) -> list[str]:
    return [a.format(**places) for a in argv]


def snapshot(*roots: str) -> dict[str, bytes]:
    """Every file under the roots, with its bytes."""
    out = {}
    for r in roots:
        for p in Path(r).rglob("*") if Path(r).is_dir() else [Path(r)]:
            if p.is_file():
                out[str(p)] = p.read_bytes()
    return out


@pytest.mark.parametrize("argv, needle", ROWS, ids=[" ".join(a[:1] + [x for x in a if "{" in x]) + f" #{i}"
                                                    for i, (a, _) in enumerate(ROWS)])
@pytest.mark.slow
def test_a_bad_path_is_one_line_and_changes_nothing(argv, needle, places, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # rows without --out use the default (runs/...): not the checkout's own
    before = snapshot(places["file"], places["dir"], places["run"])
    code, err = run_cli(fill(argv, places), capsys)
    assert code != 0 and len(err) == 1, err
    assert err[0].startswith("bloodcell: error: ") and needle.format(**places) in err[0], err
    assert snapshot(places["file"], places["dir"], places["run"]) == before  # nothing written, nothing lost
    assert not Path(places["missing"]).exists()


@pytest.mark.parametrize("argv", UNWRITABLE, ids=lambda a: " ".join(a[:1] + [x for x in a if "{ro}" in x]))
def test_an_unwritable_folder_is_one_line(argv, places, unwritable_dir, capsys):
    code, err = run_cli(fill(argv, {**places, "ro": str(unwritable_dir)}), capsys)
    assert code == 2 and len(err) == 1, err
    assert "cannot write in" in err[0] and str(unwritable_dir) in err[0], err


def test_an_unreadable_input_image_is_a_row_and_a_non_zero_exit(places, capsys):
    code = main(["predict", places["run"], places["missing"] + ".png", places["img"], "--format", "csv"])
    out, err = capsys.readouterr()
    assert code == 1 and "1 predicted, 1 failed" in err and "Traceback" not in err
    assert "missing.png" in out and "not found" in out.lower()


@pytest.mark.slow
def test_a_full_disk_keeps_what_was_written(small_disk, capsys, places):
    """compare into a disk that fills up: the new model's run fails with one line, the finished
    results and checkpoint stay whole, no temporary file is left; with space again the rerun ends."""
    out = small_disk.path / "cmp"
    base = ["compare", *T, "--no-report", "--out", str(out)]
    assert run_cli([*base, "--models", "cnn2x32"], capsys)[0] == 0
    kept = snapshot(str(out / "results.json"), str(out / "results.csv"), str(out / "runs" / "cnn2x32"))
    small_disk.fill(left=16 * 1024)  # room for the small files, not for a checkpoint
    code, err = run_cli([*base, "--models", "cnn2x32,cnn2x32@b"], capsys)
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert snapshot(str(out / "results.json"), str(out / "results.csv"), str(out / "runs" / "cnn2x32")) == kept
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".best.pt")]
    small_disk.free()
    assert run_cli([*base, "--models", "cnn2x32,cnn2x32@b"], capsys)[0] == 0
    rows = json.loads((out / "results.json").read_text())["models"]
    assert [r["model"] for r in rows] == ["cnn2x32", "cnn2x32@b"]


@pytest.mark.slow
def test_a_full_disk_during_a_cache_build_is_one_line(small_disk, tmp_path, class_folders):
    """The decoded cache is a memory map: without its blocks reserved, a full disk is a SIGBUS that
    kills the process (on a tmpfs); with them, one line. Run in a child process for that reason."""
    import subprocess
    import sys
    import textwrap

    small_disk.fill(left=4096)
    src = Path(__file__).parent.parent / "src"
    if small_disk.real:
        code = textwrap.dedent(f"""
            import sys
            from bloodcell.cli import main
            sys.exit(main(["train", "--data", {str(class_folders)!r}, "--image-size", "64", "--epochs", "1",
                           "--threads", "1", "--quiet", "--cache-dir", {str(small_disk.path / "cache")!r},
                           "--out", {str(tmp_path / "r")!r}]))
        """)
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(src)})
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1 and "No space left on device" in err[0], p.stderr[-2000:]
    else:
        from bloodcell.data.cache import build_cache
        from bloodcell.data.layouts import discover

        with pytest.raises(OSError) as e:
            build_cache(discover(class_folders).items, 64, cache_dir=small_disk.path / "cache", workers=1)
        assert e.value.errno == 28
    assert not list((small_disk.path / "cache").glob("*.npy"))  # no half cache a later run would read


@pytest.mark.slow
def test_names_with_spaces_and_other_letters(tmp_path, capsys):
    """Data, run folder, export and Grad-CAM output under paths with spaces and non-ASCII letters."""
    root = tmp_path / "données cellules 血液"
    for c, cls in enumerate(("éosinophile", "лимфоцит")):
        for i in range(24):
            write_image(root / cls / f"cellule n° {i}.png", color=(120 * c, 90, 200 - 100 * c), seed=c * 50 + i)
    run = tmp_path / "run été"
    assert run_cli(["train", "--data", str(root), "--model", "cnn2x32", "--image-size", "32", "--epochs", "1",
                    "--threads", "1", "--quiet", "--out", str(run)], capsys)[0] == 0
    assert json.loads((run / "metrics.json").read_text())["test"]["n"] > 0
    onnx = tmp_path / "modèle exporté.onnx"
    assert run_cli(["export", str(run), "--out", str(onnx)], capsys)[0] == 0 and onnx.stat().st_size > 0
    cams = tmp_path / "cartes Grad-CAM"
    img = next(root.glob("лимфоцит/*.png"))
    capsys.readouterr()
    assert main(["predict", str(run), str(img), "--cam", str(cams), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["path"] == str(img) and rows[0]["class"] in ("éosinophile", "лимфоцит")
    assert list(cams.glob("*.png"))
