"""MiniVTAB: a VTAB-1k-style suite of seven small tasks built from real image data available offline.

VTAB-1k itself cannot be downloaded on the project's machines, so this module writes a stand-in in the
same folder layout from data that can be installed from Debian or PyPI:

* natural: Fashion-MNIST (Debian ``dataset-fashion-mnist`` or torchvision's download) and
  scikit-learn's 8x8 digits;
* specialized: ELPV electroluminescence solar-cell images (PyPI ``elpv-dataset``, CC-BY-NC-SA-4.0,
  non-commercial), labelled by defect probability or by module type;
* structured: synthetic scenes made of real Fashion-MNIST items, in the spirit of dSprites / CLEVR:
  predict an item's x-position, its rotation, or how many items there are.

Each task is written as ``<root>/<task>/images/<split>/<idx>.png`` plus ``train800.txt``, ``val200.txt``,
``train800val200.txt`` and ``test.txt`` with lines ``images/<split>/<idx>.png <label>``, and a
``minivtab.json`` describing the build (spec, seed, counts, class histograms, source indices).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mimi.core.errors import ConfigError, DataError
from mimi.core.files import atomic_write_text

from mimi.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist

__all__ = [
    "FORMAT_VERSION",
    "GROUPS",
    "TASKS",
    "TaskSpec",
    "build_minivtab",
    "find_fashion_mnist",
    "load_fashion_mnist",
]

# Bumped whenever the images or labels a given seed produces change, so old folders are rebuilt, not reused.
FORMAT_VERSION = 1

TRAIN_SIZE = 800
VAL_SIZE = 200
SPLITS = ("train800", "val200", "test")

# Structured-task geometry. Location: the item's bounding-box centre x lies in [13.5, 49.5] on a 64 px
# canvas (the range every crop up to 28 px wide can reach), cut into 8 equal bins of 4.5 px.
LOCATION_CANVAS = 64
LOCATION_BINS = 8
LOCATION_RANGE = (13.5, 49.5)
# Orientation: a 28 px item centred on a 40 px canvas keeps its corners (28 * sqrt(2) < 40) at any angle.
ORIENTATION_CANVAS = 40
ORIENTATION_BINS = 8
# Count: 1-6 items, each inside its own cell of a 3x3 grid of 32 px cells, so items never overlap and
# the count is exactly the number of non-empty cells; the crop's position in its cell is random.
COUNT_CELL = 32
COUNT_GRID = 3
COUNT_MAX = 6

# PNG level 3 is ~3x faster to encode than the default 6 for ~10% larger files; encoding dominates build time.
_PNG_LEVEL = 3

_FMNIST_SOURCE = "Fashion-MNIST (Zalando Research), Debian dataset-fashion-mnist or torchvision download"
_ELPV_SOURCE = "ELPV dataset (Buerhop-Lutz et al., Deitsch et al.), PyPI elpv-dataset==1.0.0.post1"
_ELPV_LICENCE = "CC-BY-NC-SA-4.0 (non-commercial use only)"


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one MiniVTAB task.

    Attributes:
        name: Task (folder) name.
        group: VTAB group, one of ``natural``, ``specialized``, ``structured``.
        num_classes: Number of labels, ``0 .. num_classes - 1``.
        source: Where the images come from.
        licence: Licence of the source data.
        description: What the label means.
    """

    name: str
    group: str
    num_classes: int
    source: str
    licence: str
    description: str


TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec(
            "fashion_mnist",
            "natural",
            10,
            _FMNIST_SOURCE,
            "MIT",
            "Fashion-MNIST clothing class, 28x28 grey images as published.",
        ),
        TaskSpec(
            "digits",
            "natural",
            10,
            "scikit-learn load_digits (UCI optical recognition of handwritten digits)",
            "CC-BY-4.0 (UCI); shipped with scikit-learn (BSD-3-Clause)",
            "Handwritten digit 0-9; 8x8 images with values 0..16 mapped to 0..255, upscaled bicubically to 32x32.",
        ),
        TaskSpec(
            "elpv_defect",
            "specialized",
            4,
            _ELPV_SOURCE,
            _ELPV_LICENCE,
            "Solar-cell defect probability 0, 1/3, 2/3, 1 as labels 0..3; 300x300 images resized to elpv_size.",
        ),
        TaskSpec(
            "elpv_type",
            "specialized",
            2,
            _ELPV_SOURCE,
            _ELPV_LICENCE,
            "Solar-cell module type: mono (0) or poly (1); same images and splits as elpv_defect.",
        ),
        TaskSpec(
            "fmnist_location",
            "structured",
            LOCATION_BINS,
            _FMNIST_SOURCE,
            "MIT",
            "One Fashion-MNIST item (cropped to its bounding box) on a 64x64 canvas at random y; label = bin of "
            "the bounding-box centre x over [13.5, 49.5] px in 8 equal bins.",
        ),
        TaskSpec(
            "fmnist_orientation",
            "structured",
            ORIENTATION_BINS,
            _FMNIST_SOURCE,
            "MIT",
            "One Fashion-MNIST item centred on a 40x40 canvas, rotated counter-clockwise by a random angle; "
            "label = floor(angle / 45 degrees).",
        ),
        TaskSpec(
            "fmnist_count",
            "structured",
            COUNT_MAX,
            _FMNIST_SOURCE,
            "MIT",
            "1-6 Fashion-MNIST items in distinct cells of a 3x3 grid of 32 px cells (96x96 canvas) at random "
            "offsets, never overlapping; label = count - 1.",
        ),
    )
}

GROUPS: dict[str, list[str]] = {
    g: [name for name, s in TASKS.items() if s.group == g] for g in ("natural", "specialized", "structured")
}


# ----------------------------------------------------------------------------------------------- sources


