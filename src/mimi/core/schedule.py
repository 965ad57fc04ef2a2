"""The iterative MiMi schedule: which parameter target each pruning cycle aims at."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from mimi.core.adapters import adapter_param_count
from mimi.core.errors import ConfigError
from mimi.core.scores import SCORES, GradientAccumulator
from mimi.core.shrink import prune


@dataclass
class MiMiPruner:
    """Pruning state of one MiMi run; the training loop calls it between cycles, it does not own the loop.

    Each cut removes a fraction ``rho`` of the adapter parameters still alive (``target = current * (1 - rho)``),
    until that would go below ``budget``: the last cut then lands on the budget exactly (as close as
    whole neurons allow), and :attr:`done` becomes True. The model must be retrained after every cut.

    Args:
        budget: adapter parameters allowed at the end (head excluded).
        rho: fraction removed per cycle, in (0, 1]; ``rho=1`` is one-shot pruning straight to the budget.
        method: neuron score (see :data:`mimi.scores.SCORES`).
        seed: seed of the ``random`` score.
    """

    budget: int
    rho: float = 0.5
    method: str = "mimi"
    seed: int = 0
    cycle: int = 0
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.budget, int) or self.budget < 0:
            raise ConfigError(f"MiMiPruner: budget must be a non-negative integer, got {self.budget!r}")
        if not 0.0 < self.rho <= 1.0:
            raise ConfigError(f"MiMiPruner: rho must be in (0, 1], got {self.rho!r}")
        if self.method not in SCORES:
            raise ConfigError(f"MiMiPruner: unknown score {self.method!r}; choose one of {sorted(SCORES)}")

    def next_target(self, current: int) -> int | None:
        """Parameter target of the next cut given the current adapter parameter count; None when done."""
        if current <= self.budget:
            return None
        return max(self.budget, math.floor(current * (1.0 - self.rho)))

    def planned_targets(self, current: int) -> list[int]:
        """All targets from ``current`` down to the budget (the planned cycles, for display)."""
        targets: list[int] = []
        while (t := self.next_target(current)) is not None:
            targets.append(t)
            current = t
        return targets

    def done(self, model: nn.Module) -> bool:
        return adapter_param_count(model) <= self.budget

    def step(self, model: nn.Module, *, accumulator: GradientAccumulator | None = None) -> dict[str, int]:
        """Score and physically prune to the next target; returns the new per-adapter sizes."""
        before = adapter_param_count(model)
        target = self.next_target(before)
        if target is None:
            raise ConfigError("MiMiPruner.step: the budget is already met; check done() first")
        sizes = prune(model, budget=target, method=self.method, seed=self.seed, accumulator=accumulator)
        self.cycle += 1
        self.history.append(
            {"cycle": self.cycle, "target": target, "before": before, "after": adapter_param_count(model)}
        )
        return sizes

    def state_dict(self) -> dict:
        return {
            "budget": self.budget,
            "rho": self.rho,
            "method": self.method,
            "seed": self.seed,
            "cycle": self.cycle,
            "history": list(self.history),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> MiMiPruner:
        return cls(**state)
