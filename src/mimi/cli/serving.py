"""What `mimi predict` and `mimi serve` share: the ``--task NAME=FILE`` flags, the backbone flags, the checks made
before any backbone loads, and opening the bank."""

from __future__ import annotations

import argparse
from pathlib import Path

from mimi.core.errors import ConfigError


def task_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--task takes NAME=FILE (e.g. digits=digits.safetensors), got {text!r}")
    return name, Path(path)


def add_backbone_dtype_arg(p: argparse.ArgumentParser) -> None:
    """--backbone-dtype float32|int8 (``predict``, ``serve``, ``eval``)."""
    p.add_argument(
        "--backbone-dtype",
        choices=("float32", "int8"),
        default="float32",
        help="float32 (default) or int8: the backbone's linear layers quantised once at load (CPU only; about 2x "
        "the images/s; adapters and heads stay float32; the accuracy cost depends on the task: check it with "
        "`mimi eval RUN --backbone-dtype int8`)",
    )


def add_task_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """--task NAME=FILE (repeat), and --backbone, --weights, --img-size: each defaults to what the task files record
    (AdapterBank.from_task_files)."""
    p.add_argument(
        "--backbone", default=None, help="timm model name the tasks were trained on (default: the one they record)"
    )
    p.add_argument(
        "--weights",
        default=None,
        help="backbone weights: auto, hub, none, imgfocus, or a file (default: the source the tasks record)",
    )
    p.add_argument(
        "--img-size", type=int, default=None, help="input resolution (default: the one the tasks were trained at)"
    )
    add_backbone_dtype_arg(p)
    p.add_argument(
        "--task",
        type=task_arg,
        action="append",
        required=required,
        default=[],
        metavar="NAME=FILE",
        help="a task file (repeat)",
    )


def check_tasks(tasks: list[tuple[str, Path]]) -> list[str]:
    """Unique names, and every file readable as a servable task, before the backbone loads; returns the names."""
    from mimi.deploy.tasks import read_task_file

    names = [n for n, _ in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"--task names must be unique, got {names}")
    for _, path in tasks:
        read_task_file(path)
    return names


def open_bank(args: argparse.Namespace):
    """The bank of the ``--task`` files, on ``--backbone``/``--weights``/``--img-size`` or what the files record."""
    from mimi.deploy.bank import AdapterBank

    kw = {"backbone": args.backbone, "weights": args.weights, "img_size": args.img_size}
    bank = AdapterBank.from_task_files(dict(args.task), **kw, device=args.device, backbone_dtype=args.backbone_dtype)
    if args.backbone is None:
        print(f"backbone {bank.name} (weights {bank.weights_source}, {bank.img_size} px), as the task files record")
    if bank.backbone_dtype != "float32":
        print(bank.quantized.describe())
    return bank
