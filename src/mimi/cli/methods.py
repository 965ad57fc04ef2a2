"""`mimi methods`: the training methods, or one of them in detail (traits and options)."""

from __future__ import annotations

import argparse
import dataclasses

from mimi.cli.command import Command


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="a method to describe: its traits and options (default: list them all)")


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]  # the registry refuses fields without any default


def _type(f: dataclasses.Field) -> str:
    # Annotations are strings under `from __future__ import annotations`: they read as written.
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _rows(fields: list[dataclasses.Field], labels: list[str]) -> list[str]:
    """Per field ``label: type = default``, its help on the next line."""
    lines = []
    for label, f in zip(labels, fields):
        lines.append(f"  {label}: {_type(f)} = {_default(f)!r}")
        if f.metadata.get("help"):
            lines.append(f"      {f.metadata['help']}")
    return lines


def describe(name: str) -> str:
    """`mimi methods NAME`: description, traits and options of one method."""
    from mimi.methods import method_class
    from mimi.methods.base import RUN_FLAGS, is_run_flag

    cls = method_class(name)
    t = cls.traits
    yes = {True: "yes", False: "no"}
    lines = [
        f"{name}: {cls.description}",
        "",
        "traits:",
        f"  prunes       {yes[t.prunes]}",
        f"  one-shot     {yes[t.one_shot]}",
        f"  servable     {yes[t.servable]}",
        f"  size unit    {t.size_unit}",
        f"  budget sets  {t.budget_sets or ('the pruning target' if t.prunes else '-')}",
    ]
    fields = dataclasses.fields(cls.Options)
    options = [f for f in fields if not is_run_flag(f)]
    flags = [f for f in fields if is_run_flag(f)]
    lines += ["", "options (--method-kwargs JSON):"]
    lines += _rows(options, [f.name for f in options]) if options else ["  none"]
    if flags:
        lines += ["", "read from run flags:"]
        lines += _rows(flags, [RUN_FLAGS[f.name] for f in flags])
    return "\n".join(lines)


def cmd_methods(args: argparse.Namespace) -> int:
    from mimi.methods import METHODS, method_names

    if args.name is not None:
        print(describe(args.name))  # an unknown name: ConfigError, one line and exit code 2
        return 0
    for name in method_names():
        print(f"{name:<14} {METHODS[name].description}")
    return 0


COMMANDS = [
    Command("methods", "list the training methods, or describe one (mimi methods NAME)", _setup, cmd_methods),
]
