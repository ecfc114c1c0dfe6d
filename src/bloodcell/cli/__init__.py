"""bloodcell: train, compare, tune and serve CNNs for blood-cell image classification.

Usage:
    bloodcell compare --out runs/compare            # the main job (built-in synthetic data)
    bloodcell compare --data PATH --out runs/mine   # ... on your images
    bloodcell train --data PATH --model cnn4x32 --epochs 10 --out runs/cnn4x32
    bloodcell evaluate runs/cnn4x32 --data PATH
    bloodcell data check PATH
    bloodcell models
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from bloodcell import __version__
from bloodcell.cli import compare, data, predict, train, tune
from bloodcell.errors import BloodcellError

# The order of the commands in `bloodcell --help`.
COMMANDS = (train, data, compare, tune, predict)


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
    if not getattr(args, "func", None):
        ap.print_help()
        return 0 if args.command is None else 2
    # lazy: start-up (runtime loads torch); `--help` and a bad flag have returned by now
    from bloodcell.runtime import exit_code, stop_between_batches, stopped_by

    # SIGINT and SIGTERM alike stop at the next batch (a second one at once); serve has its own
    # graceful shutdown
    guard = contextlib.nullcontext() if getattr(args, "own_signals", False) else stop_between_batches()
    try:
        with guard:
            return args.func(args) or 0
    except BloodcellError as e:
        print(f"bloodcell: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a library function's argument check, e.g. an unknown model name
        print(f"bloodcell: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the checks before the work could not foresee: a full disk, a race
        from bloodcell.runfiles import os_error_line  # lazy: start-up

        print(f"bloodcell: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"bloodcell: {stopped_by(e)}; finished epochs are saved: 'train --resume RUN_DIR', the same "
              "'compare' command, or 'tune --resume DIR' continues", file=sys.stderr)
        return exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
