"""Adapter methods (MiMi, fixed-size sequential and AdaptFormer-style parallel) and the simplest baselines."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mimi.core.adapters import AdapterConfig, add_adapters, freeze_backbone
from mimi.methods.base import Method, MethodOptions, PrepareContext, Traits, option, register, run_flag


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
    traits = Traits(servable=True)


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
