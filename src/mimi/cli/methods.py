"""`mimi methods`: the training methods."""

from __future__ import annotations

import argparse

from mimi.cli.command import Command, no_flags


def cmd_methods(args: argparse.Namespace) -> int:
    from mimi.methods import METHODS

    for name, cls in sorted(METHODS.items()):
        print(f"{name:<14} {cls.description}")
    return 0


COMMANDS = [
    Command("methods", "list the training methods", no_flags, cmd_methods),
]
