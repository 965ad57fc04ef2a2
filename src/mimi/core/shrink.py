"""Physical pruning of adapter neurons to a parameter budget."""

from __future__ import annotations

import math

import torch
from torch import nn

from mimi.core.adapters import Adapter, adapters, remove_adapter
from mimi.core.errors import ConfigError
from mimi.core.scores import GradientAccumulator, check_score, is_global, renamed_score_arg, score_neurons


def _cost(adapter: Adapter, kept: int) -> int:
    return adapter.num_params(kept)


def plan_global(ads: dict[str, Adapter], scores: dict[str, torch.Tensor], budget: int) -> dict[str, list[int]]:
    """Keep the longest prefix of neurons, in descending score over all adapters, whose total cost fits the budget.

    A neuron costs ``d_in + d_out`` (+1 down bias); the first neuron of an adapter also pays its up-bias.
    Ties are broken by model order, then neuron index, so the plan is deterministic.
    """
    order = sorted(
        ((float(s), i, j) for i, (name, s_vec) in enumerate(scores.items()) for j, s in enumerate(s_vec.tolist())),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    names = list(scores)
    keep: dict[str, list[int]] = {n: [] for n in names}
    total = 0
    for _, i, j in order:
        a = ads[names[i]]
        extra = a.neuron_cost() + (a.num_params(1) - a.neuron_cost() if not keep[names[i]] else 0)
        if total + extra > budget:
            break
        keep[names[i]].append(j)
        total += extra
    return keep


def plan_local(ads: dict[str, Adapter], scores: dict[str, torch.Tensor], budget: int) -> dict[str, list[int]]:
    """Remove the same fraction of neurons from every adapter (largest kept fraction that fits), best-first."""

    def counts(q: float) -> dict[str, int]:
        return {n: math.floor(q * a.hidden_dim + 1e-9) for n, a in ads.items()}

    # Candidate kept fractions are the breakpoints k / r_i; take the largest that fits.
    candidates = sorted({k / a.hidden_dim for a in ads.values() for k in range(a.hidden_dim + 1)}, reverse=True)
    chosen = {n: 0 for n in ads}
    for q in candidates:
        c = counts(q)
        if sum(_cost(ads[n], k) for n, k in c.items()) <= budget:
            chosen = c
            break
    return {n: torch.argsort(scores[n], descending=True, stable=True)[: chosen[n]].tolist() for n in ads}


def apply_plan(model: nn.Module, keep: dict[str, list[int]]) -> dict[str, int]:
    """Slice every adapter to its kept neurons; remove adapters left with none. Returns the new sizes."""
    sizes: dict[str, int] = {}
    for name, adapter in adapters(model):
        idx = keep.get(name, [])
        if not idx:
            remove_adapter(model, name)
            continue
        if len(idx) != adapter.hidden_dim:
            adapter.shrink_(torch.tensor(idx))
        sizes[name] = adapter.hidden_dim
    return sizes


def prune(
    model: nn.Module,
    *,
    budget: int,
    score: str = "mimi",
    seed: int = 0,
    accumulator: GradientAccumulator | None = None,
    method: str | None = None,
) -> dict[str, int]:
    """Physically shrink the adapters so that all adapter parameters together are <= ``budget``.

    Global scores keep the globally highest-scoring neurons; local ones (``magnitude``) remove the same
    fraction in every adapter. An adapter left with no neuron is removed from the model.

    Args:
        model: a model holding adapters.
        budget: the largest number of adapter parameters allowed (head not included).
        score: neuron score name (see :func:`mimi.score_neurons`).
        seed: seed of the ``random`` score.
        accumulator: accumulated gradients for the ``gradient`` score.
        method: deprecated name of ``score``.

    Returns:
        The new hidden size of each remaining adapter (removed adapters are absent).
    """
    score = check_score(renamed_score_arg(score, method, caller="prune"))
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise ConfigError(f"prune: budget must be a non-negative integer number of parameters, got {budget!r}")
    ads = dict(adapters(model))
    if sum(a.num_params() for a in ads.values()) <= budget:
        return {n: a.hidden_dim for n, a in ads.items()}
    scores = score_neurons(model, score, seed=seed, accumulator=accumulator)
    plan = plan_global if is_global(score) else plan_local
    return apply_plan(model, plan(ads, scores, budget))
