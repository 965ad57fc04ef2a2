"""The small interface every training method implements, and the registry of methods by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from mimi.core.errors import ConfigError

if TYPE_CHECKING:
    from mimi.config import TrainConfig


class Method:
    """A way to make a frozen backbone trainable for a task.

    ``prepare`` inserts modules and sets ``requires_grad``; ``prunes`` says whether the trainer runs
    MiMi cycles; ``after_backward`` is called after every backward pass (e.g. AdaLoRA's rank allocation).
    """

    name: str = ""
    description: str = ""
    prunes: bool = False

    def prepare(self, model: nn.Module, cfg: TrainConfig, *, total_steps: int) -> nn.Module:
        raise NotImplementedError

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Hook called after each backward pass, before the optimizer step."""

    def extra_info(self, model: nn.Module) -> dict[str, Any]:
        """Method-specific facts to record in the run summary (e.g. per-layer ranks)."""
        return {}


METHODS: dict[str, Callable[[], Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]()


def method_kwargs(cfg: TrainConfig, allowed: dict[str, Any]) -> dict[str, Any]:
    """Validated method options: ``allowed`` maps each option to its default."""
    unknown = sorted(set(cfg.method_kwargs) - set(allowed))
    if unknown:
        raise ConfigError(f"method {cfg.method}: unknown method_kwargs {unknown}; allowed: {sorted(allowed)}")
    return {**allowed, **cfg.method_kwargs}
