"""LoRA layers: a low-rank update wrapped around chosen ``nn.Linear`` layers of every block.

``LoRALinear(base)(x) = base(x) + (alpha / rank) * B(A(dropout(x)))`` with ``B`` zero-initialised, so the adapted
model starts exactly as the backbone. The update is mergeable: :func:`merge_lora` folds every ``B @ A`` into the
frozen weight and removes the wrappers (zero inference overhead). The per-layer layout (rank, alpha) is what a task
file records, so the layers live in the core; the training methods built on them are in :mod:`mimi.methods.lora`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from mimi.core.adapters import AdaptedBranch, find_blocks, freeze_backbone
from mimi.core.errors import ConfigError, ModelError
from mimi.core.layouts import block_layout

DEFAULT_TARGETS: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``(alpha / rank) * B A``.

    Args:
        base: the linear layer to adapt (kept as ``self.base``, not copied).
        rank: inner dimension ``r`` of the update.
        alpha: scaling numerator; the update is multiplied by ``alpha / rank`` (default: ``rank``, i.e. 1).
        dropout: dropout on the input of the low-rank branch.
        generator: RNG of ``A``'s initialisation (None: torch's global RNG).
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        *,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        ref = base.weight
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, device=ref.device, dtype=ref.dtype)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, device=ref.device, dtype=ref.dtype)
        self.drop = nn.Dropout(dropout)
        with torch.no_grad():
            # kaiming_uniform_(a=sqrt(5)) on a (rank, in) matrix is U(-1/sqrt(in), 1/sqrt(in)), as in loralib / PEFT.
            nn.init.kaiming_uniform_(self.lora_a.weight, a=5**0.5, generator=generator)
            nn.init.zeros_(self.lora_b.weight)  # B = 0: the update starts at zero, the output is the backbone's

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_b(self.lora_a(self.drop(x)))

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``(alpha / rank) * B @ A`` of shape ``(out, in)``."""
        return self.scaling * self.lora_b.weight @ self.lora_a.weight

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` equal to this module in eval mode (the base is left untouched)."""
        out = copy.deepcopy(self.base)
        out.weight += self.delta_weight().to(out.weight.dtype)
        return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` of ``model`` by its merged ``nn.Linear`` (in place; returns ``model``)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            model.set_submodule(name, module.merged())
    return model


def lora_targets(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> list[tuple[str, nn.Linear]]:
    """The linear layers LoRA adapts: ``<block>.<target>`` for every block found by ``find_blocks``.

    Already-wrapped layers are reported by their base ``nn.Linear``, so counts work before and after ``prepare``.

    Raises:
        ModelError: if the model has no block, or a block lacks a target or it is not a linear layer.
    """
    blocks = find_blocks(model)
    if not blocks:
        raise ModelError(f"{type(model).__name__} has no transformer block with 'attn' and 'mlp'; LoRA needs one")
    found = []
    for block_name, block in blocks:
        layout = block_layout(block)
        for target in targets:
            for name in layout.layer_names(target):  # timm's attn.qkv is q_proj, k_proj and v_proj in transformers
                try:
                    layer = block.get_submodule(name)
                except AttributeError as e:
                    raise ModelError(f"block {block_name!r} has no submodule {name!r} to adapt with LoRA") from e
                layer = layer.base if isinstance(layer, LoRALinear) else layer
                layer = layer.branch if isinstance(layer, AdaptedBranch) else layer  # mimi-lora wraps it
                if not isinstance(layer, nn.Linear):
                    raise ModelError(f"{block_name}.{name} is a {type(layer).__name__}, LoRA needs an nn.Linear")
                found.append((f"{block_name}.{name}", layer))
    return found


def lora_params_per_rank(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, *, extra_per_rank: int = 0) -> int:
    """Trainable parameters one unit of rank costs: ``sum(in + out + extra_per_rank)`` over the targeted layers.

    ``extra_per_rank=1`` gives AdaLoRA's cost (one singular value per rank and layer).
    """
    return sum(layer.in_features + layer.out_features + extra_per_rank for _, layer in lora_targets(model, targets))


def add_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    seed: int | None = None,
) -> nn.Module:
    """Wrap every targeted linear layer in a :class:`LoRALinear`; freeze all but LoRA and the head (in place)."""
    layout = {name: {"rank": rank, "alpha": alpha} for name, _ in lora_targets(model, targets)}
    return apply_lora_layout(model, layout, dropout=dropout, seed=seed)


def lora_layout(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per-layer ``{"rank", "alpha"}`` of every :class:`LoRALinear`: what a checkpoint needs to rebuild them."""
    return {n: {"rank": m.rank, "alpha": m.alpha} for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora_layout(
    model: nn.Module,
    layout: dict[str, dict[str, float | None]],
    *,
    dropout: float = 0.0,
    seed: int | None = None,
) -> nn.Module:
    """Wrap the named linear layers in :class:`LoRALinear` s of their own rank (and alpha); freeze all but LoRA + head.

    Layers may have different ranks (a pruned LoRA); a layer absent from ``layout`` stays a plain ``nn.Linear``.

    Raises:
        ModelError: if the model already holds LoRA, or a name is not an ``nn.Linear`` of this model.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ModelError("the model already holds LoRA layers; build a fresh backbone")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, spec in layout.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError as e:
            raise ModelError(f"LoRA layer {name!r} does not exist in {type(model).__name__}") from e
        if not isinstance(layer, nn.Linear):
            raise ModelError(f"LoRA layer {name!r} is a {type(layer).__name__}, not an nn.Linear")
        wrapped = LoRALinear(layer, int(spec["rank"]), spec.get("alpha"), dropout=dropout, generator=generator)
        model.set_submodule(name, wrapped)
    freeze_backbone(model)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_a.requires_grad_(True)
            m.lora_b.requires_grad_(True)
    return model


def lora_param_count(model: nn.Module) -> int:
    """Parameters held by all LoRA updates of the model."""
    return sum(m.lora_a.weight.numel() + m.lora_b.weight.numel() for m in model.modules() if isinstance(m, LoRALinear))
