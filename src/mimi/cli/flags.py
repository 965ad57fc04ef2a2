"""Flags generated from typed dataclasses (``--flag-name`` per field), and configs built back from them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Sequence


def _base_type(tp) -> type:
    """int | None -> int; dict -> json loader."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _int_list(text: str) -> int | list[int]:
    """``8000`` -> 8000; ``32000,16000,8000`` -> [32000, 16000, 8000] (fields typed ``int | list[int]``)."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or comma-separated integers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One `--flag-name` per field; defaults are SUPPRESSed so only flags given override a --config file."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif tp is int and typing.get_args(hints[f.name])[1:2] == (list[int],):  # int | list[int] | None
            parser.add_argument(flag, type=_int_list, default=argparse.SUPPRESS, metavar="N[,N...]", help=help_text)
        elif tp is dict:
            parser.add_argument(flag, type=_json_dict, default=argparse.SUPPRESS, metavar="JSON", help=help_text)
        else:
            parser.add_argument(flag, type=tp, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace, cls, *, skip: Sequence[str] = ()):
    from mimi.config import load_yaml

    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names and k not in skip})
    return cls.from_dict(values)
