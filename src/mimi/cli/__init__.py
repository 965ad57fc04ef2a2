"""The `mimi` command line: the only place that parses arguments or prints.

Every command lives in a module of this package that lists its :class:`~mimi.cli.command.Command` s in ``COMMANDS``;
:data:`MODULES` names those modules, in the order `mimi --help` shows them. A new command is one file here and one
entry in that table. Flags of `mimi train` are generated from :class:`mimi.config.TrainConfig`.

Every subcommand turns a :class:`mimi.core.errors.MimiError` into one line on stderr and exit code 2 (3 when training
stopped on its own, e.g. a NaN loss: the run is resumable); `mimi --debug ...` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Sequence

from mimi.cli.command import Command
from mimi.core.errors import MimiError, TrainingError

#: The command modules (``mimi.cli.<name>``), in `mimi --help` order.
MODULES: tuple[str, ...] = ("train", "tasks", "methods", "data", "demo", "bench", "predict", "serve")


def commands() -> dict[str, Command]:
    """Every command by name, from the modules in :data:`MODULES` (they import nothing heavy at the top)."""
    out: dict[str, Command] = {}
    for module in MODULES:
        for cmd in importlib.import_module(f"mimi.cli.{module}").COMMANDS:
            out[cmd.name] = cmd
    return out


def build_parser() -> argparse.ArgumentParser:
    from mimi import __version__

    parser = argparse.ArgumentParser(prog="mimi", description="Finetune frozen ViTs with mini adapters (MiMi).")
    parser.add_argument("--version", action="version", version=f"mimi {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, dest="log_verbose", help="more log lines (-v: debugging)"
    )
    parser.add_argument(
        "-q", "--quiet", action="count", default=0, dest="log_quiet", help="fewer log lines (-q: warnings only)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in commands().values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.setup(p)
        p.set_defaults(func=cmd.run)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each record (a caller may have redirected it since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always answers sys.stderr
        pass


def configure_output(verbose: int = 0, quiet: int = 0) -> None:
    """The library logs under ``mimi.*``; the command line shows those records on stderr, one line each.

    Default: INFO and above (what a run is doing); ``-v`` adds DEBUG; ``-q`` keeps warnings and errors only.
    Warnings a user must act on (``warnings.warn``) are shown once, as one line.
    """
    level = logging.INFO - 10 * verbose + 10 * quiet
    logger = logging.getLogger("mimi")
    logger.setLevel(max(logging.DEBUG, level))
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
    warnings.formatwarning = lambda message, category, *_a, **_k: f"warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_output(args.log_verbose, args.log_quiet)
    try:
        return args.func(args)
    except MimiError as e:
        if args.debug:
            raise
        print(f"mimi {args.command}: error: {e}", file=sys.stderr)
        return 3 if isinstance(e, TrainingError) else 2
    except KeyboardInterrupt:
        print(f"mimi {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
