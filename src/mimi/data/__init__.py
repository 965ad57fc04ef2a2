"""Datasets for the engine: ``build_task(spec, ...)`` returns a :class:`TaskData` with train/val/test splits.

Sources register themselves by spec prefix when their module is imported below (``mimi data list`` shows
them). ``minivtab`` builds the project's own suite on disk; it is loaded back with ``vtab1k:TASK``.
"""

from mimi.data import domainnet, folder, torchvision_sets, vtab1k  # noqa: F401  (importing registers the sources)
from mimi.data.base import (
    DATASETS,
    IN_MEMORY_MAX,
    FileSource,
    ImageSource,
    InMemoryDataset,
    LazyImageDataset,
    LoadOptions,
    TaskData,
    build_task,
    list_datasets,
    normalize,
    register_dataset,
    stratified_split,
    to_uint8,
)

__all__ = [
    "DATASETS",
    "IN_MEMORY_MAX",
    "FileSource",
    "ImageSource",
    "InMemoryDataset",
    "LazyImageDataset",
    "LoadOptions",
    "TaskData",
    "build_task",
    "list_datasets",
    "normalize",
    "register_dataset",
    "stratified_split",
    "to_uint8",
]
