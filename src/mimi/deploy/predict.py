"""`mimi predict`: many tasks on one backbone over a set of images, batched, to JSON lines or CSV.

By default every image is scored by every task. ``--task-of CSV`` (rows ``image,task``) gives each image one task
instead; the batches then mix tasks and the backbone runs once per batch.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from ..cli import command
from ..errors import ConfigError, DataError
from ..io_utils import atomic_write_text

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def task_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--task takes NAME=FILE (e.g. digits=digits.safetensors), got {text!r}")
    return name, Path(path)


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    """--backbone, --weights, --img-size: each defaults to what the task files record (AdapterBank.from_task_files)."""
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


def _setup(p: argparse.ArgumentParser) -> None:
    add_backbone_args(p)
    p.add_argument(
        "--task", type=task_arg, action="append", required=True, metavar="NAME=FILE", help="a task file (repeat)"
    )
    p.add_argument("--images", nargs="+", type=Path, default=[], metavar="PATH", help="image files or folders")
    p.add_argument("--task-of", type=Path, metavar="CSV", help="rows image,task: one task per image (mixed batches)")
    p.add_argument("--out", type=Path, required=True, help="predictions file: .jsonl or .csv")
    p.add_argument("--topk", type=int, default=1, help="classes kept per image and task (default: 1)")
    p.add_argument("--batch-size", type=int, default=64, help="images per backbone pass (default: 64)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")


def list_images(paths: list[Path]) -> list[Path]:
    """Image files given directly, and those found (recursively, sorted) under folders."""
    out = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"--images {p}: no such file or folder")
    return out


def read_task_of(csv_path: Path, tasks: set[str]) -> dict[Path, str]:
    """``image,task`` rows (an optional ``image,task`` header); image paths are relative to the CSV's folder."""
    if not csv_path.is_file():
        raise DataError(f"--task-of {csv_path}: no such file")
    mapping: dict[Path, str] = {}
    with open(csv_path, newline="") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if not row or (n == 1 and [c.strip().lower() for c in row[:2]] == ["image", "task"]):
                continue
            if len(row) != 2:
                raise DataError(f"--task-of {csv_path}:{n}: expected 2 columns image,task, got {len(row)}")
            image, task = (c.strip() for c in row)
            if task not in tasks:
                raise DataError(f"--task-of {csv_path}:{n}: task {task!r} is not given by --task ({sorted(tasks)})")
            path = Path(image) if Path(image).is_absolute() else csv_path.parent / image
            mapping[path.resolve()] = task
    if not mapping:
        raise DataError(f"--task-of {csv_path}: no rows; write one image,task row per image")
    return mapping


def _jobs(images: list[Path], task_of: dict[Path, str] | None, tasks: list[str]) -> list[tuple[Path, str | None]]:
    if task_of is None:
        return [(img, None) for img in images]  # None: every task
    if not images:
        images = sorted(task_of)
    missing = [str(i) for i in images if i.resolve() not in task_of]
    if missing:
        raise DataError(f"--task-of names no task for {len(missing)} image(s), e.g. {missing[0]}; add rows for them")
    return [(img, task_of[img.resolve()]) for img in images]


def _rows(results: list[dict]) -> Iterator[dict]:
    for r in results:
        for rank, (i, p) in enumerate(zip(r["ids"], r["probs"]), start=1):
            name = r["names"][rank - 1] if r["names"] else ""
            yield {"image": r["image"], "task": r["task"], "rank": rank, "class_id": i, "class_name": name, "prob": p}


def _write(out: Path, results: list[dict]) -> None:
    if out.suffix == ".jsonl":
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in results))
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["image", "task", "rank", "class_id", "class_name", "prob"])
    writer.writeheader()
    writer.writerows(_rows(results))
    atomic_write_text(out, buf.getvalue())


def open_bank(args: argparse.Namespace):
    """The bank of the ``--task`` files, on ``--backbone``/``--weights``/``--img-size`` or what the files record."""
    from .bank import AdapterBank

    tasks = dict(args.task)
    kw = {"backbone": args.backbone, "weights": args.weights, "img_size": args.img_size}
    bank = AdapterBank.from_task_files(tasks, **kw, device=args.device)
    if args.backbone is None:
        print(f"backbone {bank.name} (weights {bank.weights_source}, {bank.img_size} px), as the task files record")
    return bank


@command("predict", "classify images with one or many task files on one shared backbone", _setup)
def cmd_predict(args: argparse.Namespace) -> int:
    from .taskfile import read_task_file

    # Every check that needs no backbone comes first: nothing is built or written for a bad command line.
    if args.out.suffix not in (".jsonl", ".csv"):
        raise ConfigError(f"--out {args.out}: write predictions to a .jsonl or .csv file")
    if args.topk < 1 or args.batch_size < 1:
        raise ConfigError("--topk and --batch-size must be positive integers")
    names = [n for n, _ in args.task]
    if len(set(names)) != len(names):
        raise ConfigError(f"--task names must be unique, got {names}")
    for _, path in args.task:  # every file checked before the backbone loads
        read_task_file(path)
    if not args.images and args.task_of is None:
        raise ConfigError("give --images PATH... (files or folders), or --task-of CSV listing the images")
    images = list_images(args.images)
    task_of = read_task_of(args.task_of, set(names)) if args.task_of else None
    jobs = _jobs(images, task_of, names)
    if not jobs:
        raise DataError(f"no image files found under {[str(p) for p in args.images]}")

    bank = open_bank(args)
    results: list[dict] = []
    bar = tqdm(total=len(jobs) * (len(names) if task_of is None else 1), disable=not args.progress, unit="pred")
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start : start + args.batch_size]
        x = bank.preprocess([img for img, _ in chunk])
        if task_of is None:
            for name in names:
                for (img, _), row in zip(chunk, bank.logits(x, name)):
                    results.append(bank.decode(name, row, args.topk, str(img)))
        else:
            per_image = [t for _, t in chunk]
            for (img, t), row in zip(chunk, bank.logits(x, per_image)):
                results.append(bank.decode(t, row, args.topk, str(img)))
        bar.update(len(chunk) * (len(names) if task_of is None else 1))
    bar.close()
    _write(args.out, results)
    print(f"{len(results)} predictions ({len(jobs)} images, tasks {', '.join(names)}) -> {args.out}")
    return 0
