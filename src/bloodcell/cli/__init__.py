"""bloodcell: train, compare, tune and serve CNNs for blood-cell image classification.

Usage:
    bloodcell compare --out runs/compare            # the main job (built-in synthetic data)
    bloodcell compare --data PATH --out runs/mine   # ... on your images
    bloodcell train --data PATH --model cnn4x32 --epochs 10 --out runs/cnn4x32
    bloodcell evaluate runs/cnn4x32 --data PATH
    bloodcell count SLIDE_FOLDER --out counts       # a differential from whole fields
    bloodcell review counts                         # correct the cells' types in a web page
    bloodcell data check PATH
    bloodcell models
"""

from __future__ import annotations

import argparse
import os
import sys

from bloodcell import __version__
from bloodcell.cli import (
    adapt,
    compare,
    count,
    crosslab,
    data,
    detector,
    evaluate,
    export,
    gate,
    models,
    predict,
    report,
    review,
    serve,
    train,
    tune,
)
from bloodcell.cli.flags import names_as_bytes
from bloodcell.errors import BloodcellError

# The order of the commands in `bloodcell --help`.
COMMANDS = (train, evaluate, adapt, gate, data, models, compare, crosslab, report, tune, predict, count, review, detector,
            export, serve)


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    ap = argparse.ArgumentParser(prog="bloodcell", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Run 'bloodcell COMMAND --help' for a command's options.")
    ap.add_argument("--version", action="version", version=f"bloodcell {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and turn a BloodcellError into one line and exit code 2."""
    ap = build_parser()
    args = ap.parse_args(argv)
    names_as_bytes()  # a file or class name that is not UTF-8 prints as its bytes, in every command
    try:
        return _run(args, ap)
    except BrokenPipeError:  # `bloodcell ... | head`: the reader has gone, which is no error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _run(args, ap) -> int:
    """Run the parsed command: a BloodcellError, ValueError or OSError becomes one line and exit 2."""
    if not getattr(args, "func", None):
        ap.print_help()
        return 0 if args.command is None else 2
    if getattr(args, "own_signals", False):
        # serve has its own graceful shutdown, and serving an .onnx file loads no torch
        try:
            return args.func(args) or 0
        except (BloodcellError, ValueError) as e:
            print(f"bloodcell: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # before the server's own handlers are in place
            print("bloodcell: interrupted", file=sys.stderr)
            return 130
    if "WORLD_SIZE" in os.environ:  # one process of several: c10d's C++ log would repeat, per process and
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")  # at length, what the one line below says
    # lazy: start-up (runtime loads torch); `--help` and a bad flag have returned by now
    from bloodcell.runtime import exit_code, stop_between_batches, stopped_by
    from bloodcell.training.distributed import env_world, speaks

    try:
        # SIGINT and SIGTERM alike stop at the next batch (a second one at once)
        with stop_between_batches():
            return args.func(args) or 0
    except BloodcellError as e:
        if speaks(_world(env_world), e):  # once for a run of several processes, not once per process
            print(f"bloodcell: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a library function's argument check, e.g. an unknown model name
        print(f"bloodcell: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise
    except OSError as e:  # a path the checks before the work could not foresee: a full disk, a race
        from bloodcell.runfiles import os_error_line  # lazy: start-up

        print(f"bloodcell: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if not speaks(_world(env_world), e):
            return exit_code(e)
        print(f"bloodcell: {stopped_by(e)}; finished epochs are saved: 'train --resume RUN_DIR', the same "
              "'compare' command, or 'tune --resume DIR' continues", file=sys.stderr)
        return exit_code(e)


def _world(env_world):
    """This process's place in a run of several (one process where the environment is unusable)."""
    from bloodcell.errors import BloodcellError

    try:
        return env_world()
    except BloodcellError:
        from bloodcell.training.distributed import ONE  # lazy, as the caller's imports

        return ONE


if __name__ == "__main__":
    sys.exit(main())
