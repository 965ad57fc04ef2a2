"""LoRA methods: ``lora`` (our LoRA, fixed rank) and ``mimi-lora`` (MiMi's pruning over LoRA ranks).

The layers themselves are in :mod:`mimi.core.lora`. Also home of the rank <-> parameter-count helpers shared with the PEFT peers (:func:`lora_rank_for_budget`), so that
LoRA-style peers can be matched to a MiMi parameter budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from mimi.core.adapters import AdapterConfig, add_adapters
from mimi.core.errors import ConfigError
from mimi.core.lora import DEFAULT_TARGETS, LoRALinear, add_lora, lora_param_count, lora_params_per_rank
from mimi.methods.base import Method, MethodOptions, PrepareContext, Traits, option, register, run_flag

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


def check_rank(name: str, rank: Any) -> None:
    """Raise unless ``rank`` (the option ``name``) is None or a positive integer."""
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ConfigError(f"{name} must be a positive integer, got {rank!r}")


def check_rank_or_budget(rank: Any, budget_params: Any) -> None:
    """The options of a method whose rank is given or picked from a budget: one of the two, each valid."""
    if rank is not None and budget_params is not None:
        raise ConfigError("give rank or budget_params in method_kwargs, not both")
    check_rank("rank", rank)
    if budget_params is not None and budget_params < 0:
        raise ConfigError(f"budget_params must be >= 0, got {budget_params}")


def resolve_rank(
    model: nn.Module,
    ctx: PrepareContext,
    *,
    rank: int | None,
    budget_params: int | None,
    adapter_dim: int | None,
    targets: Sequence[str],
    extra_per_rank: int = 0,
) -> int:
    """Rank from, in order: an explicit ``rank``, a parameter budget, ``adapter_dim``, else 8.

    The budget is the option ``budget_params``, else the run's (``ctx.budget``: ``--budget-params``, or
    ``--budget-dim`` as the parameter count of uniform sequential adapters of that size): this is how peers are
    matched to MiMi. The options' own checks have refused ``rank`` together with ``budget_params``.
    """
    if rank is not None:
        return rank
    if budget_params is None:
        budget_params = ctx.budget
    if budget_params is not None:
        return lora_rank_for_budget(model, budget_params, targets, extra_per_rank=extra_per_rank)
    return adapter_dim if adapter_dim is not None else DEFAULT_RANK


@dataclass
class LoRAOptions(MethodOptions):
    """Options of ``lora``: the rank comes from ``rank``, else a budget, else ``--adapter-dim``, else 8."""

    rank: int | None = option(None, "rank of every update (default: from the budget, else --adapter-dim, else 8)")
    alpha: float | None = option(None, "scale = alpha / rank (default: alpha = rank, scale 1)")
    targets: list[str] = option(list(DEFAULT_TARGETS), "linear layers of every block that get an update")
    dropout: float = option(0.0, "dropout on the input of the updates")
    budget_params: int | None = option(None, "pick the rank whose parameters (head excluded) are closest to this")
    adapter_dim: int | None = run_flag(None, "the rank when neither rank nor a budget is given")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank_or_budget(self.rank, self.budget_params)


@register("lora")
class LoRA(Method):
    description = (
        "LoRA (ours): rank-r updates on qkv/proj/fc1/fc2 of every block; rank from method_kwargs or --adapter-dim"
    )
    traits = Traits(servable=True, size_unit="rank", budget_sets="rank")
    Options = LoRAOptions

    def prepare(self, model: nn.Module, options: LoRAOptions, ctx: PrepareContext) -> nn.Module:
        targets = tuple(options.targets)
        rank = resolve_rank(
            model,
            ctx,
            rank=options.rank,
            budget_params=options.budget_params,
            adapter_dim=options.adapter_dim,
            targets=targets,
        )
        return add_lora(model, rank=rank, alpha=options.alpha, targets=targets, dropout=options.dropout, seed=ctx.seed)

    def extra_info(self, model: nn.Module) -> dict[str, Any]:
        layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        return {
            "lora_rank": layers[0].rank if layers else 0,
            "lora_alpha": layers[0].alpha if layers else 0.0,
            "lora_layers": len(layers),
            "lora_params": lora_param_count(model),
        }


@dataclass
class MiMiLoRAOptions(MethodOptions):
    """Options of ``mimi-lora``: the starting rank is ``rank``, else ``--adapter-dim``, else 16."""

    rank: int | None = option(None, "starting rank of every update, pruned down to the budget (default 16)")
    alpha: float | None = option(None, "scale = alpha / starting rank (default: alpha = starting rank, scale 1)")
    targets: list[str] = option(list(DEFAULT_TARGETS), "linear layers of every block that get an update")
    adapter_dim: int | None = run_flag(None, "the starting rank when rank is not given")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank("the starting rank", self.start_rank)

    @property
    def start_rank(self) -> int:
        # `or`, not `is None`: a rank of 0 has always meant "the default" here
        return self.rank or self.adapter_dim or MIMI_LORA_RANK


@register("mimi-lora")
class MiMiLoRA(Method):
    description = (
        "MiMi over LoRA ranks: rank-16 updates on qkv/proj/fc1/fc2, rank-1 components pruned (--score mimi or "
        "lora-norm) to --budget-params, retrained after every cut"
    )
    traits = Traits(prunes=True, servable=True, size_unit="rank")
    Options = MiMiLoRAOptions

    def prepare(self, model: nn.Module, options: MiMiLoRAOptions, ctx: PrepareContext) -> nn.Module:
        """A LoRA update ``scale * B A x`` is a linear adapter: parallel, no activation, no bias, on an nn.Linear.

        Written that way, MiMi's scores, physical pruning (row j of A with column j of B), budgets, checkpoints
        and the bank apply to it unchanged; a layer pruned to rank 0 gets its plain nn.Linear back.
        """
        rank = options.start_rank
        alpha = float(options.alpha if options.alpha is not None else rank)
        config = AdapterConfig(
            hidden_dim=rank,
            placement="parallel",
            act="identity",
            bias=False,
            scale=alpha / rank,  # fixed at the starting rank: pruning a component does not rescale the others
            targets=tuple(options.targets),
            init_seed=ctx.seed,
        )
        return add_adapters(model, config)
