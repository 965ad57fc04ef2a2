"""VTAB-1k in its common on-disk layout (the one the NOAH / V-PETL code reads).

::

    <root>/<task>/train800.txt  val200.txt  train800val200.txt  test.txt  [classes.txt]
    <root>/<task>/images/...    (paths in the list files are relative to <root>/<task>)

Any folder in this layout is a task, which is how the project's own MiniVTAB suite is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mimi.core.errors import DataError
from mimi.data.base import (
    FileSource,
    LoadOptions,
    TaskData,
    check_files,
    read_list_file,
    register_dataset,
    require_root,
    task_from_sources,
)

#: The 19 task folders of the common layout.
TASKS = (
    "caltech101",
    "cifar",
    "dtd",
    "oxford_flowers102",
    "oxford_iiit_pet",
    "svhn",
    "sun397",
    "patch_camelyon",
    "eurosat",
    "resisc45",
    "diabetic_retinopathy",
    "clevr_count",
    "clevr_dist",
    "dmlab",
    "kitti",
    "dsprites_loc",
    "dsprites_ori",
    "smallnorb_azi",
    "smallnorb_ele",
)

#: Other names people use for those tasks (after lower-casing and '-' -> '_').
ALIASES = {
    "caltech": "caltech101",
    "caltech_101": "caltech101",
    "cifar100": "cifar",
    "cifar_100": "cifar",
    "dtd47": "dtd",
    "flowers": "oxford_flowers102",
    "flowers102": "oxford_flowers102",
    "flowers_102": "oxford_flowers102",
    "oxford_flowers": "oxford_flowers102",
    "pets": "oxford_iiit_pet",
    "pet": "oxford_iiit_pet",
    "oxford_pets": "oxford_iiit_pet",
    "oxford_iiit_pets": "oxford_iiit_pet",
    "svhn_cropped": "svhn",
    "sun": "sun397",
    "camelyon": "patch_camelyon",
    "pcam": "patch_camelyon",
    "patchcamelyon": "patch_camelyon",
    "resisc": "resisc45",
    "retinopathy": "diabetic_retinopathy",
    "dr": "diabetic_retinopathy",
    "clevr_count_all": "clevr_count",
    "clevr_distance": "clevr_dist",
    "clevr_closest_object_distance": "clevr_dist",
    "kitti_dist": "kitti",
    "kitti_distance": "kitti",
    "dsprites_location": "dsprites_loc",
    "dsprites_orientation": "dsprites_ori",
    "smallnorb_azimuth": "smallnorb_azi",
    "smallnorb_elevation": "smallnorb_ele",
}

_HINT = "pointing at the folder that holds the VTAB-1k task folders"


def canonical_task(name: str) -> str:
    """The common-layout folder name of a task name or alias (unknown names are returned normalised)."""
    norm = name.strip().lower().replace("-", "_")
    return ALIASES.get(norm, norm)


def _task_dir(root: Path, task: str) -> Path:
    # The canonical folder wins; a folder spelled exactly as given (e.g. a MiniVTAB task) is accepted as-is.
    for candidate in dict.fromkeys((canonical_task(task), task, task.lower())):
        if (root / candidate).is_dir():
            return root / candidate
    raise DataError(f"vtab1k:{task}: no such task folder {root / canonical_task(task)}; pass --data-root {_HINT}")


def _classes(task_dir: Path, splits: list[FileSource]) -> tuple[int, list[str] | None]:
    top = max((max(s.labels, default=-1) for s in splits), default=-1) + 1
    names_file = task_dir / "classes.txt"
    if not names_file.is_file():
        return top, None
    names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) < top:
        raise DataError(f"vtab1k:{task_dir.name}: {names_file} names {len(names)} classes but a label is {top - 1}")
    return len(names), names


@register_dataset(
    "vtab1k", "VTAB-1k task folder under --data-root (train800/val200/test lists); also MiniVTAB", usage="vtab1k:TASK"
)
def build_vtab1k(task: str, *, root: Path | None, trainval: bool, opts: LoadOptions) -> TaskData:
    """Load one VTAB-1k task: train=train800 (or train800val200), val=val200, test=test."""
    if not task:
        raise DataError("vtab1k: no task given; write vtab1k:TASK, e.g. vtab1k:cifar")
    root = require_root(f"vtab1k:{task}", root, _HINT)
    task_dir = _task_dir(root, task)
    name = f"vtab1k:{task_dir.name}"

    def read(split: str) -> FileSource:
        return read_list_file(task_dir / f"{split}.txt", task_dir, name)

    train, val, test = read("train800"), read("val200"), read("test")
    if trainval:
        both = task_dir / "train800val200.txt"
        # train800val200 is by definition train800 + val200; rebuild it when a layout leaves it out.
        train = (
            read("train800val200")
            if both.is_file()
            else FileSource(train.paths + val.paths, train.labels + val.labels, train.base)
        )
    for split in (train, val, test):
        check_files(split, name)
    num_classes, classes = _classes(task_dir, [train, val, test])
    cache_dir = task_dir / ".cache"
    task = task_from_sources(
        name, (train, val, test), opts, num_classes=num_classes, classes=classes, cache_dir=cache_dir
    )
    return dataclasses.replace(task, license=_licence(task_dir))


def _licence(task_dir: Path) -> str | None:
    """The data licence a MiniVTAB build records in ``minivtab.json`` (None for other folders)."""
    try:
        spec = json.loads((task_dir / "minivtab.json").read_text()).get("spec", {})
    except (OSError, ValueError, AttributeError):
        return None
    lic = spec.get("licence") if isinstance(spec, dict) else None
    return lic if isinstance(lic, str) and lic else None
