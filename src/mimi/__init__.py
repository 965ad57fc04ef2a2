"""mimi: finetune frozen Vision Transformers with mini adapters (MiMi, WACV 2024).

``import mimi`` loads only the core (torch and safetensors): adapters, scores, pruning, the schedule and task files.
What needs timm, torchvision or the training and serving stacks is loaded on first use (PEP 562 ``__getattr__``):
:class:`AdapterBank` imports :mod:`mimi.deploy`, and the submodules in ``_SUBMODULES`` (``mimi.trainer``,
``mimi.config``, ...) are imported when first reached as attributes, so a script or the command line that never
serves pays nothing for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:  # type checkers and IDEs see the lazy names as ordinary imports
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

#: Public names loaded on first access, and the module each comes from. mimi.deploy imports timm (and through it
#: torchvision), the data pipeline and the training engine: over a second of imports most users of the core never need.
_LAZY: dict[str, str] = {"AdapterBank": "mimi.deploy"}

#: Submodules reachable as ``mimi.<name>`` without importing them first (``mimi.trainer.train`` after ``import mimi``).
#: Not in ``__all__``: ``from mimi import *`` must stay light.
_SUBMODULES = frozenset(
    {
        "backbones",
        "bench",
        "cli",
        "config",
        "core",
        "data",
        "deploy",
        "methods",
        "reporting",
        "shrink",
        "trainer",
        "training",
    }
)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups are plain attribute reads, no second call of this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # the import system also binds it on this module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
