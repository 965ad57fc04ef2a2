"""Any image-classification folder in ImageFolder style.

::

    <path>/train/<class>/<image>   <path>/val/<class>/<image> (optional)   <path>/test/<class>/<image>

Classes are the sorted sub-folder names of ``train/``; without ``val/`` a stratified share of train is used.
"""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from mimi.core.errors import DataError
from mimi.data.base import FileSource, LoadOptions, TaskData, carve_val, register_dataset, task_from_sources


def _scan(split_dir: Path, classes: list[str], name: str) -> FileSource:
    """Images of ``split_dir/<class>/**``, labelled by the position of their class in ``classes``."""
    extra = sorted(
        d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in classes
    )
    if extra:
        raise DataError(
            f"{name}: {split_dir} has class folder(s) {extra} that train/ lacks; use the same class folders"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for y, cls in enumerate(classes):
        files = sorted(p for p in (split_dir / cls).rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        paths += files
        labels += [y] * len(files)
    if not paths:
        raise DataError(f"{name}: no images under {split_dir}; expected {split_dir}/<class>/<image>")
    return FileSource(paths, labels)


@register_dataset(
    "folder", "ImageFolder-style PATH/{train,val,test}/<class>/<image> (val/ optional)", usage="folder:PATH"
)
def build_folder(path: str, *, root: Path | None, trainval: bool, opts: LoadOptions) -> TaskData:
    """Load ``PATH/{train,val,test}``; a relative PATH is resolved against ``root`` when one is given."""
    if not path:
        raise DataError("folder: no path given; write folder:PATH with PATH/train, PATH/test class folders")
    base = Path(path).expanduser()
    if not base.is_absolute() and root is not None:
        base = root / base
    name = f"folder:{base}"
    if not base.is_dir():
        raise DataError(f"{name}: no such folder; pass folder:PATH (relative paths are resolved against --data-root)")
    for required in ("train", "test"):
        if not (base / required).is_dir():
            raise DataError(f"{name}: missing {base / required}/; expected {base}/{{train,val,test}}/<class>/<image>")
    classes = sorted(d.name for d in (base / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    train = _scan(base / "train", classes, name)
    if (base / "val").is_dir():
        val = _scan(base / "val", classes, name)
        if trainval:
            train = FileSource(train.paths + val.paths, train.labels + val.labels, train.base)
    else:
        train, val = carve_val(train, opts, trainval)
    test = _scan(base / "test", classes, name)
    cache_dir = base / ".cache"
    return task_from_sources(
        name, (train, val, test), opts, num_classes=len(classes), classes=classes, cache_dir=cache_dir
    )
