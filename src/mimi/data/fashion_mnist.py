"""Fashion-MNIST from where it lives offline: Debian's ``dataset-fashion-mnist``, torchvision's folder
layout, or a folder given by the user; idx files (gzip or raw) read with numpy, nothing installed."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from mimi.core.errors import ConfigError, DataError

__all__ = ["find_fashion_mnist", "load_fashion_mnist"]

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DEBIAN_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _has_fmnist(folder: Path) -> bool:
    return all(_idx_file(folder, stem) is not None for pair in _FMNIST_FILES.values() for stem in pair)


def find_fashion_mnist(path: str | Path | None = None) -> Path:
    """Locates the Fashion-MNIST idx files on disk.

    Looks for ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in each candidate folder and in
    torchvision's layout ``<folder>/FashionMNIST/raw/``. Candidates are ``path`` alone when it is given
    (an explicit folder that lacks the files is an error, not silently replaced by another copy);
    otherwise ``$FASHION_MNIST_DIR`` and then ``/usr/share/datasets/fashion-mnist/`` (Debian's package).

    Args:
        path: Folder given by the user (e.g. ``--fmnist-dir``), or None to search the defaults.

    Returns:
        The folder holding the four files.

    Raises:
        DataError: If no candidate folder holds all four files.
    """
    if path is not None:
        bases = [Path(path)]
    else:
        bases = [Path(os.environ["FASHION_MNIST_DIR"])] if os.environ.get("FASHION_MNIST_DIR") else []
        bases.append(_DEBIAN_FMNIST_DIR)
    tried = []
    for base in bases:
        for folder in (base, base / "FashionMNIST" / "raw"):
            tried.append(str(folder))
            if _has_fmnist(folder):
                return folder
    raise DataError(
        f"Fashion-MNIST idx files not found in {', '.join(tried)}: install Debian's package "
        "(apt-get install dataset-fashion-mnist), or let torchvision download it where the network allows "
        "(torchvision.datasets.FashionMNIST(DIR, download=True)), or pass --fmnist-dir DIR / set $FASHION_MNIST_DIR"
    )


def _read_idx(path: Path) -> np.ndarray:
    """Reads an idx1/idx3 ubyte file (gzip or raw) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise DataError(f"{path}: size {len(data)} does not match the idx header shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(split: str, path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loads one Fashion-MNIST split with numpy.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (the 10,000 ``t10k`` images).
        path: Folder passed on to :func:`find_fashion_mnist`.

    Returns:
        ``(images, labels)``: uint8 arrays of shape ``(N, 28, 28)`` and ``(N,)``.

    Raises:
        ConfigError: If ``split`` is not ``train`` or ``test``.
        DataError: If the files are missing or malformed.
    """
    if split not in _FMNIST_FILES:
        raise ConfigError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    folder = find_fashion_mnist(path)
    img_stem, lab_stem = _FMNIST_FILES[split]
    images = _read_idx(_idx_file(folder, img_stem))  # type: ignore[arg-type]
    labels = _read_idx(_idx_file(folder, lab_stem))  # type: ignore[arg-type]
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split} files in {folder} have shapes {images.shape} and {labels.shape}")
    return images, labels
