"""Per-neuron importance scores of adapter hidden neurons, by name.

Every score function maps ``model -> {adapter name: Tensor[hidden_dim]}``; higher means more important.
``GLOBAL`` scores are compared across adapters with one threshold; local ones rank neurons within each adapter.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
from torch import nn

from mimi.core.adapters import Adapter, adapters
from mimi.core.errors import ConfigError


def _l1(adapter: Adapter) -> torch.Tensor:
    """Sum of |w| attached to each hidden neuron: its row of W_down plus its column of W_up."""
    return adapter.down.weight.detach().abs().sum(dim=1) + adapter.up.weight.detach().abs().sum(dim=0)


def mimi_score(adapter: Adapter) -> torch.Tensor:
    """MiMi score: mean |w| attached to the neuron, ``(|W_down[j,:]|_1 + |W_up[:,j]|_1) / (d_in + d_out)``.

    Dividing by the fan makes adapters of different widths comparable under one global threshold.
    """
    return _l1(adapter) / (adapter.in_dim + adapter.out_dim)


def mimi_weighted_score(adapter: Adapter) -> torch.Tensor:
    """MiMi score divided by the adapter's maximum: every adapter keeps its best neuron at 1.0."""
    s = mimi_score(adapter)
    return s / s.max().clamp_min(torch.finfo(s.dtype).tiny)


def lora_norm_score(adapter: Adapter) -> torch.Tensor:
    """``||W_up[:, j]||_2 * ||W_down[j, :]||_2``: the size of rank-1 component j's update (for linear adapters, LoRA)."""
    return adapter.down.weight.detach().norm(dim=1) * adapter.up.weight.detach().norm(dim=0)


def random_score(adapter: Adapter, *, name: str, seed: int = 0) -> torch.Tensor:
    """A random score fixed per (seed, adapter name, original neuron index).

    Surviving neurons keep their scores after shrinking, so repeated pruning is nested:
    a removed neuron can never outrank a kept one later.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    ids = adapter.neuron_ids.cpu()
    table = torch.rand(int(ids.max()) + 1 if ids.numel() else 0, generator=gen)
    return table[ids].to(adapter.down.weight.device)


class GradientAccumulator:
    """Accumulates adapter gradients over many batches for the ``gradient`` score.

    Call :meth:`update` after every ``backward()``; :meth:`reset` after each prune (shapes change).
    The score of neuron j is ``sum |W * G|`` over the weights attached to it, with ``G`` the summed gradient.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.grads: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        for name, a in adapters(self.model):
            if a.down.weight.grad is None or a.up.weight.grad is None:
                continue
            gd, gu = a.down.weight.grad.detach().float(), a.up.weight.grad.detach().float()
            if name in self.grads and self.grads[name][0].shape == gd.shape:
                self.grads[name][0].add_(gd)
                self.grads[name][1].add_(gu)
            else:
                self.grads[name] = (gd.clone(), gu.clone())
        self.steps += 1

    def reset(self) -> None:
        self.grads.clear()
        self.steps = 0

    def score(self, name: str, adapter: Adapter) -> torch.Tensor:
        if name not in self.grads or self.grads[name][0].shape != adapter.down.weight.shape:
            raise ConfigError(
                f"gradient score: no accumulated gradient for {name} at its current size; "
                "call GradientAccumulator.update() after backward passes since the last prune"
            )
        gd, gu = self.grads[name]
        wd, wu = adapter.down.weight.detach().float(), adapter.up.weight.detach().float()
        return (wd * gd).abs().sum(dim=1) + (wu * gu).abs().sum(dim=0)


def _gradient(adapter: Adapter, *, name: str, accumulator: GradientAccumulator | None = None) -> torch.Tensor:
    if accumulator is None:
        raise ConfigError("the 'gradient' score needs accumulator=GradientAccumulator(model), updated after backward")
    return accumulator.score(name, adapter)


# name -> (per-adapter score function, whether one threshold is shared by all adapters)
SCORES: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {
    "mimi": (lambda a, **_: mimi_score(a), True),
    "mimi-weighted": (lambda a, **_: mimi_weighted_score(a), True),
    "magnitude": (lambda a, **_: _l1(a), False),
    "lora-norm": (lambda a, **_: lora_norm_score(a), True),
    "global-l1": (lambda a, **_: _l1(a), True),
    "random": (lambda a, *, name, seed=0, **_: random_score(a, name=name, seed=seed), True),
    "gradient": (lambda a, *, name, accumulator=None, **_: _gradient(a, name=name, accumulator=accumulator), True),
}


def is_global(method: str) -> bool:
    """Whether the score ranks neurons across adapters (True) or within each adapter (False)."""
    return _lookup(method)[1]


def _lookup(method: str) -> tuple[Callable[..., torch.Tensor], bool]:
    if method not in SCORES:
        raise ConfigError(f"unknown score method {method!r}; choose one of {sorted(SCORES)}")
    return SCORES[method]


def score_neurons(
    model: nn.Module,
    method: str = "mimi",
    *,
    seed: int = 0,
    accumulator: GradientAccumulator | None = None,
) -> dict[str, torch.Tensor]:
    """One score per hidden neuron of every adapter.

    Args:
        model: a model holding adapters.
        method: one of ``mimi``, ``mimi-weighted``, ``magnitude``, ``global-l1``, ``random``, ``gradient``.
        seed: seed of the ``random`` score.
        accumulator: gradients accumulated during training, for the ``gradient`` score.

    Returns:
        ``{adapter name: Tensor[hidden_dim]}`` (float32, on the adapter's device).
    """
    fn, _ = _lookup(method)
    return {name: fn(a, name=name, seed=seed, accumulator=accumulator).float() for name, a in adapters(model)}
