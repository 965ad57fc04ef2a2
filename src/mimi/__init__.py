"""mimi: finetune frozen Vision Transformers with mini adapters (MiMi, WACV 2024)."""

from mimi.core.adapters import (
    Adapter,
    AdapterConfig,
    adapter_config,
    adapter_param_count,
    adapters,
    add_adapters,
    count_trainable,
    remove_adapter,
)
from mimi.core.errors import BackboneError, CheckpointError, ConfigError, DataError, MimiError, ModelError
from mimi.core.schedule import MiMiPruner
from mimi.core.scores import SCORES, GradientAccumulator, score_neurons
from mimi.core.shrink import prune
from mimi.core.taskfile import load_adapters, read_metadata, save_adapters
from mimi.deploy import AdapterBank

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterBank",
    "AdapterConfig",
    "BackboneError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "GradientAccumulator",
    "MiMiPruner",
    "MimiError",
    "ModelError",
    "SCORES",
    "adapter_config",
    "adapter_param_count",
    "adapters",
    "add_adapters",
    "count_trainable",
    "load_adapters",
    "prune",
    "read_metadata",
    "remove_adapter",
    "save_adapters",
    "score_neurons",
]
