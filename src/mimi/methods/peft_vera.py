"""VeRA (Kopiczko et al., ICLR 2024) through Hugging Face PEFT, on the same timm backbone as ``peft-lora``.

VeRA adapts a linear layer ``W`` (out x in) by ``diag(b) B diag(d) A x``: ``A`` (r x in) and ``B`` (out x r) are
frozen random matrices shared by every adapted layer (PEFT draws them once, at the largest in / out width of the
targeted layers, and slices them per layer), and only the scaling vectors ``d`` (r) and ``b`` (out) train. So a
layer costs ``r + out`` trainable parameters, and ``b`` starts at zero: the adapted model starts as the backbone.

* Targets, the head in ``modules_to_save`` and the check of the layers PEFT adapts are those of
  :mod:`mimi.methods.peft_methods` (a regex over the block names, not PEFT's suffix match).
* ``A`` and ``B`` are buffers, never trained and never written to a task file: they are drawn again from
  ``projection_prng_key`` (the run's seed unless ``prng_key`` is given) by a CPU generator when the run is rebuilt
  (``mimi eval``, resume, a distillation teacher), so a saved task reloads to identical logits.
* Default rank 256 (PEFT's default, and the rank of the VeRA paper's ViT runs); default target ``attn.qkv``: the paper
  adapts the query and value projections of ViTs, which timm fuses with the key projection into ``attn.qkv``. On
  ViT-S/14 (12 blocks) that is ``12 * (256 + 1152) = 16,896`` trainable parameters besides the head.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mimi.core.errors import ConfigError
from mimi.core.lora import lora_targets
from mimi.methods.base import Method, MethodOptions, PrepareContext, Traits, option, register
from mimi.methods.lora import check_rank_or_budget
from mimi.methods.peft_methods import ADAPTER, _peft, apply_peft, head_name, target_regex, trainable_without_head

DEFAULT_RANK = 256
DEFAULT_TARGETS = ("attn.qkv",)


def vera_cost(model: nn.Module, targets: Sequence[str]) -> tuple[int, int]:
    """``(fixed, per_rank)``: VeRA on ``targets`` of every block holds ``fixed + rank * per_rank`` trainable
    parameters (head excluded): ``fixed`` is the sum of the layers' output widths (the vectors b), ``per_rank`` the
    number of layers (one entry of d per layer and rank)."""
    layers = [m for _, m in lora_targets(model, targets)]
    return sum(m.out_features for m in layers), len(layers)


def vera_rank_for_budget(model: nn.Module, budget: int, targets: Sequence[str]) -> int:
    """The rank (>= 1) whose VeRA parameter count (head excluded) is nearest to ``budget``.

    A rank step costs one parameter per layer, so the count is within half a step of the budget.

    Raises:
        ConfigError: the budget is below the vectors b alone (no rank reaches it).
    """
    fixed, per_rank = vera_cost(model, targets)
    if budget < fixed:
        raise ConfigError(
            f"peft-vera: the budget ({budget:,} parameters) is below the {fixed:,} parameters of the vectors b on "
            f"{', '.join(targets)} ({per_rank} layers) whatever the rank; target fewer or narrower layers (e.g. "
            "['attn.proj']), or give rank in method_kwargs to ignore the budget"
        )
    return max(1, int((budget - fixed) / per_rank + 0.5))  # round half up


@dataclass
class PeftVeraOptions(MethodOptions):
    """Options of ``peft-vera``: the rank is ``rank``, else the one nearest to a budget, else 256."""

    rank: int | None = option(None, "VeRA rank r (default: nearest to the budget when one is given, else 256)")
    targets: list[str] = option(list(DEFAULT_TARGETS), "linear layers of every block that get VeRA")
    d_initial: float = option(0.1, "initial value of every entry of the vectors d (PEFT's d_initial)")
    dropout: float = option(0.0, "PEFT's vera_dropout")
    prng_key: int | None = option(None, "seed of the frozen random projections A, B (default: the run's seed)")
    budget_params: int | None = option(None, "pick the rank whose parameters (head excluded) are nearest to this")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank_or_budget(self.rank, self.budget_params)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("targets must name at least one linear layer, e.g. ['attn.qkv']")


@register("peft-vera")
class PeftVeRA(Method):
    description = (
        "Hugging Face PEFT VeRA: frozen shared random A, B; trains per-layer vectors d (rank) and b (out) on attn.qkv"
    )
    traits = Traits(size_unit="rank", budget_sets="rank")
    Options = PeftVeraOptions

    def prepare(self, model: nn.Module, options: PeftVeraOptions, ctx: PrepareContext) -> nn.Module:
        peft = _peft()
        targets = tuple(options.targets)
        rank = options.rank
        budget = options.budget_params if options.budget_params is not None else ctx.budget
        if rank is None:
            rank = vera_rank_for_budget(model, budget, targets) if budget is not None else DEFAULT_RANK
        head = head_name(model)
        config = peft.VeraConfig(
            r=rank,
            target_modules=target_regex(model, targets),
            projection_prng_key=ctx.seed if options.prng_key is None else options.prng_key,
            vera_dropout=options.dropout,
            d_initial=options.d_initial,
            modules_to_save=[head] if head else None,
        )
        return apply_peft(model, config, targets=targets)

    def extra_info(self, model: nn.Module) -> dict[str, Any]:
        config = model.peft_config[ADAPTER]
        tuner = model.base_model
        return {
            "vera_rank": config.r,
            "vera_layers": sum(1 for n, _ in model.named_parameters() if n.endswith(f".vera_lambda_d.{ADAPTER}")),
            "vera_params": trainable_without_head(model),
            "vera_prng_key": config.projection_prng_key,
            "vera_projection_sha256": projection_digest(tuner.vera_A[ADAPTER], tuner.vera_B[ADAPTER]),
        }


def projection_digest(a: torch.Tensor, b: torch.Tensor) -> str:
    """A short hash of the frozen projections: equal digests, equal A and B (what a reload must reproduce)."""
    h = hashlib.sha256()
    for t in (a, b):
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
