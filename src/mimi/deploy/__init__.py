"""Serving trained tasks: an adapter bank for many tasks on one backbone, batch prediction, ONNX export."""

from .bank import AdapterBank
from .taskfile import TaskFile, read_task_file

__all__ = ["AdapterBank", "TaskFile", "read_task_file"]
