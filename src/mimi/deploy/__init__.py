"""Serving trained tasks: an adapter bank for many tasks on one backbone, batch prediction, ONNX export."""

from mimi.deploy.bank import AdapterBank
from mimi.deploy.tasks import RecordedBackbone, TaskFile, read_task_file, recorded_backbone

__all__ = ["AdapterBank", "RecordedBackbone", "TaskFile", "read_task_file", "recorded_backbone"]
