"""What a command module under :mod:`mimi.cli` provides: its commands, each a name, a help line, flags and a run."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One `mimi` subcommand.

    Attributes:
        name: the word after `mimi`.
        help: one line for `mimi --help` and the command's own `--help`.
        setup: adds the command's flags to its parser.
        run: does the work; returns the exit code. A :class:`~mimi.core.errors.MimiError` it raises becomes one line
            on stderr and exit code 2 (3 for a :class:`~mimi.core.errors.TrainingError`).
    """

    name: str
    help: str
    setup: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def no_flags(parser: argparse.ArgumentParser) -> None:
    """``setup`` of a command that takes no flags."""
