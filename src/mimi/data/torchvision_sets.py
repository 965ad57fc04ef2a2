"""CIFAR-10, CIFAR-100, SVHN and Oxford Flowers-102: torchvision's readers, and ours for CIFAR.

``root`` is the folder torchvision reads (and would download into). Files are looked for first; a download
is tried only when they are missing, and a failed download becomes one DataError line saying which files
to put where. CIFAR's batch files are pickles: they are read by ``cifar.py`` with an allow-list of numpy's
array constructors, never by ``pickle.load`` (which torchvision's CIFAR reader uses).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torchvision.datasets as tvd
from PIL import Image
from torch.utils.data import Dataset

from mimi.core.errors import DataError
from mimi.data.base import ImageSource, LoadOptions, TaskData, carve_val, register_dataset, task_from_sources
from mimi.data.cifar import CIFAR10, CIFAR100, open_cifar


class TorchvisionSource(ImageSource):
    """A torchvision dataset (built without transforms, so items are PIL images) seen as an ImageSource."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.labels = [int(y) for y in _labels(dataset)]

    def load(self, index: int) -> Image.Image:
        return self.dataset[index][0]


class ConcatSource(ImageSource):
    """Several sources one after the other (train + val for ``trainval``)."""

    def __init__(self, parts: Sequence[ImageSource]) -> None:
        self.parts = list(parts)
        self._where = [(p, i) for p in self.parts for i in range(len(p))]
        self.labels = [y for p in self.parts for y in p.labels]

    def load(self, index: int) -> Image.Image:
        part, i = self._where[index]
        return part.load(i)


def _labels(dataset: Dataset) -> Sequence[int]:
    # Read the label list torchvision keeps (CIFAR: targets, SVHN: labels, Flowers102: _labels) so that
    # building a split does not decode every image just to learn its label.
    for attr in ("targets", "labels", "_labels"):
        labels = getattr(dataset, attr, None)
        if labels is not None and len(labels) == len(dataset):
            return labels
    return [dataset[i][1] for i in range(len(dataset))]


@dataclass(frozen=True)
class TorchvisionSet:
    """How to open one torchvision dataset.

    Attributes:
        open: ``(root, split, download) -> Dataset`` for split in ``train``, ``val`` (if ``has_val``), ``test``.
        expected: What torchvision expects under root, for the error message.
        has_val: The dataset ships its own validation split; otherwise val is carved from train.
        description: One line for ``mimi data list``.
    """

    open: Callable[[Path, str, bool], Dataset]
    expected: str
    has_val: bool
    description: str


SETS: dict[str, TorchvisionSet] = {
    "cifar10": TorchvisionSet(
        partial(open_cifar, CIFAR10),
        "DIR/cifar-10-batches-py/ with data_batch_1..5, test_batch, batches.meta",
        False,
        "CIFAR-10, python batches read without unpickling code (--data-root holds cifar-10-batches-py/)",
    ),
    "cifar100": TorchvisionSet(
        partial(open_cifar, CIFAR100),
        "DIR/cifar-100-python/ with train, test, meta",
        False,
        "CIFAR-100, python batches read without unpickling code (--data-root holds cifar-100-python/)",
    ),
    "svhn": TorchvisionSet(
        lambda root, split, dl: tvd.SVHN(root, split=split, download=dl),
        "DIR/train_32x32.mat and DIR/test_32x32.mat",
        False,
        "SVHN (cropped digits) via torchvision (--data-root holds train_32x32.mat, test_32x32.mat)",
    ),
    "flowers102": TorchvisionSet(
        lambda root, split, dl: tvd.Flowers102(root, split=split, download=dl),
        "DIR/flowers-102/ with jpg/, imagelabels.mat, setid.mat",
        True,
        "Oxford Flowers-102 via torchvision, official val split (--data-root holds flowers-102/)",
    ),
}


def _open(name: str, tv: TorchvisionSet, root: Path, split: str) -> Dataset:
    try:
        return tv.open(root, split, False)
    except (RuntimeError, OSError):
        pass  # torchvision raises RuntimeError("Dataset not found or corrupted"): try to fetch it
    try:
        return tv.open(root, split, True)
    except ImportError as e:  # SVHN and Flowers102 read .mat files with scipy
        raise DataError(f"{name}: torchvision needs {e.name or 'scipy'} to read these files; pip install scipy") from e
    except Exception as e:  # no network, md5 mismatch, partial archive: all mean "put the files there yourself"
        expected = tv.expected.replace("DIR", str(root))
        raise DataError(
            f"{name}: files not found under {root} (expected {expected}); "
            "download them where the network allows or copy them there"
        ) from e


def build_torchvision(name: str, arg: str, *, root: Path | None, trainval: bool, opts: LoadOptions) -> TaskData:
    """Load a torchvision set; val is the set's own (Flowers102) or a stratified share of train."""
    tv = SETS[name]
    if arg:
        raise DataError(f"{name}:{arg}: {name} takes no argument; write just {name}")
    if root is None:
        raise DataError(f"{name}: no data root given; pass --data-root (expected there: {tv.expected})")
    train = TorchvisionSource(_open(name, tv, root, "train"))
    if tv.has_val:
        val: ImageSource = TorchvisionSource(_open(name, tv, root, "val"))
        if trainval:
            train = ConcatSource([train, val])
    else:
        train, val = carve_val(train, opts, trainval)
    test_ds = _open(name, tv, root, "test")
    test = TorchvisionSource(test_ds)
    classes = getattr(test_ds, "classes", None)
    if name == "svhn":
        classes = [str(d) for d in range(10)]  # torchvision already maps SVHN's label 10 to digit 0
    num_classes = len(classes) if classes else max(max(s.labels, default=-1) for s in (train, val, test)) + 1
    # torchvision already holds these arrays in memory or on disk in its own form: no .npy cache.
    return task_from_sources(
        name,
        (train, val, test),
        opts,
        num_classes=num_classes,
        classes=list(classes) if classes else None,
        fixed_classes=True,  # the set's own label space
    )


for _name, _tv in SETS.items():
    register_dataset(_name, _tv.description)(partial(build_torchvision, _name))
