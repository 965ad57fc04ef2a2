"""LoRA methods: ``lora`` (our LoRA, fixed rank) and ``mimi-lora`` (MiMi's pruning over LoRA ranks).

The layers themselves are in :mod:`mimi.core.lora`. Also home of the rank <-> parameter-count helpers shared with the PEFT peers (:func:`lora_rank_for_budget`), so that
LoRA-style peers can be matched to a MiMi parameter budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from mimi.core.adapters import AdapterConfig, add_adapters, uniform_adapter_params
from mimi.core.errors import ConfigError
from mimi.core.lora import DEFAULT_TARGETS, LoRALinear, add_lora, lora_param_count, lora_params_per_rank
from mimi.methods.base import Method, method_kwargs, register

if TYPE_CHECKING:
    from mimi.config import TrainConfig

DEFAULT_RANK = 8
MIMI_LORA_RANK = 16  # starting rank of mimi-lora, pruned down to the budget


def lora_rank_for_budget(
    model: nn.Module, budget_params: int, targets: Sequence[str] = DEFAULT_TARGETS, *, extra_per_rank: int = 0
) -> int:
    """The rank (>= 1) whose LoRA parameter count (head excluded) is closest to ``budget_params``.

    Every rank step costs :func:`lora_params_per_rank` parameters, so the count at the returned rank is within half
    a rank step of the budget (unless the budget is below one rank step, where rank 1 is returned).
    """
    if budget_params < 0:
        raise ConfigError(f"budget_params must be >= 0, got {budget_params}")
    per_rank = lora_params_per_rank(model, targets, extra_per_rank=extra_per_rank)
    return max(1, int(budget_params / per_rank + 0.5))  # round half up, not Python's banker's rounding


def run_budget(cfg: TrainConfig, model: nn.Module) -> int | None:
    """The run's adapter-parameter budget (``--budget-params``, or ``--budget-dim`` as uniform adapters)."""
    if cfg.budget_dim is not None:
        return uniform_adapter_params(model, cfg.budget_dim)
    return cfg.budget_params


def resolve_rank(
    cfg: TrainConfig,
    model: nn.Module,
    *,
    rank: int | None,
    budget_params: int | None,
    targets: Sequence[str],
    extra_per_rank: int = 0,
) -> int:
    """Rank from, in order: an explicit ``rank``, a parameter budget, ``cfg.adapter_dim``, else 8.

    The budget is ``method_kwargs["budget_params"]``, else the run's ``--budget-params`` / ``--budget-dim``
    (the parameter count of uniform sequential adapters of that size): this is how peers are matched to MiMi.
    """
    if budget_params is None and rank is None:
        budget_params = run_budget(cfg, model)
    if rank is not None and budget_params is not None:
        raise ConfigError(f"method {cfg.method}: give rank or budget_params in method_kwargs, not both")
    if rank is not None:
        if not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"method {cfg.method}: rank must be a positive integer, got {rank!r}")
        return rank
    if budget_params is not None:
        return lora_rank_for_budget(model, budget_params, targets, extra_per_rank=extra_per_rank)
    return cfg.adapter_dim if cfg.adapter_dim is not None else DEFAULT_RANK


@register("lora")
class LoRA(Method):
    description = (
        "LoRA (ours): rank-r updates on qkv/proj/fc1/fc2 of every block; rank from method_kwargs or --adapter-dim"
    )

    def prepare(self, model: nn.Module, cfg: TrainConfig, *, total_steps: int) -> nn.Module:
        kw = method_kwargs(
            cfg, {"rank": None, "alpha": None, "targets": list(DEFAULT_TARGETS), "dropout": 0.0, "budget_params": None}
        )
        targets = tuple(kw["targets"])
        rank = resolve_rank(cfg, model, rank=kw["rank"], budget_params=kw["budget_params"], targets=targets)
        return add_lora(model, rank=rank, alpha=kw["alpha"], targets=targets, dropout=kw["dropout"], seed=cfg.seed)

    def extra_info(self, model: nn.Module) -> dict[str, Any]:
        layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        return {
            "lora_rank": layers[0].rank if layers else 0,
            "lora_alpha": layers[0].alpha if layers else 0.0,
            "lora_layers": len(layers),
            "lora_params": lora_param_count(model),
        }


@register("mimi-lora")
class MiMiLoRA(Method):
    description = (
        "MiMi over LoRA ranks: rank-16 updates on qkv/proj/fc1/fc2, rank-1 components pruned (--score mimi or "
        "lora-norm) to --budget-params, retrained after every cut"
    )
    prunes = True

    def prepare(self, model: nn.Module, cfg: TrainConfig, *, total_steps: int) -> nn.Module:
        """A LoRA update ``scale * B A x`` is a linear adapter: parallel, no activation, no bias, on an nn.Linear.

        Written that way, MiMi's scores, physical pruning (row j of A with column j of B), budgets, checkpoints
        and the bank apply to it unchanged; a layer pruned to rank 0 gets its plain nn.Linear back.
        """
        kw = method_kwargs(cfg, {"rank": None, "alpha": None, "targets": list(DEFAULT_TARGETS)})
        rank = kw["rank"] or cfg.adapter_dim or MIMI_LORA_RANK
        if not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"method mimi-lora: the starting rank must be a positive integer, got {rank!r}")
        alpha = float(kw["alpha"] if kw["alpha"] is not None else rank)
        config = AdapterConfig(
            hidden_dim=rank,
            placement="parallel",
            act="identity",
            bias=False,
            scale=alpha / rank,  # fixed at the starting rank: pruning a component does not rescale the others
            targets=tuple(kw["targets"]),
            init_seed=cfg.seed,
        )
        return add_adapters(model, config)
