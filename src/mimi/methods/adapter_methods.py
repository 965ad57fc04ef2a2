"""Adapter methods (MiMi, fixed-size sequential and AdaptFormer-style parallel) and the simplest baselines.

The fixed-size ``adapter`` method can also put its adapters on some blocks only (option ``blocks``), so that small
fixed designs can be compared with MiMi at MiMi's own budget:

* ``[0, 5, 11]``: these block indices. Indices count the transformer blocks in model order (those
  :func:`~mimi.core.adapters.find_blocks` returns: ``blocks.i`` of a ViT; on Swin, counted across the stages);
  negative ones count from the end, as in Python.
* ``"last:K"``: the last K blocks, ``n-K .. n-1`` of ``n``.
* ``"spread:K"``: K blocks evenly spread, ``floor(i * (n-1) / (K-1) + 0.5)`` for ``i = 0 .. K-1`` (the first and the
  last block included; the indices are distinct for every ``K <= n``); ``spread:1`` is the last block.
* ``"last"`` / ``"spread"`` without K: K is set by the run's budget (``--budget-params`` / ``--budget-dim``): the
  largest K whose adapters (of the run's hidden size, e.g. ``--adapter-dim 1``) hold at most the budget, so the
  design never has more parameters than a MiMi run pruned to the same budget.

Adapters are inserted on every block as usual (so those kept start exactly as in a full insertion with the same
seed) and those of the other blocks are removed; a task file lists the adapters present, and loading it removes the
others again.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from mimi.core.adapters import (
    AdapterConfig,
    AdapterSite,
    adapter_sites,
    add_adapters,
    find_blocks,
    freeze_backbone,
    remove_adapter,
)
from mimi.core.errors import ConfigError
from mimi.methods.base import Method, MethodOptions, PrepareContext, Traits, option, register, run_flag

_BLOCK_FORM = re.compile(r"(last|spread)(?::(\d+))?")


@dataclass
class _AdapterShape(MethodOptions):
    """What every bottleneck-adapter method sets (its placement aside)."""

    adapter_dim: int | None = run_flag(None, "hidden size of every adapter at insertion (default: width / reduction)")
    reduction: float | None = run_flag(None, "hidden size = width / reduction (default 4 when no --adapter-dim)")
    act: str = option("gelu", "activation between the down and up projections: gelu, relu, silu, identity")
    dropout: float = option(0.0, "dropout on the adapters' hidden activation")
    scale: float = option(1.0, "multiplier of the adapter output")
    train_norms: bool = option(False, "also train the backbone's normalisation layers (not servable by a bank)")
    targets: list[str] = option(["attn", "mlp"], "where adapters go: branches attn, mlp, or layers like attn.qkv")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.adapter_config(seed=None)  # AdapterConfig's own checks (act, dropout, targets, sizes), before any model

    def placement_of(self) -> str:
        raise NotImplementedError

    def adapter_config(self, *, seed: int | None) -> AdapterConfig:
        """The :class:`AdapterConfig` these options describe; ``seed`` seeds the down-projections."""
        return AdapterConfig(
            hidden_dim=self.adapter_dim,
            reduction=self.reduction,
            placement=self.placement_of(),
            init_seed=seed,
            act=self.act,
            dropout=self.dropout,
            scale=self.scale,
            train_norms=self.train_norms,
            targets=tuple(self.targets),
        )


@dataclass
class AdapterOptions(_AdapterShape):
    """Options of the sequential (or parallel) bottleneck adapters of ``mimi``, ``mimi-oneshot`` and ``adapter``."""

    placement: str = run_flag("sequential", "sequential (after each branch) or parallel (beside it)")

    def placement_of(self) -> str:
        return self.placement


def _check_blocks(blocks: Any) -> None:
    """The checks of the option ``blocks`` that need no model (indices are checked against the model later)."""
    if blocks is None:
        return
    if isinstance(blocks, str):
        m = _BLOCK_FORM.fullmatch(blocks)
        if m is None or (m.group(2) is not None and int(m.group(2)) < 1):
            raise ConfigError(
                f"blocks must be a list of block indices, 'last:K', 'spread:K' (K >= 1), or 'last' / 'spread' "
                f"(K from the budget), got {blocks!r}"
            )
        return
    if not blocks:
        raise ConfigError("blocks must not be empty (omit it for adapters on every block)")
    if len(set(blocks)) != len(blocks):
        raise ConfigError(f"blocks lists a block twice: {blocks!r}")


def select_blocks(blocks: str | Sequence[int] | None, n: int) -> list[int]:
    """The sorted block indices (of ``n`` blocks) that ``blocks`` names (see the module docstring); None: all.

    Raises:
        ConfigError: an index out of range, K above ``n``, or a form without K (that one needs a budget).
    """
    if blocks is None:
        return list(range(n))
    if isinstance(blocks, str):
        m = _BLOCK_FORM.fullmatch(blocks)
        if m is None or m.group(2) is None:
            raise ConfigError(f"blocks {blocks!r}: give K ('{blocks}:4'), or a run budget to set it")
        form, k = m.group(1), int(m.group(2))
        if not 1 <= k <= n:
            raise ConfigError(f"blocks {blocks!r}: K must be in 1..{n} (the model has {n} blocks)")
        if form == "last":
            return list(range(n - k, n))
        if k == 1:
            return [n - 1]
        return [(2 * i * (n - 1) + k - 1) // (2 * (k - 1)) for i in range(k)]  # floor(i (n-1) / (k-1) + 1/2)
    out = []
    for i in blocks:
        if not -n <= i < n:
            raise ConfigError(f"blocks: index {i} is out of range, the model has {n} blocks (0..{n - 1})")
        out.append(i % n)
    if len(set(out)) != len(out):
        raise ConfigError(f"blocks lists a block twice: {list(blocks)!r}")
    return sorted(out)


def site_params(site: AdapterSite, config: AdapterConfig) -> int:
    """Parameters of the adapter ``config`` puts on ``site`` (as :meth:`~mimi.core.adapters.Adapter.num_params`)."""
    h = config.hidden_for(site.out_dim)
    bias = 1 if config.bias else 0
    return h * (site.in_dim + site.out_dim + bias) + bias * site.out_dim


def design_params(model: nn.Module, config: AdapterConfig, chosen: Sequence[int]) -> int:
    """Parameters of the adapters ``config`` puts on the blocks ``chosen`` (indices) of ``model`` (a bare backbone)."""
    names = {name for i, (name, _) in enumerate(find_blocks(model)) if i in set(chosen)}
    return sum(site_params(s, config) for s in adapter_sites(model, config) if s.block in names)


def blocks_for_budget(model: nn.Module, config: AdapterConfig, form: str, budget: int) -> list[int]:
    """The blocks of ``form:K`` (``"last"`` or ``"spread"``) for the largest K whose adapters hold at most ``budget``.

    Raises:
        ConfigError: the adapters of a single block already exceed the budget.
    """
    n = len(find_blocks(model))
    best = None
    for k in range(1, n + 1):
        chosen = select_blocks(f"{form}:{k}", n)
        if design_params(model, config, chosen) <= budget:
            best = chosen  # counts need not grow with K when blocks differ in width (Swin): try every K
    if best is None:
        one = design_params(model, config, select_blocks(f"{form}:1", n))
        raise ConfigError(
            f"blocks {form!r}: the budget ({budget:,} parameters) is below the adapters of one block ({one:,}); "
            "raise the budget or lower --adapter-dim"
        )
    return best


@dataclass
class FixedAdapterOptions(AdapterOptions):
    """Options of ``adapter``: :class:`AdapterOptions` plus the blocks that get adapters."""

    blocks: list[int] | str | None = option(
        None,
        "blocks that get adapters (default: all): indices like [9, 10, 11], 'last:K', 'spread:K', or 'last' / "
        "'spread' with K set by the run's budget (the largest K that fits it)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_blocks(self.blocks)

    def chosen_blocks(self, model: nn.Module, config: AdapterConfig, budget: int | None) -> list[int]:
        """The block indices of ``model`` that get adapters (a K-less form takes K from ``budget``)."""
        n = len(find_blocks(model))
        if isinstance(self.blocks, str) and ":" not in self.blocks:
            if budget is None:
                raise ConfigError(
                    f"blocks {self.blocks!r} takes K from the run's budget: pass --budget-params / --budget-dim, "
                    f"or give K ('{self.blocks}:4')"
                )
            return blocks_for_budget(model, config, self.blocks, budget)
        return select_blocks(self.blocks, n)


@dataclass
class AdaptFormerOptions(_AdapterShape):
    """Options of AdaptFormer: parallel adapters (``--placement`` does not apply), scaled by 0.1, beside the MLP."""

    scale: float = option(0.1, "multiplier of the adapter output (AdaptFormer's s)")
    targets: list[str] = option(["mlp"], "where adapters go: branches attn, mlp, or layers like mlp.fc1")

    def placement_of(self) -> str:
        return "parallel"


class _Adapters(Method):
    Options = AdapterOptions

    def prepare(self, model: nn.Module, options: _AdapterShape, ctx: PrepareContext) -> nn.Module:
        return add_adapters(model, options.adapter_config(seed=ctx.seed))


@register("mimi")
class MiMi(_Adapters):
    description = "large adapters, iteratively pruned (--score) to --budget-params, retrained after every cut"
    traits = Traits(prunes=True, servable=True)


@register("mimi-oneshot")
class MiMiOneShot(MiMi):
    description = "ablation: one cut straight to the budget, then retraining (MiMi with rho=1)"
    traits = Traits(prunes=True, one_shot=True, servable=True)


@register("adapter")
class FixedAdapter(_Adapters):
    description = "fixed-size bottleneck adapters (--adapter-dim, --placement), no pruning"
    traits = Traits(servable=True, budget_sets="blocks")
    Options = FixedAdapterOptions

    def __init__(self) -> None:
        self._design: dict[str, Any] = {}

    def prepare(self, model: nn.Module, options: FixedAdapterOptions, ctx: PrepareContext) -> nn.Module:
        if options.blocks is None:  # adapters on every block, exactly as before the option existed
            self._design = {}
            return super().prepare(model, options, ctx)
        config = options.adapter_config(seed=ctx.seed)
        chosen = options.chosen_blocks(model, config, ctx.budget)
        keep = {name for i, (name, _) in enumerate(find_blocks(model)) if i in set(chosen)}
        sites = adapter_sites(model, config)  # before insertion: their names are those of the inserted adapters
        add_adapters(model, config)
        for site in sites:
            if site.block not in keep:
                remove_adapter(model, site.name)
        self._design = {"adapter_blocks": chosen, "adapter_blocks_spec": options.blocks}
        return model

    def extra_info(self, model: nn.Module) -> dict[str, Any]:
        return dict(self._design)


@register("adaptformer")
class AdaptFormer(_Adapters):
    description = "AdaptFormer: parallel adapter beside each MLP, output scaled by s=0.1"
    traits = Traits(servable=True)
    Options = AdaptFormerOptions


@register("linear")
class LinearProbe(Method):
    description = "linear probe: only the classifier head is trained"
    traits = Traits(servable=True)

    def prepare(self, model: nn.Module, options: object, ctx: PrepareContext) -> nn.Module:
        freeze_backbone(model)
        return model


@register("full")
class FullFinetune(Method):
    description = "full fine-tuning: every parameter is trained"

    def prepare(self, model: nn.Module, options: object, ctx: PrepareContext) -> nn.Module:
        model.requires_grad_(True)
        return model


@register("bitfit")
class BitFit(Method):
    description = "BitFit: only biases (and the head) are trained"

    def prepare(self, model: nn.Module, options: object, ctx: PrepareContext) -> nn.Module:
        freeze_backbone(model)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)
        return model
