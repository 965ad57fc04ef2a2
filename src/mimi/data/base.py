"""What every data source shares: TaskData, the registry, image decoding, datasets and the stratified split.

A source module (vtab1k, domainnet, ...) only has to list its images as an :class:`ImageSource`
(labels + a way to open image ``i``) and register a builder; this module turns sources into
datasets with one preprocessing for all of them (VTAB-1k convention: RGB, bicubic resize straight
to ``img_size x img_size``, no crop, no augmentation, then mean/std normalisation).
"""

from __future__ import annotations

import hashlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mimi.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)
_WARNED: set[str] = set()

#: Splits with fewer images than this are decoded once and kept in memory (unless ``in_memory`` says otherwise).
IN_MEMORY_MAX = 30_000
#: Part of the cache key: change it whenever the decoding or resizing below changes.
_DECODE_VERSION = "rgb-pil-bicubic-v1"


@dataclass
class TaskData:
    """One classification task, ready for the engine.

    Every item of every split is ``(image, label)`` with ``image`` a float tensor ``(3, img_size, img_size)``
    normalised with the requested mean/std and ``label`` an ``int`` in ``[0, num_classes)``.

    Attributes:
        name: Canonical name, e.g. ``"vtab1k:cifar"``.
        train: Training split (with ``trainval=True`` it includes the validation images).
        val: Validation split, used for model selection (no longer held out when ``trainval=True``).
        test: Test split, only for the final report.
        num_classes: Size of the label space (may exceed the labels present in a small split).
        classes: Class names indexed by label, when the source provides them.
        train_augmented: True where the train split draws random augmentation per item (an image is never
            twice the same); a distilling run then asks its teacher per batch instead of once per image.
        license: Licence of the data, when the source records one (MiniVTAB's ``minivtab.json`` does).
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    classes: list[str] | None = None
    train_augmented: bool = False
    license: str | None = None


@dataclass(frozen=True)
class LoadOptions:
    """How to turn images into tensors; the same for every source. Built by :func:`build_task`."""

    img_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    seed: int = 0
    val_fraction: float = 0.1
    in_memory: bool | None = None
    progress: bool = False
    cache: bool = False
    check_only: bool = False  # list and validate the splits, decode nothing (fail fast before a backbone loads)

    def __post_init__(self) -> None:
        if self.img_size < 1:
            raise ConfigError(f"img_size must be a positive integer, got {self.img_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"mean and std need 3 values each, std > 0; got mean={self.mean} std={self.std}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


# ---------------------------------------------------------------- registry

#: Registry: spec prefix -> builder ``(arg, *, root, trainval, opts) -> TaskData``.
DATASETS: dict[str, Callable[..., TaskData]] = {}
_DESCRIPTIONS: dict[str, tuple[str, str]] = {}


def register_dataset(
    prefix: str, description: str, *, usage: str | None = None
) -> Callable[[Callable[..., TaskData]], Callable[..., TaskData]]:
    """Register a builder under a spec prefix (``"vtab1k"`` serves ``"vtab1k:<task>"``).

    The builder is called as ``builder(arg, root=Path | None, trainval=bool, opts=LoadOptions)`` with ``arg``
    the part of the spec after ``:`` (empty when there is none).

    Args:
        prefix: The part of the spec before ``:``, lower case.
        description: One line for ``mimi data list`` and ``--help``.
        usage: How the spec is written, e.g. ``"vtab1k:TASK"`` (default: the prefix).
    """

    def wrap(fn: Callable[..., TaskData]) -> Callable[..., TaskData]:
        if prefix in DATASETS:
            raise ValueError(f"dataset prefix {prefix!r} registered twice")
        DATASETS[prefix] = fn
        _DESCRIPTIONS[prefix] = (usage or prefix, description)
        return fn

    return wrap


def list_datasets() -> list[str]:
    """One line per registered source, ``"usage  description"``, sorted by prefix (for ``--help``)."""
    rows = [_DESCRIPTIONS[p] for p in sorted(DATASETS)]
    width = max((len(u) for u, _ in rows), default=0)
    return [f"{u:<{width}}  {d}" for u, d in rows]


def build_task(
    spec: str,
    *,
    root: str | Path | None = None,
    img_size: int = 224,
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
    std: tuple[float, float, float] = (0.229, 0.224, 0.225),
    seed: int = 0,
    val_fraction: float = 0.1,
    in_memory: bool | None = None,
    trainval: bool = False,
    progress: bool = False,
    cache: bool = False,
    check_only: bool = False,
) -> TaskData:
    """Load a task named by a spec string such as ``"vtab1k:cifar"``, ``"domainnet:real"``, ``"cifar10"``.

    Args:
        spec: ``prefix[:arg]``; see :func:`list_datasets` for the prefixes.
        root: Folder holding the data (its meaning depends on the source; ``folder:`` resolves a
            relative path against it).
        img_size: Side of the square images every split yields.
        mean: Per-channel normalisation mean (of images in ``[0, 1]``).
        std: Per-channel normalisation standard deviation.
        seed: Seeds every split carved here (stratified validation sets); loading is otherwise deterministic.
        val_fraction: Share of each class moved from train to validation where a source has no validation split.
        in_memory: ``None``: splits under 30,000 images are decoded once and kept as uint8; ``True``: all
            splits; ``False``: every split decodes lazily per item.
        trainval: Train on train + validation (final runs); ``val`` is then kept but no longer held out.
        progress: Show a tqdm bar while decoding.
        cache: Save decoded uint8 splits as ``.npy`` under a ``.cache/`` folder next to the data and reuse them
            (keyed by the file list, file sizes and mtimes, and ``img_size``). Costs ``3 * img_size**2`` bytes
            per image on disk.
        check_only: Only list and validate the splits (files, labels, paths); the splits of the returned task
            are then the undecoded image sources. Costs no decoding: run it before anything slow.

    Returns:
        The task's three splits and its label space.

    Raises:
        DataError: unknown prefix, missing folder or file, malformed split file.
        ConfigError: invalid ``img_size``, ``mean``/``std`` or ``val_fraction``.
    """
    prefix, _, arg = spec.strip().partition(":")
    builder = DATASETS.get(prefix.lower())
    if builder is None:
        known = ", ".join(sorted(DATASETS))
        raise DataError(f"unknown dataset {spec!r}: known sources are {known} (see `mimi data list`)")
    opts = LoadOptions(
        img_size=img_size,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        seed=seed,
        val_fraction=val_fraction,
        in_memory=in_memory,
        progress=progress,
        cache=cache,
        check_only=check_only,
    )
    return builder(arg, root=Path(root).expanduser() if root is not None else None, trainval=trainval, opts=opts)


# ---------------------------------------------------------------- image sources


class ImageSource(ABC):
    """An indexable list of labelled images, not yet decoded. Labels are known without decoding."""

    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def load(self, index: int) -> Image.Image:
        """Open image ``index`` (any PIL mode)."""

    def fingerprint(self) -> str | None:
        """A string that changes whenever the images change; ``None`` means "do not cache"."""
        return None

    def subset(self, indices: Sequence[int]) -> ImageSource:
        """The images at ``indices``, in that order."""
        return SubsetSource(self, indices)


class FileSource(ImageSource):
    """Image files on disk, opened with PIL. ``base``: the folder every file must stay inside, when known."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], base: Path | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.labels = [int(y) for y in labels]
        self.base = base

    def load(self, index: int) -> Image.Image:
        return Image.open(self.paths[index])

    def fingerprint(self) -> str:
        # Size and mtime catch replaced files without reading them all.
        h = hashlib.sha256()
        for p in self.paths:
            st = p.stat()
            h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def subset(self, indices: Sequence[int]) -> FileSource:
        return FileSource([self.paths[i] for i in indices], [self.labels[i] for i in indices], self.base)


