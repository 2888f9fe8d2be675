"""``python -m fruitdask``: the command line.

One module per command group (:mod:`.run`: run, pack, sample, config;
:mod:`.bovw`: train, evaluate, predict; :mod:`.aws`: emr, plan and the EC2
options of run; :mod:`.report`), sharing :mod:`._common`. Exit codes: 0
success, 2 a bad argument, input or output (one line on stderr, nothing
written), 130/143 stopped by SIGINT/SIGTERM before the result was committed,
1 an unexpected failure (one line; the traceback is in the log file named).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from fruitdask.cli._common import (
    EXIT_USAGE,
    Parser,
    ProgressPrinter,
    Supervisor,
    add_orb_arguments,
    add_run_settings,
    add_storage_arguments,
    build_run_config,
    ensure_default_sample,
    log_file,
    storage_options_from_args,
    term,
)
from fruitdask.errors import Cancelled, FruitdaskError, one_line

__all__ = [
    "EXIT_USAGE",
    "Parser",
    "ProgressPrinter",
    "Supervisor",
    "add_orb_arguments",
    "add_run_settings",
    "add_storage_arguments",
    "build_parser",
    "build_run_config",
    "console_main",
    "ensure_default_sample",
    "log_file",
    "main",
    "report_failure",
    "storage_options_from_args",
    "term",
]

_GROUPS = ("run", "bovw", "report", "aws")


def build_parser() -> Parser:
    import importlib

    from fruitdask import __version__

    parser = Parser(
        prog="fruitdask",
        description="Distributed ORB featurization of image folders on object storage, with Dask.",
    )
    parser.add_argument("--version", action="version", version=f"fruitdask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name in _GROUPS:
        importlib.import_module(f"fruitdask.cli.{name}").register(sub)
    return parser


def report_failure(prog: str, exc: BaseException, hint: str = "") -> int:
    """Print one line for a failed command and return its exit code; an
    unexpected exception's traceback goes to the log, not the terminal."""
    if isinstance(exc, Cancelled):
        from fruitdask.output import SUCCESS

        more = f" ({hint})" if hint else ""
        term.say(f"{prog}: {exc}; no {SUCCESS} written{more}")
        return exc.exit_code
    if isinstance(exc, FruitdaskError):
        term.say(f"{prog}: error: {exc}")
        return exc.exit_code
    logging.getLogger("fruitdask").error("unexpected failure", exc_info=exc)
    where = f" (details: {term.log_path})" if term.log_path else ""
    term.say(f"{prog}: internal error: {one_line(exc)}{where}")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (never raises for a failure)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `fruitdask ... | head -1`: the reader has all it wants
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, term.out.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 - every failure ends in one line
        return report_failure("fruitdask", exc, getattr(args, "resume_hint", ""))


def console_main() -> NoReturn:
    """``python -m fruitdask`` / the ``fruitdask`` script: :func:`main` with the
    process's output going to a log file (workers, the JVM and libraries write
    there; the result and notes reach the terminal), then exit at once.

    By the time :func:`main` returns, every command has closed what it opened
    and printed its result; what is left is the interpreter's teardown of the
    ~3,000 modules a run imports (dask-ml, sklearn, scipy, bokeh), which takes
    ~1 s on 2 cores and changes nothing.
    """
    term.redirect(log_file())
    try:
        code = main()
    except SystemExit as exc:  # argparse's --help, --version and usage errors
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    except BaseException as exc:  # noqa: BLE001 - never leave without a word on the terminal
        code = report_failure("fruitdask", exc)
    logging.shutdown()
    for stream in (term.out, term.err, sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
