"""`mimi data`: build (MiniVTAB) or list the dataset sources."""

from __future__ import annotations

import argparse
from pathlib import Path

from mimi.cli.command import Command


def _data_setup(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True)
    m = sub.add_parser("minivtab", help="write the MiniVTAB suite (7 real-data tasks) in the VTAB-1k layout")
    m.add_argument("--root", type=Path, required=True, help="output folder")
    m.add_argument("--tasks", nargs="*", help="subset of tasks (default: all seven)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--test-size", type=int, default=2000, help="largest test split per task")
    m.add_argument("--fmnist-dir", type=Path, help="folder with the Fashion-MNIST idx files")
    sub.add_parser("list", help="list dataset sources")


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "list":
        from mimi.data import list_datasets

        for line in list_datasets():
            print(line)
        return 0
    from mimi.data.build.minivtab import build_minivtab

    info = build_minivtab(
        args.root, tasks=args.tasks or None, seed=args.seed, test_size=args.test_size, fmnist_dir=args.fmnist_dir
    )
    for task, i in info.items():
        counts = i.get("counts", {})
        print(f"{task:<20} " + " ".join(f"{k}={v}" for k, v in counts.items()))
    print(f"MiniVTAB written under {args.root}")
    return 0


COMMANDS = [
    Command("data", "build or list datasets", _data_setup, cmd_data),
]
