"""Physical pruning of adapter neurons, under its public name (``mimi.shrink.apply_plan``, ``mimi.shrink.prune``).

The implementation lives in :mod:`mimi.core.shrink`."""

from mimi.core.shrink import apply_plan, plan_global, plan_local, prune

__all__ = ["apply_plan", "plan_global", "plan_local", "prune"]
