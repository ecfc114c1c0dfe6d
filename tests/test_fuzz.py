"""Property-based tests of every input parser (Hypothesis), and the server against its own OpenAPI
schema (Schemathesis): whatever the input, a result or bloodcell's own error, never a traceback,
never an allocation the input's size does not bound, never a 5xx.

Bounded for CI: few examples each, derandomized (the same examples every run), so the file runs in
about half a minute. ``HYPOTHESIS_PROFILE=deep`` runs many more, randomised.
"""

from __future__ import annotations

import io
import os
import re
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from bloodcell.errors import BloodcellError, ConfigError

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("deep", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)  # inside this file's tests only: hypothesis reads it per test

FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP")


def image_bytes(fmt: str, w: int, h: int, mode: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    try:
        im.save(buf, format=fmt)
    except (OSError, KeyError, ValueError):  # a mode the format cannot hold: as RGB
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


@st.composite
def mangled_images(draw) -> bytes:
    """A small real image file of any format and mode, then truncated, bit-flipped or spliced."""
    data = bytearray(image_bytes(draw(st.sampled_from(FORMATS)), draw(st.integers(1, 40)),
                                 draw(st.integers(1, 40)), draw(st.sampled_from(["RGB", "L", "P", "RGBA", "1", "I"])),
                                 draw(st.integers(0, 9))))
    for _ in range(draw(st.integers(0, 4))):
        how = draw(st.sampled_from(["truncate", "flip", "insert"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if how == "truncate":
            del data[at:]
        elif how == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        else:
            data[at:at] = draw(st.binary(max_size=16))
    return bytes(data)


def png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, with a few bytes of pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# --- image decoding (data/images.py, through predict's decode_image, which serve uses too) --------


@given(data=st.one_of(st.binary(max_size=512), mangled_images()), size=st.sampled_from([32, 64]),
       resize=st.sampled_from(["squash", "crop", "pad", "cell", "cellfit"]))
def test_decoding_any_bytes_gives_an_image_or_an_image_error(data, size, resize):
    from bloodcell.inference.predict import ImageError, decode_image

    try:
        arr = decode_image(data, size, resize)
    except ImageError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert arr.shape == (size, size, 3) and arr.dtype == np.uint8


@given(w=st.integers(1, 2**31 - 1), h=st.integers(1, 2**31 - 1))
@settings(deadline=2000)  # refused from the header: no time (or memory) spent on the pixels
def test_a_huge_declared_size_is_refused_before_decoding(w, h):
    from bloodcell.data.images import MAX_PIXELS
    from bloodcell.inference.predict import ImageError, decode_image

    if w * h <= MAX_PIXELS:
        w = MAX_PIXELS // h + 1
        if w >= 2**31:
            return
    with pytest.raises(ImageError, match="too large|not an image|corrupt|truncated"):
        decode_image(png_header(w, h), 32)


@given(data=mangled_images())
def test_a_file_on_disk_decodes_as_its_bytes_do(data):
    from bloodcell.inference.predict import ImageError, decode_image

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "cell é.png"
        p.write_bytes(data)
        try:
            from_bytes = decode_image(data, 32)
        except ImageError as e:
            with pytest.raises(ImageError) as again:
                decode_image(str(p), 32)
            assert again.value.kind == e.kind
            return
        assert np.array_equal(decode_image(str(p), 32), from_bytes)


# --- layout discovery (data/layouts.py) on generated folder trees ---------------------------------

NAMES = st.sampled_from(["train", "TRAIN", "val", "test", "TEST_SIMPLE", "images", "dataset2-master", "0", "1",
                         "12345", "alpha", "Beta", "beta", "é cellule", "血", " ", ".hidden", "a.png", "x.csv"])
FILES = st.sampled_from(["cell.png", "c_1_2.jpeg", "b.JPG", "n.bmp", "t.tif", "notes.txt", ".DS_Store",
                         "label.csv", "data.npz", "empty.png", "x y é.png", "12_idx5_x1_y1_class0.png"])


@st.composite
def trees(draw) -> list[tuple[str, str]]:
    """Up to 30 (relative path, content kind) pairs, up to 4 folders deep."""
    out = []
    for _ in range(draw(st.integers(0, 30))):
        parts = draw(st.lists(NAMES, min_size=0, max_size=4))
        out.append(("/".join([*parts, draw(FILES)]), draw(st.sampled_from(["image", "empty", "junk", "image"]))))
    return out


@given(tree=trees(), group_by=st.sampled_from(["auto", "file", "similar", "none"]))
def test_discovery_of_any_folder_tree_is_a_source_or_a_data_error(tree, group_by):
    from bloodcell.data.layouts import discover, raise_if_fatal

    png = image_bytes("PNG", 8, 8, "RGB", 0)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "data"
        root.mkdir()
        for rel, kind in tree:
            p = root / rel
            if p.parent.exists() and not p.parent.is_dir() or p.is_dir():
                continue  # a file already sits where this path wants a folder
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                continue
            p.write_bytes({"image": png + rel.encode(), "empty": b"", "junk": b"junk " + rel.encode()}[kind])
        try:
            src = discover(root, group_by=group_by)
            raise_if_fatal(src)
        except BloodcellError as e:
            assert str(e) and "\n" not in str(e).strip()
            return
        for it in src.items:
            assert Path(it.path).is_file() and Path(it.path).resolve().is_relative_to(root.resolve())
            assert 0 <= it.label < len(src.classes)


# --- config and space files (config.py, tune/space.py) --------------------------------------------

VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                      | st.text(max_size=20), lambda v: st.lists(v, max_size=4)
                      | st.dictionaries(st.text(max_size=8), v, max_size=3), max_leaves=8)


def field_names() -> list[str]:
    from dataclasses import fields

    from bloodcell.config import TrainConfig

    return [f.name for f in fields(TrainConfig)]


KEYS = st.one_of(st.sampled_from(field_names()), st.sampled_from([n.replace("_", "-") for n in field_names()]),
                 st.text(max_size=12))


@pytest.mark.slow
@given(d=st.dictionaries(KEYS, VALUES, max_size=6))
def test_make_config_takes_any_mapping_or_says_why_not(d):
    from bloodcell.config import TrainConfig, make_config

    try:
        cfg = make_config(TrainConfig, d)
    except ConfigError as e:
        assert str(e).strip() and "\n" not in str(e).strip()
        return
    assert make_config(TrainConfig, cfg.to_dict()) == cfg  # what it accepts, it saves and reads back


@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
                      st.dictionaries(KEYS, VALUES, max_size=5).map(lambda d: __import__("yaml").safe_dump(d))),
       raw=st.binary(max_size=64))
@example(text="1: 2\n", raw=b"null: x\n")  # found by the fuzzer: a key that is not a string
@example(text="? [a, b]\n: 1\n", raw=b"\xff\xfe")
def test_a_yaml_file_of_anything_is_a_mapping_or_a_config_error(text, raw):
    from bloodcell.config import TrainConfig, load_yaml, make_config

    with tempfile.TemporaryDirectory() as d:
        for body in (text.encode("utf-8", "surrogatepass"), raw):
            p = Path(d) / "c.yaml"
            p.write_bytes(body)
            try:
                data = load_yaml(p)
                make_config(TrainConfig, data)
            except ConfigError as e:
                assert str(e).strip() and "\n" not in str(e).strip()
                continue
            assert isinstance(data, dict)


SPEC = st.one_of(VALUES, st.fixed_dictionaries({}, optional={
    "choices": st.lists(VALUES, max_size=4), "low": VALUES, "high": VALUES, "log": VALUES, "step": VALUES}))


@pytest.mark.slow
@given(space=st.dictionaries(KEYS, SPEC, max_size=4), model=st.sampled_from(["cnn4x32", "resnet18", "vgg3"]))
@example(space={1: 2}, model="cnn4x32")  # a YAML space file may have a non-string key
def test_load_space_takes_any_space_or_says_why_not(space, model):
    from bloodcell.tune.space import Choice, Range, load_space

    try:
        out = load_space(space, model)
    except ConfigError as e:
        assert str(e).strip() and "\n" not in str(e).strip()
        return
    for v in out.values():
        if isinstance(v, Range):
            assert v.low <= v.high
        if isinstance(v, Choice):
            assert len(v.values) >= 1


@given(items=st.lists(st.one_of(st.text(max_size=30), st.builds(lambda k, v: f"{k}={v}", KEYS, st.text(max_size=20))),
                      max_size=4))
def test_parse_grid_takes_any_item_list_or_says_why_not(items):
    from bloodcell.tune.space import parse_grid

    try:
        grid = parse_grid(items)
    except ConfigError as e:
        assert str(e).strip() and "\n" not in str(e).strip()
        return
    assert all(isinstance(v, list) and v for v in grid.values())


# --- the command line: generated argv, the library's heavy functions replaced ----------------------


class Reached(Exception):
    """The CLI handed a checked config to the library: argument handling ended well."""


LIBRARY = [("bloodcell.training.train", "train"), ("bloodcell.training.evaluate", "evaluate_checkpoint"),
           ("bloodcell.studies.compare", "compare"), ("bloodcell.studies.lab_out", "crosslab"), ("bloodcell.tune", "tune"),
           ("bloodcell.tune", "tune_report"), ("bloodcell.report", "build_report"),
           ("bloodcell.inference.predict", "Predictor"), ("bloodcell.inference.export", "export_model"),
           ("bloodcell.serve.app", "create_app"), ("bloodcell.data.check", "check_data")]


@pytest.fixture
def no_work(monkeypatch):
    import importlib

    def reached(*a, **k):
        raise Reached

    modules = {mod: importlib.import_module(mod) for mod, _ in LIBRARY}  # all imported, then replaced
    for mod, name in LIBRARY:
        monkeypatch.setattr(modules[mod], name, reached)


def command_flags() -> dict[str, list[str]]:
    """Every command path (['tune', 'report'], ...) and its option strings, from the parser itself."""
    import argparse

    from bloodcell.cli import build_parser

    out: dict[str, list[str]] = {}

    def walk(p, path):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        flags = [s for a in p._actions for s in a.option_strings if s not in ("-h", "--help", "--version")]
        if path:
            out[" ".join(path)] = flags
        for a in subs:
            for name, sp in a.choices.items():
                walk(sp, [*path, name])

    walk(build_parser(), [])
    return out


COMMANDS = {k: v for k, v in command_flags().items() if k not in ("models", "data", "serve")}
TOKENS = st.one_of(st.sampled_from(["0", "-1", "1e999", "nan", "inf", "", " ", "synthetic:10", "x,y", "a=b", "--",
                                    "-", "cnn4x32", "é", "/nonexistent", "1,2,3", "true", "None"]),
                   st.text(max_size=12), st.integers(-10**20, 10**20).map(str))


@st.composite
def argvs(draw) -> list[str]:
    cmd = draw(st.sampled_from(sorted(COMMANDS)))
    argv = cmd.split()
    flags = COMMANDS[cmd]
    for _ in range(draw(st.integers(0, 6))):
        if flags and draw(st.booleans()):
            argv.append(draw(st.sampled_from(flags)))
        argv.append(draw(TOKENS))
    return argv


@given(argv=argvs())
def test_any_argv_is_a_usage_error_one_line_or_a_library_call(argv, no_work, capsys):
    from bloodcell.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: usage and one error line, exit 2
        err = capsys.readouterr().err
        assert e.code == 2 and "Traceback" not in err and re.search(r"^bloodcell[a-z ]*: error: ", err, re.M), err
        return
    except Reached:
        return
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2) and err and err[-1].startswith("bloodcell: error: "), (argv, err)


