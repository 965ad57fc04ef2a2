"""`mimi predict`: many tasks on one backbone over a set of images, batched, to JSON lines or CSV.

By default every image is scored by every task. ``--task-of CSV`` (rows ``image,task``) gives each image one task
instead; the batches then mix tasks and the backbone runs once per batch.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from mimi.core.errors import DataError
from mimi.core.files import atomic_write_text

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


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


def plan_jobs(images: list[Path], task_of: dict[Path, str] | None, tasks: list[str]) -> list[tuple[Path, str | None]]:
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


def write_predictions(out: Path, results: list[dict]) -> None:
    if out.suffix == ".jsonl":
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in results))
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["image", "task", "rank", "class_id", "class_name", "prob"])
    writer.writeheader()
    writer.writerows(_rows(results))
    atomic_write_text(out, buf.getvalue())


def predict(
    bank,
    jobs: list[tuple[Path, str | None]],
    names: list[str],
    *,
    topk: int = 1,
    batch_size: int = 64,
    progress: bool = True,
) -> list[dict]:
    """Run ``jobs`` (image, task or None for every task in ``names``) through ``bank`` in batches of ``batch_size``.

    With one task per image the batches mix tasks and the backbone runs once per batch. Returns one result per
    (image, task): ``{"image", "task", "ids", "names", "probs"}`` in job order.
    """
    per_image = any(t is not None for _, t in jobs)
    results: list[dict] = []
    bar = tqdm(total=len(jobs) * (1 if per_image else len(names)), disable=not progress, unit="pred")
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        x = bank.preprocess([img for img, _ in chunk])
        if not per_image:
            for name in names:
                for (img, _), row in zip(chunk, bank.logits(x, name)):
                    results.append(bank.decode(name, row, topk, str(img)))
        else:
            tasks = [t for _, t in chunk]
            for (img, t), row in zip(chunk, bank.logits(x, tasks)):
                results.append(bank.decode(t, row, topk, str(img)))
        bar.update(len(chunk) * (1 if per_image else len(names)))
    bar.close()
    return results