class SubsetSource(ImageSource):
    """A view on another source."""

    def __init__(self, base: ImageSource, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]
        self.labels = [base.labels[i] for i in self.indices]

    def load(self, index: int) -> Image.Image:
        return self.base.load(self.indices[index])


def check_files(source: FileSource, what: str) -> None:
    """Raise a DataError naming the first missing file (and how many are missing), or one that a symlink takes
    outside the folder its split file lists images from."""
    missing = [p for p in source.paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(
            f"{what}: listed image {missing[0]} does not exist{more}; check the data root and the list file"
        )
    base = source.base
    if base is not None:
        inside = base.resolve()
        for p in source.paths:
            if not p.resolve().is_relative_to(inside):
                raise DataError(
                    f"{what}: listed image {p} is a link to {p.resolve()}, outside the task folder {base}; "
                    "copy the image into the task folder"
                )


def read_list_file(list_file: Path, base: Path, what: str) -> FileSource:
    """Parse a split file of ``relative/path label`` lines (paths relative to ``base``).

    The label is the last whitespace-separated token, so paths may contain spaces. Blank lines are skipped.
    """
    if not list_file.is_file():
        raise DataError(f"{what}: split file {list_file} does not exist; check the data root and the task name")
    paths: list[Path] = []
    labels: list[int] = []
    for n, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rel, label = line.strip().rsplit(None, 1)
            y = int(label)
        except ValueError:  # one token only, or a label that is not an integer
            y = -1
        if y < 0:
            raise DataError(
                f"{what}: {list_file}:{n}: expected 'path label' with a non-negative integer label, got {line.strip()!r}"
            )
        if Path(rel).is_absolute():
            raise DataError(f"{what}: {list_file}:{n}: absolute path {rel!r}; list images relative to {base}")
        if ".." in Path(rel).parts:
            raise DataError(
                f"{what}: {list_file}:{n}: {rel!r} points outside the task folder {base}; list images inside it"
            )
        paths.append(base / rel)
        labels.append(y)
    return FileSource(paths, labels, base)  # check_files keeps every image inside base (symlinks resolved)


# ---------------------------------------------------------------- transforms


def to_uint8(img: Image.Image, img_size: int) -> torch.Tensor:
    """Any PIL image -> RGB, bicubic (antialiased) resize to ``img_size x img_size`` -> uint8 ``(3, H, W)``."""
    # Convert first: resizing a palette image would interpolate palette indices; grayscale and RGBA become RGB.
    rgb = img.convert("RGB")
    if rgb.size != (img_size, img_size):
        # PIL's bicubic filter widens its support when shrinking, i.e. it antialiases (torchvision's Resize on
        # PIL images does exactly this, which is what the common VTAB-1k code uses).
        rgb = rgb.resize((img_size, img_size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., 3, H, W)`` -> float ``(images / 255 - mean) / std``; ``mean``/``std`` shaped ``(3, 1, 1)``."""
    return (images.float() / 255.0 - mean.to(images.device)) / std.to(images.device)


def _stats(opts: LoadOptions) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(opts.mean).view(3, 1, 1), torch.tensor(opts.std).view(3, 1, 1)


# ---------------------------------------------------------------- datasets


class InMemoryDataset(Dataset):
    """Decoded images kept as uint8; items are normalised on the fly.

    Attributes:
        images: uint8 tensor ``(N, 3, H, W)``, already resized. An engine may batch it directly and call
            :meth:`normalize` on the batch (on any device) instead of going through ``__getitem__``.
        labels: int64 tensor ``(N,)``.
        mean: float tensor ``(3, 1, 1)``.
        std: float tensor ``(3, 1, 1)``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return normalize(self.images[index], self.mean, self.std), int(self.labels[index])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise a uint8 batch taken from :attr:`images`."""
        return normalize(images, self.mean, self.std)


class LazyImageDataset(Dataset):
    """Decodes, resizes and normalises one image per item (for splits too large to keep in memory).

    Picklable, so a DataLoader with ``num_workers > 0`` can spread the decoding.
    """

    def __init__(self, source: ImageSource, img_size: int, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.source = source
        self.img_size = img_size
        self.labels = torch.tensor(source.labels, dtype=torch.long)
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = decode(self.source, index, self.img_size)
        return normalize(img, self.mean, self.std), int(self.labels[index])


def decode(source: ImageSource, index: int, img_size: int, what: str = "data") -> torch.Tensor:
    """Image ``index`` of ``source`` as uint8 ``(3, img_size, img_size)``; a DataError if it cannot be read."""
    try:
        with source.load(index) as img:
            return to_uint8(img, img_size)
    except (
        OSError,
        ValueError,
        Image.DecompressionBombError,
    ) as e:  # PIL's errors name the file; its pixel limit stays
        raise DataError(f"{what}: cannot decode image {index}: {e}; replace it or remove it from the split") from e


def decode_all(source: ImageSource, img_size: int, *, progress: bool = False, desc: str = "") -> torch.Tensor:
    """Decode every image of ``source`` to one uint8 tensor ``(N, 3, img_size, img_size)``."""
    out = torch.empty((len(source), 3, img_size, img_size), dtype=torch.uint8)

    # PIL releases the GIL while decoding and resizing, so threads give a near-linear speed-up without the
    # start-up and pickling cost of processes.
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        for i, img in enumerate(
            tqdm(
                pool.map(lambda i: decode(source, i, img_size, desc or "data"), range(len(source))),
                total=len(source),
                desc=desc,
                disable=None if progress else True,  # None: off when not a terminal
            )
        ):
            out[i] = img
    return out


def _cached_decode(source: ImageSource, opts: LoadOptions, desc: str, cache_dir: Path | None) -> torch.Tensor:
    key = source.fingerprint() if (opts.cache and cache_dir is not None) else None
    if key is None:
        return decode_all(source, opts.img_size, progress=opts.progress, desc=desc)
    digest = hashlib.sha256(f"{_DECODE_VERSION}\n{opts.img_size}\n{key}".encode()).hexdigest()[:24]
    path = cache_dir / f"{digest}_{opts.img_size}.npy"
    if path.is_file():
        # .npy without pickle: plain array bytes, nothing executable.
        return torch.from_numpy(np.load(path, allow_pickle=False))
    images = decode_all(source, opts.img_size, progress=opts.progress, desc=desc)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, images.numpy(), allow_pickle=False)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    except OSError:
        pass  # a read-only data folder only loses the cache, not the run
    return images


def make_dataset(source: ImageSource, opts: LoadOptions, *, desc: str = "", cache_dir: Path | None = None) -> Dataset:
    """Turn a source into an :class:`InMemoryDataset` (small splits or ``in_memory=True``) or a lazy one."""
    mean, std = _stats(opts)
    keep = opts.in_memory if opts.in_memory is not None else len(source) < IN_MEMORY_MAX
    if not keep:
        return LazyImageDataset(source, opts.img_size, mean, std)
    images = _cached_decode(source, opts, desc, cache_dir)
    return InMemoryDataset(images, torch.tensor(source.labels, dtype=torch.long), mean, std)


# ---------------------------------------------------------------- splits


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (train, val), taking ``val_fraction`` of every class into val.

    Each class with at least two images gives ``max(1, round(n * val_fraction))`` of them to val and keeps
    at least one in train, so both sides see every such class. Deterministic for a given seed.

    Returns:
        Sorted train indices and sorted val indices (disjoint, covering all of ``labels``).
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    val: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < 2:
            continue
        k = min(len(idx) - 1, max(1, round(len(idx) * val_fraction)))
        val.extend(rng.permutation(idx)[:k].tolist())
    val_set = set(val)
    return [i for i in range(len(y)) if i not in val_set], sorted(val_set)


def carve_val(source: ImageSource, opts: LoadOptions, trainval: bool) -> tuple[ImageSource, ImageSource]:
    """(train, val) for sources without a validation split: a stratified, seeded share of train.

    With ``trainval`` the training source stays whole and val is the same carved share (no longer held out).
    """
    train_idx, val_idx = stratified_split(source.labels, opts.val_fraction, opts.seed)
    train = source if trainval else source.subset(train_idx)
    return train, source.subset(val_idx)


def _ranges(values: list[int]) -> str:
    """[1, 2, 3, 7] -> '1..3, 7' (at most a few ranges, then '...')."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}..{v}")
            start = None
    return ", ".join(parts[:4]) + (", ..." if len(parts) > 4 else "")


def validate_splits(
    name: str,
    splits: Sequence[ImageSource],
    *,
    num_classes: int,
    classes: Sequence[str] | None = None,
    fixed_classes: bool = False,
) -> None:
    """Every split has images; labels lie in ``[0, num_classes)``; without class names, the labels of all splits
    together cover ``0..num_classes-1`` with no gap (a stray label such as 999 would silently make a 1000-way head),
    unless the source fixes its label space (``fixed_classes``: DomainNet's 345 classes, a torchvision set).
    A class that val or test has but train lacks (VTAB-1k's sun397 has some) is only a warning.

    Raises:
        DataError: naming the split, the labels and the fix.
    """
    for split, src in zip(("train", "val", "test"), splits):
        if len(src) == 0:
            raise DataError(f"{name}: the {split} split is empty; list at least one 'path label' line in it")
    seen = set().union(*(set(s.labels) for s in splits))
    top = max(seen)
    if top >= num_classes:
        raise DataError(f"{name}: label {top} is outside the {num_classes} classes named; fix the label")
    gaps = sorted(set(range(num_classes)) - seen)
    if classes is None and not fixed_classes and gaps:
        raise DataError(
            f"{name}: labels must cover 0..{num_classes - 1} with no gap, but {_ranges(gaps)} never appear "
            f"(the largest label is {top}); fix the labels, or name every class in a classes.txt"
        )
    not_in_train = sorted(seen - set(splits[0].labels))
    if not_in_train and name not in _WARNED:
        _WARNED.add(name)  # once per task and process: a run lists its data twice (fail-fast check, then loading)
        log.warning("warning: %s: class %s appears in val or test but never in train", name, _ranges(not_in_train))


def require_root(spec: str, root: Path | None, hint: str) -> Path:
    """The data root, or a DataError that says which flag to pass."""
    if root is None:
        raise DataError(f"{spec}: no data root given; pass --data-root {hint}")
    if not root.is_dir():
        raise DataError(f"{spec}: data root {root} does not exist; pass --data-root {hint}")
    return root


def task_from_sources(
    name: str,
    splits: tuple[ImageSource, ImageSource, ImageSource],
    opts: LoadOptions,
    *,
    num_classes: int,
    classes: list[str] | None = None,
    cache_dir: Path | None = None,
    fixed_classes: bool = False,
) -> TaskData:
    """A :class:`TaskData` from the (train, val, test) sources of one task, each made into a dataset.

    The splits are validated first (:func:`validate_splits`); with ``opts.check_only`` nothing is decoded and the
    task's splits are the sources themselves.
    """
    validate_splits(name, splits, num_classes=num_classes, classes=classes, fixed_classes=fixed_classes)
    if opts.check_only:
        train, val, test = splits
        return TaskData(name=name, train=train, val=val, test=test, num_classes=num_classes, classes=classes)
    train, val, test = (
        make_dataset(src, opts, desc=f"{name} {split}", cache_dir=cache_dir)
        for src, split in zip(splits, ("train", "val", "test"))
    )
    return TaskData(name=name, train=train, val=val, test=test, num_classes=num_classes, classes=classes)
