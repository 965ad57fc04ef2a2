"""CIFAR-10 and CIFAR-100 from their python batch files, without unpickling arbitrary objects.

CIFAR ships as pickled dicts of numpy arrays. ``pickle.load`` on such a file runs whatever callable the file
names; a file from a mirror, a shared disk or a colleague's tarball could name ``os.system``. The reader here
unpickles with an allow-list: the dict, list, str and bytes of the format and numpy's own array and dtype
constructors; any other callable makes the file a ``DataError`` before anything is called.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mimi.core.errors import DataError

# (module, name) a CIFAR batch file may refer to: numpy arrays and dtypes (numpy 1 and 2 module paths), and
# the bytes-from-latin-1 helper Python 2 pickles use for byte strings.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch file never does")


def load_batch(path: Path) -> dict[str, Any]:
    """One CIFAR batch (or meta) file as a dict with str keys; DataError if it is anything else."""
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnly(f, encoding="latin1").load()  # latin1: the files were written by Python 2
    except FileNotFoundError:
        raise
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ...: the file is not what it should be
        raise DataError(
            f"{path}: not a CIFAR batch file ({type(e).__name__}: {e}); "
            "replace it with the one from the official archive"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR batch file (holds a {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files, what its dicts call things, and its archive."""

    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    labels_key: str
    names_key: str
    url: str
    archive: str
    md5: str


CIFAR10 = CifarLayout(
    "cifar-10-batches-py",
    tuple(f"data_batch_{k}" for k in range(1, 6)),
    ("test_batch",),
    "batches.meta",
    "labels",
    "label_names",
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a",
)
CIFAR100 = CifarLayout(
    "cifar-100-python",
    ("train",),
    ("test",),
    "meta",
    "fine_labels",
    "fine_label_names",
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "cifar-100-python.tar.gz",
    "eb9058c3a382ffc7106e4002c42a8d85",
)


def download(layout: CifarLayout, root: Path) -> None:
    """Fetch and unpack the official archive (md5-checked by torchvision's helper, which unpickles nothing)."""
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(layout.url, str(root), filename=layout.archive, md5=layout.md5)


class CifarArrays(Dataset):
    """One split of CIFAR as (PIL image, label) items, with ``targets`` and ``classes`` like torchvision's."""

    def __init__(self, root: Path, layout: CifarLayout, train: bool) -> None:
        folder = Path(root) / layout.folder
        images, self.targets = [], []
        for name in layout.train if train else layout.test:
            path = folder / name
            batch = load_batch(path)
            data, labels = batch.get("data"), batch.get(layout.labels_key)
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise DataError(f"{path}: 'data' is not an N x 3072 uint8 array; the file is not a CIFAR batch")
            if labels is None or len(labels) != len(data):
                raise DataError(f"{path}: {layout.labels_key!r} does not give one label per image")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # planar rows -> HWC
            self.targets += [int(y) for y in labels]
        self.data = np.ascontiguousarray(np.concatenate(images))
        names = load_batch(folder / layout.meta).get(layout.names_key)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{folder / layout.meta}: no list of class names under {layout.names_key!r}")
        self.classes = names

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.data[index]), self.targets[index]


def open_cifar(layout: CifarLayout, root: Path, split: str, download_missing: bool) -> CifarArrays:
    """A split (``train`` or ``test``); FileNotFoundError if files are missing and ``download_missing`` is off."""
    if download_missing:
        download(layout, Path(root))
    return CifarArrays(Path(root), layout, train=split == "train")
