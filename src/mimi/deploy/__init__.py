"""Serving trained tasks: an adapter bank for many tasks on one backbone, batch prediction, ONNX export."""

from .bank import AdapterBank
from .taskfile import RecordedBackbone, TaskFile, read_task_file, recorded_backbone

__all__ = ["AdapterBank", "RecordedBackbone", "TaskFile", "read_task_file", "recorded_backbone"]