# --- the server against its own OpenAPI schema (Schemathesis) --------------------------------------

schemathesis = pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    from conftest import quiet, tiny

    from bloodcell.serve.app import create_app
    from bloodcell.training.train import train

    run = tmp_path_factory.mktemp("served") / "run"
    train(tiny(epochs=1), run, log=quiet, progress=False)
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(run))


# Schemathesis's own pytest plugin (schema.parametrize) does not run under pytest 9; each operation's
# strategy drives a Hypothesis test directly instead, which is what the plugin does. Every operation
# the schema lists is tested, so a new endpoint is covered without a change here.


@pytest.mark.slow
def test_the_api_answers_every_request_its_schema_allows(api_schema):
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    ops = [r.ok() for r in api_schema.get_all_operations()]
    assert len(ops) >= 4 and any(op.method.upper() == "POST" for op in ops)
    for op in ops:
        @given(case=op.as_strategy())
        @settings(max_examples=25 if PROFILE == "ci" else 500, deadline=None, derandomize=PROFILE == "ci",
                  database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call()
            assert response.status_code < 500, (case.method, case.path, response.status_code,
                                                response.text[:300])
            # positive_data_acceptance left out: the schema can say "a binary file", not "an image",
            # so a schema-valid upload of random bytes is rightly refused (415/422, documented)
            case.validate_response(response, excluded_checks=[positive_data_acceptance])

        check()


# --- every numeric flag of every command: its range, whatever the value ----------------------------


def numeric_options() -> list[tuple[list[str], str, object]]:
    """(argv that reaches the flag: the command and its required arguments, the flag, its Range) for
    every option of every command whose value is a number: an argparse type with a range (cli.flags
    .bounded) or a TrainConfig field with one (the config flags)."""
    import argparse

    from bloodcell.cli import build_parser
    from bloodcell.config import field_range

    out = []

    def walk(p, path):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        base = list(path)
        for a in p._actions:
            if a.required and a.option_strings:
                base += [a.option_strings[0], "synthetic"]
        base += ["x" for a in p._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
                 and a.nargs not in ("?", "*")]
        for a in p._actions:
            if not a.option_strings or a.required:
                continue
            rng = getattr(a.type, "range", None)
            if rng is None and a.type is None and a.dest != "help":
                try:
                    rng = field_range(a.dest)
                except StopIteration:
                    rng = None
            if a.type in (int, float):  # a number with no range: the fault this test is for
                out.append((base, a.option_strings[0], None))
            elif rng is not None:
                out.append((base, a.option_strings[0], rng))
        for a in subs:
            for name, sp in a.choices.items():
                walk(sp, [*path, name])

    walk(build_parser(), [])
    return out


NUMERIC = numeric_options()


def test_every_numeric_flag_has_a_range():
    assert len(NUMERIC) > 60 and not [(argv[0], flag) for argv, flag, rng in NUMERIC if rng is None]


def outside(rng):
    """Values no range of this project holds, and the ones just outside this range."""
    bad = st.sampled_from(["nan", "-nan", "inf", "-inf", "1e999", "true", "", "x", "0x10"])
    edges = [v for v in (rng.lo - 1 if rng.lo is not None else None, rng.hi + 1 if rng.hi is not None else None,
                         rng.lo if "lo" in rng.open or rng.open == "both" else None,
                         rng.hi if "hi" in rng.open or rng.open == "both" else None) if v is not None]
    far = st.one_of(st.floats(max_value=rng.lo, exclude_max=True, allow_nan=False) if rng.lo is not None
                    else st.nothing(),
                    st.floats(min_value=rng.hi, exclude_min=True, allow_nan=False) if rng.hi is not None
                    else st.nothing())
    return st.one_of(bad, st.sampled_from(edges).map(repr) if edges else st.nothing(), far.map(repr))


@st.composite
def bad_numbers(draw):
    argv, flag, rng = draw(st.sampled_from([o for o in NUMERIC if o[2] is not None]))
    return argv, flag, draw(outside(rng))


@pytest.mark.slow
@settings(max_examples=300 if PROFILE == "ci" else 3000)
@given(case=bad_numbers())
@example(case=(["train"], "--lr", "1e300"))
@example(case=(["serve", "x"], "--port", "70000"))
@example(case=(["tune"], "--timeout", "-1"))
def test_a_number_outside_its_flag_s_range_is_refused_before_any_work(case, no_work, capsys, tmp_path):
    """Whatever the command, a value outside a numeric flag's range never reaches the library: argparse's
    usage and one error line naming the flag, or bloodcell's one line naming it, exit 2."""
    from bloodcell.cli import main

    argv, flag, value = case
    argv = [str(tmp_path / "o") if a == "x" and argv[0] in ("adapt",) else a for a in argv]
    if argv[0] in ("train", "compare", "crosslab"):
        argv += ["--out", str(tmp_path / "o")]
    capsys.readouterr()
    try:
        code = main([*argv, f"{flag}={value}"])
    except SystemExit as e:
        err = capsys.readouterr().err
        assert e.code == 2 and "Traceback" not in err and f"argument {flag}: " in err, (argv, flag, value, err)
        return
    except Reached:
        raise AssertionError(f"{flag}={value} reached the library") from None
    err = capsys.readouterr().err.strip().splitlines()
    # compare without --data says first that it runs the demo; the error is the last line, and the only one
    assert code == 2 and err and sum(line.startswith("bloodcell: error: ") for line in err) == 1 \
        and flag.lstrip("-").replace("-", "_") in err[-1] and "Traceback" not in "".join(err), (argv, flag, value, err)
