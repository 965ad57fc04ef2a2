"""Per-neuron importance scores of adapter hidden neurons, by name.

A score function maps one adapter to ``Tensor[hidden_dim]``; higher means more important. Global scores are
compared across adapters with one threshold; local ones rank neurons within each adapter.

Scores are registered by name in :data:`SCORES`: the built-in ones below, those user code adds with
:func:`register_score`, and those installed packages declare as entry points of the group ``mimi.scores`` (read on
the first lookup, see :mod:`mimi.core.plugins`). Every check of a score name goes through :func:`check_score`.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mimi.core import plugins
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


# name -> (per-adapter score function, whether one threshold is shared by all adapters). A function is called as
# fn(adapter, name=..., seed=..., accumulator=...); register_score adapts functions that take fewer keywords.
SCORES: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {
    "mimi": (lambda a, **_: mimi_score(a), True),
    "mimi-weighted": (lambda a, **_: mimi_weighted_score(a), True),
    "magnitude": (lambda a, **_: _l1(a), False),
    "lora-norm": (lambda a, **_: lora_norm_score(a), True),
    "global-l1": (lambda a, **_: _l1(a), True),
    "random": (lambda a, *, name, seed=0, **_: random_score(a, name=name, seed=seed), True),
    "gradient": (lambda a, *, name, accumulator=None, **_: _gradient(a, name=name, accumulator=accumulator), True),
}

#: The keywords every score function may receive besides the adapter.
SCORE_KWARGS = ("name", "seed", "accumulator")


def _accepting(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` called with only the keywords of :data:`SCORE_KWARGS` it declares (all of them if it takes ``**kw``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable without a signature: pass everything
        return fn
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return fn
    named = {p.name for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    accepted = named & set(SCORE_KWARGS)

    @functools.wraps(fn)
    def call(adapter: Adapter, **kw: Any) -> torch.Tensor:
        return fn(adapter, **{k: v for k, v in kw.items() if k in accepted})

    return call


def register_score(
    name: str, fn: Callable[..., torch.Tensor], *, global_: bool = True, replace: bool = False
) -> Callable[..., torch.Tensor]:
    """Make ``fn`` available as the neuron score ``name`` (``--score name``, ``score_neurons(model, name)``).

    Args:
        name: the score's name.
        fn: ``fn(adapter, *, name, seed, accumulator) -> Tensor[hidden_dim]``, higher meaning more important; it may
            declare only the keywords it uses (``fn(adapter)`` is fine).
        global_: True if one threshold over all adapters is meaningful (scores comparable across adapters); False
            to remove the same fraction of neurons from every adapter.
        replace: allow replacing a score already registered under ``name``.

    Returns:
        ``fn`` itself, so that it can be used as ``register_score("x", fn)`` inline.

    Raises:
        ConfigError: if ``name`` is taken (and ``replace`` is False) or ``fn`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"register_score: the name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ConfigError(f"register_score: score {name!r} must be callable, got {type(fn).__name__}")
    if name in SCORES and not replace:
        raise ConfigError(f"score {name!r} is already registered; pass replace=True to replace it")
    SCORES[name] = (_accepting(fn), bool(global_))
    return fn


def unregister_score(name: str) -> None:
    """Remove the score ``name`` (no error if there is none)."""
    SCORES.pop(name, None)


def _add_plugin(name: str, obj: Any) -> None:
    """An entry point of ``mimi.scores``: a score callable (global), or a ``(callable, is_global)`` pair."""
    if isinstance(obj, tuple) and len(obj) == 2 and callable(obj[0]):
        register_score(name, obj[0], global_=bool(obj[1]))
    elif callable(obj):
        register_score(name, obj)
    else:
        raise ConfigError(f"a mimi.scores entry point must be a callable or a (callable, is_global) pair, got {obj!r}")


def score_names() -> list[str]:
    """Every registered score name, installed plugins included, sorted."""
    plugins.load_entry_points(plugins.SCORES_GROUP, _add_plugin)
    return sorted(SCORES)


def check_score(name: str) -> str:
    """``name`` if it is a registered score (installed plugins included).

    Raises:
        ConfigError: ``unknown score ...; choose one of ...``.
    """
    plugins.load_entry_points(plugins.SCORES_GROUP, _add_plugin)
    if not isinstance(name, str) or name not in SCORES:
        raise ConfigError(f"unknown score {name!r}; choose one of {', '.join(sorted(SCORES))}")
    return name


def renamed_score_arg(score: str, method: str | None, *, caller: str, stacklevel: int = 3) -> str:
    """The score to use when ``caller`` got ``score`` and the deprecated keyword ``method`` (its old name).

    ``stacklevel`` is counted from this function: 3 points at whoever called ``caller``.
    """
    if method is None:
        return score
    warnings.warn(
        f"{caller}(method=...) is deprecated; pass score=... (the neuron score's name)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    if score not in ("mimi", method):  # "mimi" is the default: it cannot tell "not given" from "given"
        raise ConfigError(f"{caller}: got score={score!r} and method={method!r}; give score= only")
    return method


def is_global(score: str) -> bool:
    """Whether the score ranks neurons across adapters (True) or within each adapter (False)."""
    return SCORES[check_score(score)][1]


def score_neurons(
    model: nn.Module,
    score: str = "mimi",
    *,
    seed: int = 0,
    accumulator: GradientAccumulator | None = None,
    method: str | None = None,
) -> dict[str, torch.Tensor]:
    """One score per hidden neuron of every adapter.

    Args:
        model: a model holding adapters.
        score: a registered score name (see :func:`score_names`): ``mimi``, ``mimi-weighted``, ``magnitude``,
            ``global-l1``, ``lora-norm``, ``random``, ``gradient``, or one added with :func:`register_score`.
        seed: seed of the ``random`` score.
        accumulator: gradients accumulated during training, for the ``gradient`` score.
        method: deprecated name of ``score``.

    Returns:
        ``{adapter name: Tensor[hidden_dim]}`` (float32, on the adapter's device).

    Raises:
        ConfigError: for an unknown score, or a score function returning the wrong shape.
    """
    score = renamed_score_arg(score, method, caller="score_neurons")
    fn, _ = SCORES[check_score(score)]
    out = {}
    for name, a in adapters(model):
        s = fn(a, name=name, seed=seed, accumulator=accumulator)
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != (a.hidden_dim,):
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ConfigError(f"score {score!r} gave {got} for {name}; expected one value per neuron ({a.hidden_dim},)")
        out[name] = s.float()
    return out
