"""`mimi predict`: many tasks on one backbone over a set of images, batched, to JSON lines or CSV.

By default every image is scored by every task. ``--task-of CSV`` (rows ``image,task``) gives each image one task
instead; the batches then mix tasks and the backbone runs once per batch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mimi.cli.command import Command
from mimi.cli.serving import add_task_args, check_tasks, open_bank
from mimi.core.errors import ConfigError, DataError


def _setup(p: argparse.ArgumentParser) -> None:
    add_task_args(p)
    p.add_argument("--images", nargs="+", type=Path, default=[], metavar="PATH", help="image files or folders")
    p.add_argument("--task-of", type=Path, metavar="CSV", help="rows image,task: one task per image (mixed batches)")
    p.add_argument("--out", type=Path, required=True, help="predictions file: .jsonl or .csv")
    p.add_argument("--topk", type=int, default=1, help="classes kept per image and task (default: 1)")
    p.add_argument("--batch-size", type=int, default=64, help="images per backbone pass (default: 64)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")


def cmd_predict(args: argparse.Namespace) -> int:
    from mimi.deploy.predict import list_images, plan_jobs, predict, read_task_of, write_predictions

    # Every check that needs no backbone comes first: nothing is built or written for a bad command line.
    if args.out.suffix not in (".jsonl", ".csv"):
        raise ConfigError(f"--out {args.out}: write predictions to a .jsonl or .csv file")
    if args.topk < 1 or args.batch_size < 1:
        raise ConfigError("--topk and --batch-size must be positive integers")
    names = check_tasks(args.task)
    if not args.images and args.task_of is None:
        raise ConfigError("give --images PATH... (files or folders), or --task-of CSV listing the images")
    images = list_images(args.images)
    task_of = read_task_of(args.task_of, set(names)) if args.task_of else None
    jobs = plan_jobs(images, task_of, names)
    if not jobs:
        raise DataError(f"no image files found under {[str(p) for p in args.images]}")

    bank = open_bank(args)
    results = predict(bank, jobs, names, topk=args.topk, batch_size=args.batch_size, progress=args.progress)
    write_predictions(args.out, results)
    print(f"{len(results)} predictions ({len(jobs)} images, tasks {', '.join(names)}) -> {args.out}")
    return 0


COMMANDS = [
    Command("predict", "classify images with one or many task files on one shared backbone", _setup, cmd_predict)
]
