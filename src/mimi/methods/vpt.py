"""VPT-deep (Jia et al., ECCV 2022): fresh learnable prompt tokens at the input of every transformer block.

Each block of a timm ``VisionTransformer`` is wrapped in a :class:`PromptedBlock` that inserts its own prompts right
after the prefix tokens (class token, registers) and drops them from the block's output, so every block sees new
prompts and the rest of the network (final norm, pooling, head) sees the original token layout::

    x (B, n_prefix + N, D) -> [prefix | prompts (P) | patches] -> block -> drop the P prompt outputs

Given a parameter budget (``--budget-params`` / ``--budget-dim``) and no ``num_prompts``, the method takes as many
tokens per block as the budget holds (``embed_dim`` parameters a token a block), so a budget is never exceeded;
without either, 10 tokens. Prompts carry no position embedding, as in VPT. Initialisation follows the VPT code:
``U(-v, v)`` with ``v = sqrt(6 / (3 * patch_area + D))`` (Xavier-uniform over the patch projection's fan-in + D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mimi.core.adapters import freeze_backbone
from mimi.core.errors import ConfigError, ModelError
from mimi.methods.base import Method, MethodOptions, PrepareContext, Traits, option, register

DEFAULT_PROMPTS = 10


class PromptedBlock(nn.Module):
    """A transformer block that sees ``P`` learnable prompt tokens inserted after the prefix tokens.

    Args:
        block: the timm block to wrap (kept as ``self.block``).
        prompts: the block's prompt tokens, shape ``(P, D)``.
        num_prefix_tokens: tokens before the patches (class token, registers); prompts go right after them.
        dropout: dropout on the prompt tokens (VPT's prompt dropout).
    """

    def __init__(self, block: nn.Module, prompts: nn.Parameter, *, num_prefix_tokens: int, dropout: float = 0.0):
        super().__init__()
        self.block = block
        self.prompts = prompts
        self.num_prefix_tokens = num_prefix_tokens
        self.drop = nn.Dropout(dropout)

    @property
    def num_prompts(self) -> int:
        return self.prompts.shape[0]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("attn_mask") is not None:
            # A mask built for the original sequence length would not cover the prompt tokens.
            raise ModelError("VPT does not support attention masks: the prompts change the sequence length")
        n, p = self.num_prefix_tokens, self.num_prompts
        prompts = self.drop(self.prompts).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, P, D)
        x = torch.cat([x[:, :n], prompts, x[:, n:]], dim=1)  # (B, n + P + N, D)
        x = self.block(x, *args, **kwargs)
        return torch.cat([x[:, :n], x[:, n + p :]], dim=1)  # (B, n + N, D): prompt outputs are discarded


def prompt_init_bound(model: nn.Module) -> float:
    """VPT's uniform bound ``sqrt(6 / (3 * patch_area + D))``."""
    patch_area = math.prod(model.patch_embed.patch_size)
    return math.sqrt(6.0 / (3 * patch_area + model.embed_dim))


def _check_vit(model: nn.Module) -> None:
    from timm.models.vision_transformer import VisionTransformer

    # Only the plain ViT token layout is known to tolerate extra tokens: Swin works on a spatial grid, and models with
    # rotary embeddings (EVA, ...) index positions by token order.
    if not isinstance(model, VisionTransformer):
        raise ModelError(
            f"vpt-deep needs a timm VisionTransformer (vit_*, deit_*, DINOv2), not {type(model).__name__}: "
            "prompt tokens cannot be inserted into window attention (Swin) or rotary-position models"
        )
    if any(isinstance(b, PromptedBlock) for b in model.blocks):
        raise ModelError("the model already holds VPT prompts; build a fresh backbone")


def add_prompts(
    model: nn.Module, *, num_prompts: int = DEFAULT_PROMPTS, dropout: float = 0.0, seed: int | None = None
) -> nn.Module:
    """Wrap every block of a timm ViT in a :class:`PromptedBlock`; freeze all but prompts and the head (in place)."""
    _check_vit(model)
    if num_prompts < 1:
        raise ConfigError(f"vpt-deep: num_prompts must be >= 1, got {num_prompts}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"vpt-deep: dropout must be in [0, 1), got {dropout}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    bound = prompt_init_bound(model)
    ref = model.cls_token if model.cls_token is not None else next(model.parameters())
    for i, block in enumerate(model.blocks):
        prompts = torch.empty(num_prompts, model.embed_dim)
        prompts.uniform_(-bound, bound, generator=generator)
        param = nn.Parameter(prompts.to(device=ref.device, dtype=ref.dtype))
        model.blocks[i] = PromptedBlock(block, param, num_prefix_tokens=model.num_prefix_tokens, dropout=dropout)
    freeze_backbone(model)
    for block in model.blocks:
        block.prompts.requires_grad_(True)
    return model


def prompts_for_budget(model: nn.Module, budget: int) -> int:
    """The most prompt tokens per block whose parameters (``embed_dim`` a token a block) hold at most ``budget``.

    Raises:
        ConfigError: one token per block already exceeds the budget.
    """
    per_token = model.embed_dim * len(model.blocks)
    if budget < per_token:
        raise ConfigError(
            f"vpt-deep: the budget ({budget:,} parameters) is below one prompt token per block ({per_token:,}); "
            "raise the budget, or pass --method-kwargs '{\"num_prompts\": 1}' to go over it"
        )
    return budget // per_token


@dataclass
class VPTOptions(MethodOptions):
    """Options of ``vpt-deep``: ``num_prompts`` tokens, else as many as the run's budget holds, else 10."""

    num_prompts: int | None = option(
        None, "prompt tokens inserted at every block (default: as many as the run's budget holds, else 10)"
    )
    dropout: float = option(0.0, "dropout on the prompt tokens")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ConfigError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")


@register("vpt-deep")
class VPTDeep(Method):
    description = "VPT-deep: num_prompts learnable tokens prepended at every block (ViT family only)"
    Options = VPTOptions
    traits = Traits(budget_sets="num_prompts")

    def prepare(self, model: nn.Module, options: VPTOptions, ctx: PrepareContext) -> nn.Module:
        _check_vit(model)
        n = options.num_prompts
        if n is None:
            n = prompts_for_budget(model, ctx.budget) if ctx.budget is not None else DEFAULT_PROMPTS
        return add_prompts(model, num_prompts=n, dropout=options.dropout, seed=ctx.seed)

    def extra_info(self, model: nn.Module) -> dict[str, Any]:
        blocks = [m for m in model.modules() if isinstance(m, PromptedBlock)]
        return {
            "num_prompts": blocks[0].num_prompts if blocks else 0,
            "prompt_params": sum(b.prompts.numel() for b in blocks),
        }
