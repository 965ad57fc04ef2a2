"""The iterative MiMi schedule: which parameter target each pruning cycle aims at."""

from __future__ import annotations

import math
import warnings
from dataclasses import InitVar, dataclass, field

from torch import nn

from mimi.core.adapters import adapter_param_count
from mimi.core.errors import ConfigError
from mimi.core.scores import GradientAccumulator, check_score, renamed_score_arg
from mimi.core.shrink import prune


@dataclass
class MiMiPruner:
    """Pruning state of one MiMi run; the training loop calls it between cycles, it does not own the loop.

    Each cut removes a fraction ``rho`` of the adapter parameters still alive (``target = current * (1 - rho)``),
    until that would go below ``budget``: the last cut then lands on the budget exactly (as close as
    whole neurons allow), and :attr:`done` becomes True. The model must be retrained after every cut.

    With ``stops`` (budgets above ``budget`` where the run also keeps a task), a cut that would pass below the next
    stop lands on it instead, and the schedule goes on from there. Up to the first stop, the targets are those of a
    run to that stop alone; below it they restart from the stop (``stop * (1 - rho)``, ...), so a later budget is
    reached by a different path than a run to it alone would take.

    Args:
        budget: adapter parameters allowed at the end (head excluded).
        stops: larger budgets the schedule lands on on its way, largest first.
        rho: fraction removed per cycle, in (0, 1]; ``rho=1`` is one-shot pruning straight to the budget.
        score: neuron score (see :func:`mimi.core.scores.score_names`).
        seed: seed of the ``random`` score.
        method: deprecated name of ``score`` (keyword only).
    """

    budget: int
    rho: float = 0.5
    score: str = "mimi"
    seed: int = 0
    cycle: int = 0
    history: list[dict] = field(default_factory=list)
    stops: list[int] = field(default_factory=list)
    method: InitVar[str | None] = None

    def __post_init__(self, method: str | None) -> None:
        # stacklevel 4: renamed_score_arg <- __post_init__ <- the generated __init__ <- the caller
        self.score = renamed_score_arg(self.score, method, caller="MiMiPruner", stacklevel=4)
        if not isinstance(self.budget, int) or self.budget < 0:
            raise ConfigError(f"MiMiPruner: budget must be a non-negative integer, got {self.budget!r}")
        self.stops = sorted(set(self.stops), reverse=True)
        if any(not isinstance(b, int) or b <= self.budget for b in self.stops):
            raise ConfigError(f"MiMiPruner: stops must be integers above the budget {self.budget}, got {self.stops!r}")
        if not 0.0 < self.rho <= 1.0:
            raise ConfigError(f"MiMiPruner: rho must be in (0, 1], got {self.rho!r}")
        check_score(self.score)

    def next_target(self, current: int) -> int | None:
        """Parameter target of the next cut given the current adapter parameter count; None when done."""
        if current <= self.budget:
            return None
        floor = max(b for b in (*self.stops, self.budget) if b < current)  # the next budget below: never cut past it
        return max(floor, math.floor(current * (1.0 - self.rho)))

    @property
    def budgets(self) -> list[int]:
        """Every budget the schedule lands on, largest first (the stops, then the final budget)."""
        return [*self.stops, self.budget]

    def landed(self) -> int | None:
        """The budget the last cut landed on (its target), or None when the last cut was an intermediate one."""
        if not self.history or self.history[-1]["target"] not in self.budgets:
            return None
        return self.history[-1]["target"]

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
        sizes = prune(model, budget=target, score=self.score, seed=self.seed, accumulator=accumulator)
        self.cycle += 1
        self.history.append(
            {"cycle": self.cycle, "target": target, "before": before, "after": adapter_param_count(model)}
        )
        return sizes

    def state_dict(self) -> dict:
        return {
            "budget": self.budget,
            "rho": self.rho,
            "score": self.score,
            "seed": self.seed,
            "cycle": self.cycle,
            "history": list(self.history),
            **({"stops": list(self.stops)} if self.stops else {}),  # a single-budget state reads as it always did
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> MiMiPruner:
        """The pruner :meth:`state_dict` saved; also reads states written before the score was named ``score``
        (key ``"method"``), as run folders from then hold them, without a warning: the user cannot change them."""
        state = dict(state)
        if "method" in state:
            old = state.pop("method")
            state.setdefault("score", old)
        return cls(**state)


def _deprecated_method(self: MiMiPruner) -> str:
    warnings.warn("MiMiPruner.method is deprecated; read .score", DeprecationWarning, stacklevel=2)
    return self.score


# Set after the dataclass is built: in the class body it would become the default of the ``method`` InitVar, and
# without it ``pruner.method`` would silently read that default (None).
MiMiPruner.method = property(_deprecated_method)  # type: ignore[assignment]
