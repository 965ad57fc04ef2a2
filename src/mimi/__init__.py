"""mimi: finetune frozen Vision Transformers with mini adapters (MiMi, WACV 2024)."""

from .adapters import (
    Adapter,
    AdapterConfig,
    adapter_config,
    adapter_param_count,
    adapters,
    add_adapters,
    count_trainable,
    remove_adapter,
)
from .checkpoint import load_adapters, read_metadata, save_adapters
from .deploy import AdapterBank
from .errors import BackboneError, CheckpointError, ConfigError, DataError, MimiError, ModelError
from .schedule import MiMiPruner
from .scores import SCORES, GradientAccumulator, score_neurons
from .shrink import prune

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
