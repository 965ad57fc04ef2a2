"""SSF (Lian et al., NeurIPS 2022): scale and shift the features after every operation of a frozen backbone.

Each ``nn.Linear`` and ``nn.LayerNorm`` of the backbone (outside the classifier head) and the patch embedding are
wrapped in :class:`SSF`, which applies a learnable per-channel ``y * scale + shift`` to the module's output. On a ViT
this is exactly: qkv, proj, fc1, fc2, norm1, norm2 of every block, the final norm and the patch embedding; on Swin it
also covers the PatchMerging layers (their norm and reduction), as the SSF code does.

``scale`` starts at 1 and ``shift`` at 0, so the model starts as the backbone (the SSF code draws them from
``N(1, 0.02)`` and ``N(0, 0.02)``: set ``init_std=0.02`` for that). Like LoRA the transform is linear, so after training
it can be folded into the preceding layer's weights and biases (not done here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mimi.core.adapters import freeze_backbone
from mimi.core.errors import ConfigError, ModelError
from mimi.core.modules import classifier
from mimi.methods.base import Method, MethodOptions, PrepareContext, option, register


class SSF(nn.Module):
    """Wraps a module and scales and shifts its output along the last (channel) dimension.

    Args:
        module: the module whose output is transformed (kept as ``self.module``).
        dim: number of channels of the output's last dimension.
        init_std: 0 for the identity start (scale 1, shift 0); > 0 draws ``N(1, std)`` / ``N(0, std)`` as SSF does.
        generator: RNG of the initialisation when ``init_std > 0``.
    """

    def __init__(
        self, module: nn.Module, dim: int, *, init_std: float = 0.0, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.module = module
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))
        if init_std > 0:
            with torch.no_grad():
                self.scale.normal_(1.0, init_std, generator=generator)
                self.shift.normal_(0.0, init_std, generator=generator)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.module(x, *args, **kwargs)  # (..., dim)
        # Cast to the output's dtype so that under autocast the residual stream keeps its dtype.
        return y * self.scale.to(y.dtype) + self.shift.to(y.dtype)


def _patch_embed_dim(patch_embed: nn.Module) -> int | None:
    """Channels of the patch embedding's output when they lie on the last dimension (ViT: (B, N, D), Swin: NHWC)."""
    fmt = getattr(getattr(patch_embed, "output_fmt", None), "value", None)
    proj = getattr(patch_embed, "proj", None)
    if isinstance(proj, nn.Conv2d) and (getattr(patch_embed, "flatten", False) or fmt == "NHWC"):
        return proj.out_channels
    return None


def ssf_targets(model: nn.Module, *, patch_embed: bool = True) -> list[tuple[str, nn.Module, int]]:
    """``(name, module, channels)`` of every module SSF wraps, in model order.

    Raises:
        ModelError: if the model has no classifier head to exclude, or its patch embedding is not channels-last.
    """
    head = classifier(model)
    skip = {id(m) for m in head.modules()} if head is not None else set()
    found: list[tuple[str, nn.Module, int]] = []
    pe = getattr(model, "patch_embed", None)
    if patch_embed and isinstance(pe, nn.Module):
        dim = _patch_embed_dim(pe)
        if dim is None:
            raise ModelError(
                f"ssf: the patch embedding of {type(model).__name__} is not channels-last; pass patch_embed=false"
            )
        if not isinstance(getattr(pe, "norm", None), nn.Module):
            raise ModelError(
                f"ssf: the patch embedding of {type(model).__name__} has no norm slot; pass patch_embed=false"
            )
        # Wrap the embedding's last step (its norm, Identity in most ViTs), not the embedding itself: the model
        # reads attributes such as patch_embed.grid_size, which a wrapper would hide.
        found.append(("patch_embed.norm", pe.norm, dim))
        skip |= {id(m) for m in pe.modules()}
    for name, m in model.named_modules():
        if id(m) in skip:
            continue
        if isinstance(m, nn.Linear):
            found.append((name, m, m.out_features))
        elif isinstance(m, nn.LayerNorm):
            found.append((name, m, m.normalized_shape[-1]))
    if len(found) <= int(patch_embed):
        raise ModelError(f"ssf: {type(model).__name__} has no nn.Linear or nn.LayerNorm to scale and shift")
    return found


def add_ssf(model: nn.Module, *, patch_embed: bool = True, init_std: float = 0.0, seed: int | None = None) -> nn.Module:
    """Wrap every SSF target in an :class:`SSF`; freeze all but SSF parameters and the head (in place)."""
    if any(isinstance(m, SSF) for m in model.modules()):
        raise ModelError("the model already holds SSF layers; build a fresh backbone")
    if init_std < 0:
        raise ConfigError(f"ssf: init_std must be >= 0, got {init_std}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, module, dim in ssf_targets(model, patch_embed=patch_embed):
        ref = next(module.parameters(), None)
        wrapped = SSF(module, dim, init_std=init_std, generator=generator)
        if ref is not None:
            wrapped.to(device=ref.device, dtype=ref.dtype)
        model.set_submodule(name, wrapped)
    freeze_backbone(model)
    for m in model.modules():
        if isinstance(m, SSF):
            m.scale.requires_grad_(True)
            m.shift.requires_grad_(True)
    return model


def ssf_param_count(model: nn.Module) -> int:
    """Parameters held by all SSF scales and shifts."""
    return sum(m.scale.numel() + m.shift.numel() for m in model.modules() if isinstance(m, SSF))


@dataclass
class SSFOptions(MethodOptions):
    """Options of ``ssf``."""

    patch_embed: bool = option(True, "also scale and shift the patch embedding's output")
    init_std: float = option(0.0, "0: start at scale 1, shift 0; > 0: draw N(1, std) / N(0, std) as the SSF code")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_std < 0:
            raise ConfigError(f"init_std must be >= 0, got {self.init_std}")


@register("ssf")
class ScaleShift(Method):
    description = "SSF: per-channel scale and shift after every Linear, LayerNorm and the patch embedding"
    Options = SSFOptions

    def prepare(self, model: nn.Module, options: SSFOptions, ctx: PrepareContext) -> nn.Module:
        return add_ssf(model, patch_embed=options.patch_embed, init_std=options.init_std, seed=ctx.seed)

    def extra_info(self, model: nn.Module) -> dict[str, Any]:
        return {
            "ssf_modules": sum(isinstance(m, SSF) for m in model.modules()),
            "ssf_params": ssf_param_count(model),
        }
