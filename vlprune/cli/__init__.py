"""The `vlprune` command line: `vlprune run` answers a question about an image; `vlprune methods` lists pruners.

One module per command (:mod:`~vlprune.cli.run`, :mod:`~vlprune.cli.evaluate`, :mod:`~vlprune.cli.calibrate`,
:mod:`~vlprune.cli.sweep`, :mod:`~vlprune.cli.report`, :mod:`~vlprune.cli.bench`, :mod:`~vlprune.cli.methods`,
:mod:`~vlprune.cli.serve`): each adds its parser and runs it; :mod:`~vlprune.cli.options` holds what they share (the
one-line parser errors, the argparse types, --model, --device and --dtype, the method settings). This module builds
the parser and dispatches.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from vlprune.api import DEFAULT_MODEL
from vlprune.cli import bench, calibrate, evaluate, methods, report, run, serve, sweep
from vlprune.cli.options import COMPILE_HELP, _Parser
from vlprune.cli.options import _option as _option  # where tests and users found it before the split
from vlprune.errors import VlpruneError
from vlprune.kernels import kernel_setting

__all__ = ["COMPILE_HELP", "DEFAULT_MODEL", "build_parser", "main"]

# The commands' entry points under the names they had when the command line was one module; main() looks them up
# here when it runs, so that replacing one on vlprune.cli (as tests do with _methods) reaches it.
_run = run.execute
_eval = evaluate.execute
_calibrate = calibrate.execute
_sweep = sweep.execute
_report = report.execute
_bench = bench.execute
_methods = methods.list_methods
_serve = serve.execute


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vlprune", description="Visual-token pruning for vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    # DEFAULT_MODEL is read here, when the parser is built, so that setting vlprune.cli.DEFAULT_MODEL changes it.
    for command in (run, evaluate, calibrate, sweep, report, bench, methods, serve):
        command.add_parser(commands, DEFAULT_MODEL)
    return parser


def _close_progress_bars() -> None:
    """Close the progress bars a failed command left open (its own bars close themselves; a library's may not), so
    that the error line starts on a line of its own instead of after a bar's last state: a closed bar ends its line."""
    std = sys.modules.get("tqdm.std")
    if std is None:  # no bar was ever made
        return
    for bar in list(std.tqdm._instances):  # tqdm's registry of the bars not closed yet (its subclasses' too)
        with contextlib.suppress(ValueError, OSError):  # a bar whose stream is gone must not hide the error
            bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    commands = {
        "run": _run,
        "eval": _eval,
        "calibrate": _calibrate,
        "sweep": _sweep,
        "report": _report,
        "bench": _bench,
        "methods": lambda _: _methods(),
        "serve": _serve,
    }
    try:
        args = build_parser().parse_args(argv)
        kernel_setting()  # a bad VLPRUNE_KERNELS fails here, not inside the first generation
        status = commands[args.command](args)
        sys.stdout.flush()
        return status
    except VlpruneError as error:
        _close_progress_bars()
        print(f"vlprune: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader stopped early (`vlprune report DIR | head`): what it read is all it wanted. Point stdout at
        # /dev/null so that the interpreter's final flush does not fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