class _Sources:
    """Loads each source once per build, since several tasks share them (and ELPV takes seconds)."""

    def __init__(self, fmnist_dir: str | Path | None, elpv_size: int) -> None:
        self.fmnist_dir = fmnist_dir
        self.elpv_size = elpv_size
        self._cache: dict[str, object] = {}

    def _get(self, key: str, load: Callable[[], object]) -> object:
        if key not in self._cache:
            self._cache[key] = load()
        return self._cache[key]

    def fmnist(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return self._get("fmnist_" + split, lambda: load_fashion_mnist(split, self.fmnist_dir))  # type: ignore[return-value]

    def digits(self) -> tuple[np.ndarray, np.ndarray]:
        def load() -> tuple[np.ndarray, np.ndarray]:
            try:
                from sklearn.datasets import load_digits
            except ImportError as e:
                raise DataError("the digits task needs scikit-learn: pip install 'mimi-adapters[offline]'") from e
            d = load_digits()
            # 8x8 values are 0..16; map to 0..255 before the bicubic upscale so the PNG uses the full range.
            px = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
            return px, d.target.astype(np.int64)

        return self._get("digits", load)  # type: ignore[return-value]

    def elpv(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns ``(images resized to elpv_size, defect labels 0..3, type labels 0/1)``."""

        def load() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            try:
                from elpv_dataset.utils import load_dataset
            except ImportError as e:
                raise DataError(
                    "the elpv tasks need the elpv-dataset package: pip install elpv-dataset==1.0.0.post1"
                ) from e
            # elpv-dataset 1.0.0.post1 returns (images uint8 (N, 300, 300), probabilities float, types str).
            images, probs, types = load_dataset()
            defect = np.rint(np.asarray(probs, dtype=np.float64) * 3).astype(np.int64)
            kinds = np.asarray(types).astype(str)
            if not np.allclose(defect / 3.0, probs) or not set(kinds) <= {"mono", "poly"}:
                raise DataError("elpv-dataset returned labels outside {0, 1/3, 2/3, 1} x {mono, poly}")
            kind = (kinds == "poly").astype(np.int64)
            size = (self.elpv_size, self.elpv_size)
            if images.shape[1:] != size:
                # PIL widens the bicubic kernel with the scale factor, so this downscale is antialiased.
                images = np.stack([np.asarray(Image.fromarray(a).resize(size, Image.BICUBIC)) for a in images])
            return images, defect, kind

        return self._get("elpv", load)  # type: ignore[return-value]


# -------------------------------------------------------------------------------------------------- splits


def _task_rng(seed: int, key: str) -> np.random.Generator:
    # Keyed by task so that building a subset of tasks gives the same files as building all of them.
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def _quota(counts: np.ndarray, n: int) -> np.ndarray:
    """Splits ``n`` over classes in proportion to ``counts`` (largest remainder), never above ``counts``."""
    exact = counts * (n / max(int(counts.sum()), 1))
    q = np.floor(exact).astype(np.int64)
    rest = n - int(q.sum())
    order = np.argsort(-(exact - q), kind="stable")
    q[order[:rest]] += 1
    return np.minimum(q, counts)


def _carve(labels: np.ndarray, sizes: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Draws disjoint, class-stratified index sets of the given sizes from ``labels``."""
    classes = np.unique(labels)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    used = np.zeros(len(classes), dtype=np.int64)
    out = []
    for n in sizes:
        remaining = np.array([len(p) for p in pools]) - used
        q = _quota(remaining, n)
        part = np.concatenate([p[u : u + k] for p, u, k in zip(pools, used, q)])
        used += q
        out.append(rng.permutation(part))
    return out


def _balanced_labels(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Synthetic labels for generated tasks: each class ``n // k`` or one more times, in random order."""
    return rng.permutation(np.arange(n) % k)


def _crop(item: np.ndarray) -> np.ndarray:
    """Crops a grey item to the bounding box of its non-zero pixels (the canvas background is 0)."""
    rows = np.flatnonzero(item.any(axis=1))
    cols = np.flatnonzero(item.any(axis=0))
    return item[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _nonblank(images: np.ndarray) -> np.ndarray:
    return np.flatnonzero(images.reshape(len(images), -1).max(axis=1) > 0)


def _draw(pool: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` indices from ``pool``, without repetition while the pool lasts (then further permutations)."""
    reps = -(-n // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(reps)])[:n]


# ----------------------------------------------------------------------------------------------- renderers

# A sample is (image, label, source index or indices, extra parameters for minivtab.json or None).
_Sample = tuple[np.ndarray, int, object, object]


def _location_bin(centre2: int) -> int:
    """Bin of a bounding-box centre given as twice its x coordinate (an integer: centres can be half-pixels)."""
    lo2, hi2 = int(2 * LOCATION_RANGE[0]), int(2 * LOCATION_RANGE[1])
    return min((centre2 - lo2) * LOCATION_BINS // (hi2 - lo2), LOCATION_BINS - 1)


def _render_location(
    items: np.ndarray, pool: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> Iterator[_Sample]:
    lo2, hi2 = int(2 * LOCATION_RANGE[0]), int(2 * LOCATION_RANGE[1])
    idx = _draw(pool, rng, len(labels))
    for label, i in zip(labels, idx):
        crop = _crop(items[i])
        h, w = crop.shape
        x0 = np.arange(LOCATION_CANVAS - w + 1)
        centre2 = 2 * x0 + w - 1
        ok = (centre2 >= lo2) & (centre2 <= hi2)
        x0, centre2 = x0[ok], centre2[ok]
        bins = np.array([_location_bin(int(c)) for c in centre2])
        choices = x0[bins == label]
        x = int(rng.choice(choices))
        y = int(rng.integers(0, LOCATION_CANVAS - h + 1))
        canvas = np.zeros((LOCATION_CANVAS, LOCATION_CANVAS), np.uint8)
        canvas[y : y + h, x : x + w] = crop
        yield canvas, int(label), int(i), {"x_centre": x + (w - 1) / 2, "y_centre": y + (h - 1) / 2}


def _render_orientation(
    items: np.ndarray, pool: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> Iterator[_Sample]:
    width = 360.0 / ORIENTATION_BINS
    off = (ORIENTATION_CANVAS - items.shape[1]) // 2
    idx = _draw(pool, rng, len(labels))
    for label, i in zip(labels, idx):
        angle = float(label * width + rng.uniform(0.0, width))
        canvas = np.zeros((ORIENTATION_CANVAS, ORIENTATION_CANVAS), np.uint8)
        canvas[off : off + items.shape[1], off : off + items.shape[2]] = items[i]
        # PIL rotates counter-clockwise about the canvas centre, which is the item's centre.
        img = Image.fromarray(canvas).rotate(angle, resample=Image.BILINEAR)
        yield np.asarray(img), int(label), int(i), {"angle": angle}


def _render_count(
    items: np.ndarray, pool: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> Iterator[_Sample]:
    side = COUNT_CELL * COUNT_GRID
    idx = _draw(pool, rng, int(np.sum(labels + 1)))
    pos = 0
    for label in labels:
        n = int(label) + 1
        chosen = idx[pos : pos + n]
        pos += n
        cells = rng.choice(COUNT_GRID * COUNT_GRID, size=n, replace=False)
        canvas = np.zeros((side, side), np.uint8)
        for cell, i in zip(cells, chosen):
            crop = _crop(items[i])
            h, w = crop.shape
            y = (cell // COUNT_GRID) * COUNT_CELL + int(rng.integers(0, COUNT_CELL - h + 1))
            x = (cell % COUNT_GRID) * COUNT_CELL + int(rng.integers(0, COUNT_CELL - w + 1))
            canvas[y : y + h, x : x + w] = crop
        yield canvas, int(label), [int(i) for i in chosen], {"cells": sorted(int(c) for c in cells)}


_RENDERERS = {
    "fmnist_location": _render_location,
    "fmnist_orientation": _render_orientation,
    "fmnist_count": _render_count,
}


# --------------------------------------------------------------------------------------------- task plans


@dataclass
class _Split:
    """One split to write: a lazy stream of samples plus what minivtab.json records about its source."""

    n: int
    samples: Iterator[_Sample]
    source: str


def _indexed(images: np.ndarray, labels: np.ndarray, idx: np.ndarray, prep: Callable | None) -> Iterator[_Sample]:
    for i in idx:
        img = images[i] if prep is None else prep(images[i])
        yield img, int(labels[i]), int(i), None


def _upscale_digit(a: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((32, 32), Image.BICUBIC))


def _plan(task: str, src: _Sources, seed: int, test_size: int) -> dict[str, _Split]:
    """The three splits of ``task``: sizes, sample streams and source names."""
    rng = _task_rng(seed, task)
    if task == "fashion_mnist":
        tr_img, tr_lab = src.fmnist("train")
        te_img, te_lab = src.fmnist("test")
        train, val = _carve(tr_lab, [TRAIN_SIZE, VAL_SIZE], rng)
        (test,) = _carve(te_lab, [min(test_size, len(te_lab))], rng)
        return {
            "train800": _Split(len(train), _indexed(tr_img, tr_lab, train, None), "fashion-mnist train"),
            "val200": _Split(len(val), _indexed(tr_img, tr_lab, val, None), "fashion-mnist train"),
            "test": _Split(len(test), _indexed(te_img, te_lab, test, None), "fashion-mnist t10k"),
        }
    if task == "digits":
        images, labels = src.digits()
        rest = len(labels) - TRAIN_SIZE - VAL_SIZE
        train, val, test = _carve(labels, [TRAIN_SIZE, VAL_SIZE, min(test_size, rest)], rng)
        return {
            name: _Split(len(ix), _indexed(images, labels, ix, _upscale_digit), "sklearn digits")
            for name, ix in zip(SPLITS, (train, val, test))
        }
    if task in ("elpv_defect", "elpv_type"):
        images, defect, kind = src.elpv()
        # Both ELPV tasks share one carve, stratified on (defect, type) jointly, so they see the same images.
        rest = len(defect) - TRAIN_SIZE - VAL_SIZE
        parts = _carve(defect * 2 + kind, [TRAIN_SIZE, VAL_SIZE, min(test_size, rest)], _task_rng(seed, "elpv"))
        labels = defect if task == "elpv_defect" else kind
        return {name: _Split(len(ix), _indexed(images, labels, ix, None), "elpv") for name, ix in zip(SPLITS, parts)}
    if task in _RENDERERS:
        spec = TASKS[task]
        render = _RENDERERS[task]
        tr_img, _ = src.fmnist("train")
        te_img, _ = src.fmnist("test")
        n_test = min(test_size, len(te_img))
        k = spec.num_classes
        # Train and val items come from disjoint parts of the train set (so even a small source that must
        # reuse items cannot leak between them); test items come from t10k only. Labels are balanced per split.
        trval = rng.permutation(_nonblank(tr_img))
        cut = len(trval) * TRAIN_SIZE // (TRAIN_SIZE + VAL_SIZE)
        return {
            "train800": _Split(
                TRAIN_SIZE,
                render(tr_img, trval[:cut], _balanced_labels(TRAIN_SIZE, k, rng), rng),
                "fashion-mnist train",
            ),
            "val200": _Split(
                VAL_SIZE, render(tr_img, trval[cut:], _balanced_labels(VAL_SIZE, k, rng), rng), "fashion-mnist train"
            ),
            "test": _Split(
                n_test, render(te_img, _nonblank(te_img), _balanced_labels(n_test, k, rng), rng), "fashion-mnist t10k"
            ),
        }
    raise ConfigError(f"unknown MiniVTAB task {task!r}; choose from {', '.join(TASKS)}")


# ------------------------------------------------------------------------------------------------- writing


def _build_key(task: str, seed: int, test_size: int, elpv_size: int) -> dict:
    """What must match for an existing folder to be reused; elpv_size only matters to the ELPV tasks."""
    key = {"format": FORMAT_VERSION, "seed": seed, "test_size": test_size}
    if task.startswith("elpv_"):
        key["elpv_size"] = elpv_size
    return key


#: Class names by task (label i is CLASS_NAMES[task][i]), written to ``classes.txt`` so task files can record them.
CLASS_NAMES: dict[str, list[str]] = {
    "fashion_mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],  # fmt: skip
    "digits": [str(d) for d in range(10)],
    "elpv_defect": ["defect p=0", "defect p=1/3", "defect p=2/3", "defect p=1"],
    "elpv_type": ["mono", "poly"],
    "fmnist_location": [f"x bin {i + 1}/{LOCATION_BINS}" for i in range(LOCATION_BINS)],
    "fmnist_orientation": [f"{45 * i}-{45 * (i + 1)} deg" for i in range(ORIENTATION_BINS)],
    "fmnist_count": [f"{i + 1} item{'s' if i else ''}" for i in range(COUNT_MAX)],
}


def _write_classes(folder: Path, task: str) -> None:
    names = CLASS_NAMES[task]
    if len(names) != TASKS[task].num_classes:
        raise DataError(f"{task}: {len(names)} class names for {TASKS[task].num_classes} classes")
    atomic_write_text(folder / "classes.txt", "\n".join(names) + "\n")


def _existing(folder: Path, key: dict) -> dict | None:
    """The info of a finished build of ``folder`` with the same key, or None."""
    meta = folder / "minivtab.json"
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if not info.get("complete") or any(info.get(k) != v for k, v in key.items()):
        return None
    if not all((folder / f"{s}.txt").is_file() for s in (*SPLITS, "train800val200")):
        return None
    return info


def _write_task(task: str, root: Path, plan: dict[str, _Split], key: dict, progress: bool, start: float) -> dict:
    """Writes ``task`` into ``<root>/.<task>.tmp`` and moves it into place once complete."""
    from tqdm.auto import tqdm

    spec = TASKS[task]
    tmp = root / f".{task}.tmp"
    if tmp.exists():  # left over from an interrupted build
        shutil.rmtree(tmp)
    lines: dict[str, list[str]] = {}
    info: dict = {"task": task, "spec": asdict(spec), **key, "complete": False}
    info.update(counts={}, class_histogram={}, sources={})
    size = None
    total = sum(s.n for s in plan.values())
    with tqdm(total=total, desc=task, unit="img", disable=None if progress else True, leave=False) as bar:
        for split, part in plan.items():
            (tmp / "images" / split).mkdir(parents=True)
            hist = np.zeros(spec.num_classes, dtype=np.int64)
            index, params, lines[split] = [], [], []
            for i, (img, label, src_index, extra) in enumerate(part.samples):
                if not 0 <= label < spec.num_classes:
                    raise DataError(f"{task}: label {label} outside 0..{spec.num_classes - 1}")
                rel = f"images/{split}/{i}.png"
                Image.fromarray(img, mode="L").save(tmp / rel, format="PNG", compress_level=_PNG_LEVEL)
                lines[split].append(f"{rel} {label}")
                hist[label] += 1
                index.append(src_index)
                if extra is not None:
                    params.append(extra)
                size = img.shape[::-1]
                bar.update()
            if len(lines[split]) != part.n:
                raise DataError(f"{task}/{split}: wrote {len(lines[split])} images, planned {part.n}")
            info["counts"][split] = part.n
            info["class_histogram"][split] = hist.tolist()
            info["sources"][split] = {"set": part.source, "index": index}
            if params:
                info.setdefault("params", {})[split] = params
    lines["train800val200"] = lines["train800"] + lines["val200"]
    info["counts"]["train800val200"] = len(lines["train800val200"])
    info["class_histogram"]["train800val200"] = [
        a + b for a, b in zip(info["class_histogram"]["train800"], info["class_histogram"]["val200"])
    ]
    for split, ls in lines.items():
        (tmp / f"{split}.txt").write_text("\n".join(ls) + "\n")
    _write_classes(tmp, task)
    info["image_size"] = list(size) if size is not None else None
    info["build_seconds"] = round(time.perf_counter() - start, 2)
    info["complete"] = True
    # minivtab.json is written last: its "complete" flag is what marks a finished build.
    (tmp / "minivtab.json").write_text(json.dumps(info, indent=1) + "\n")

    dest = root / task
    old = root / f".{task}.old"
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        # os.replace cannot overwrite a non-empty directory: move the stale build aside first.
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old.exists():
        shutil.rmtree(old)
    return info


def build_minivtab(
    root: str | Path,
    *,
    tasks: list[str] | None = None,
    seed: int = 0,
    test_size: int = 2000,
    fmnist_dir: str | Path | None = None,
    elpv_size: int = 224,
    progress: bool = True,
) -> dict[str, dict]:
    """Writes MiniVTAB tasks in the VTAB-1k folder layout.

    Each task gets ``<root>/<task>/images/<split>/<idx>.png``, ``train800.txt`` (800 lines), ``val200.txt``
    (200), ``train800val200.txt`` (their union) and ``test.txt`` (``min(test_size, what the source
    allows)``) with lines ``images/<split>/<idx>.png <label>``, plus ``minivtab.json``. Train/val and test
    never share a source image: Fashion-MNIST tasks draw train/val from its train set and test from t10k;
    digits and ELPV carve disjoint index sets (so their test sets hold at most 797 and 1,624 images).
    A task is built in ``<root>/.<task>.tmp`` and moved into place when complete; a task whose folder
    already holds a complete build with the same seed and test_size (and elpv_size, for ELPV) is skipped.

    Args:
        root: Folder to write the tasks into (created if missing).
        tasks: Task names (keys of :data:`TASKS`) or group names (keys of :data:`GROUPS`); all when None.
        seed: Seed of every random choice; the same seed gives byte-identical label files.
        test_size: Requested test-set size per task.
        fmnist_dir: Folder with the Fashion-MNIST idx files, passed to :func:`find_fashion_mnist`.
        elpv_size: Side in pixels the 300x300 ELPV images are resized to.
        progress: Show a tqdm progress bar per task.

    Returns:
        ``{task: info}`` where info is the task's minivtab.json content plus ``path`` (the task folder)
        and ``skipped`` (True when an existing build was reused).

    Raises:
        ConfigError: If a task name or a size is invalid.
        DataError: If a source dataset is missing or malformed.
    """
    names: list[str] = []
    for t in tasks if tasks is not None else list(TASKS):
        for name in GROUPS.get(t, [t]):
            if name not in TASKS:
                raise ConfigError(f"unknown MiniVTAB task {t!r}; choose from {', '.join([*TASKS, *GROUPS])}")
            if name not in names:
                names.append(name)
    if test_size < 1:
        raise ConfigError(f"test_size must be >= 1, got {test_size}")
    if elpv_size < 8:
        raise ConfigError(f"elpv_size must be >= 8 px, got {elpv_size}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sources = _Sources(fmnist_dir, elpv_size)
    out: dict[str, dict] = {}
    for name in names:
        key = _build_key(name, seed, test_size, elpv_size)
        info = _existing(root / name, key)
        skipped = info is not None
        if skipped and not (root / name / "classes.txt").is_file():
            _write_classes(root / name, name)  # a build from before class names were recorded
        if info is None:
            start = time.perf_counter()
            info = _write_task(name, root, _plan(name, sources, seed, test_size), key, progress, start)
        out[name] = {**info, "path": str(root / name), "skipped": skipped}
    return out
