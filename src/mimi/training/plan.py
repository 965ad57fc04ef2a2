"""What fits in a parameter budget, before any training: each candidate method as it would be built for that budget
on a backbone, its trained parameters and the bytes of its int8 task file (``mimi plan``).

The candidates default to the methods built for budgets of a few thousand parameters (:data:`KILOBYTE_CANDIDATES`):
each is prepared exactly as ``mimi train --budget-params B`` prepares it (the same method, options and rule from
budget to rank, blocks or prompts), on a backbone with random weights (the counts and bytes do not depend on the
weights), and its task file is written as ``mimi export --dtype int8`` writes one, with a head of ``num_classes``.
MiMi's sizes are found by pruning during training, so its row gives the budget as an upper bound and no bytes.
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimi.backbones import create_backbone
from mimi.config import TrainConfig
from mimi.core.errors import ConfigError, MimiError
from mimi.core.modules import trainable_without_head
from mimi.core.taskfile import byte_breakdown, save_adapters
from mimi.methods import get_method, method_traits


@dataclass(frozen=True)
class Candidate:
    """One way to spend a budget: a method, its options and (for adapters) the hidden size."""

    label: str
    method: str
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    adapter_dim: int | None = None

    def flags(self) -> str:
        """The ``mimi train`` flags that build it (besides the budget)."""
        out = f"--method {self.method}"
        if self.adapter_dim is not None:
            out += f" --adapter-dim {self.adapter_dim}"
        if self.method_kwargs:
            out += f" --method-kwargs '{json.dumps(self.method_kwargs)}'"
        return out


KILOBYTE_CANDIDATES: tuple[Candidate, ...] = (
    Candidate("mimi (r=96, pruned to the budget)", "mimi", adapter_dim=96),
    Candidate("fact-tt (rank from the budget)", "fact-tt"),
    Candidate("adapter r=1, spread blocks", "adapter", {"blocks": "spread"}, adapter_dim=1),
    Candidate("adapter r=1, last blocks", "adapter", {"blocks": "last"}, adapter_dim=1),
    Candidate("adapter r=1, every block", "adapter", adapter_dim=1),
    Candidate("vpt-deep (tokens from the budget)", "vpt-deep"),
    Candidate("vpt-deep, 1 token", "vpt-deep", {"num_prompts": 1}),
    Candidate("vpt-deep, 2 tokens", "vpt-deep", {"num_prompts": 2}),
    Candidate("lora r=1 on qkv", "lora", {"rank": 1, "targets": ["attn.qkv"]}),
    Candidate("peft-vera on qkv (rank from the budget)", "peft-vera"),
    Candidate("peft-vera on proj (rank from the budget)", "peft-vera", {"targets": ["attn.proj"]}),
    Candidate("linear probe (the head alone)", "linear"),
)


@dataclass(frozen=True)
class PlanRow:
    """One candidate at the budget.

    Attributes:
        candidate: what was built.
        params: trained parameters without the head (MiMi: the budget, an upper bound); None where it cannot be built.
        fits: ``params`` at or under the budget.
        int8_bytes: the int8 task file with its head (None for MiMi, whose sizes training finds, and on error).
        servable: an :class:`~mimi.AdapterBank` serves its task files.
        note: what the method chose for the budget (rank, blocks), or why it cannot be built.
    """

    candidate: Candidate
    params: int | None
    fits: bool
    int8_bytes: int | None
    servable: bool
    note: str


def _note(method: Any, model: nn.Module) -> str:
    info = method.extra_info(model)
    picks = {
        k: v
        for k, v in info.items()
        if k in ("fact_rank", "rank", "adapter_blocks", "lora_rank", "vera_rank", "num_prompts")
    }
    return ", ".join(f"{k} {v}" for k, v in picks.items())


def plan_budget(
    budget: int,
    *,
    model: str = "vit_small_patch14_dinov2",
    img_size: int | None = None,
    num_classes: int = 10,
    candidates: tuple[Candidate, ...] | list[Candidate] = KILOBYTE_CANDIDATES,
) -> list[PlanRow]:
    """Every candidate built for ``budget`` adapter parameters on ``model`` (random weights), in the given order.

    Raises:
        ConfigError: a budget below 1 or fewer than 2 classes (a candidate that cannot take the budget is a row
            saying why, not an error).
    """
    if budget < 1:
        raise ConfigError(f"--budget-params must be >= 1, got {budget}")
    if num_classes < 2:
        raise ConfigError(f"--num-classes must be >= 2, got {num_classes}")
    torch.manual_seed(0)
    backbone, source = create_backbone(model, weights="none", img_size=img_size)
    backbone.reset_classifier(num_classes)
    size = img_size or getattr(backbone.patch_embed, "img_size", (None,))[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, c in enumerate(candidates):
            traits = method_traits(c.method)
            servable = bool(traits and traits.servable)
            cfg = TrainConfig(
                model=model,
                data="plan",
                method=c.method,
                method_kwargs=dict(c.method_kwargs),
                adapter_dim=c.adapter_dim,
                budget_params=budget,
                img_size=img_size,
            )
            try:
                method = get_method(c.method)
                built = method.prepare_from_config(copy.deepcopy(backbone), cfg, total_steps=1)
            except MimiError as e:
                rows.append(PlanRow(c, None, False, None, servable, str(e)))
                continue
            if traits is not None and traits.prunes:
                rows.append(PlanRow(c, budget, True, None, servable, "hidden sizes found by pruning, <= the budget"))
                continue
            params = trainable_without_head(built)
            meta = {"method": c.method, "model": model, "weights_source": source, "img_size": str(size)}
            meta["classes"] = "[" + ", ".join(f'"{k}"' for k in range(num_classes)) + "]"
            meta.update(method.task_metadata(built))
            path = save_adapters(built, Path(tmp) / f"{i}.safetensors", dtype=torch.int8, metadata=meta)
            total = byte_breakdown(path)["total"]
            rows.append(PlanRow(c, params, params <= budget, total, servable, _note(method, built)))
    return rows
