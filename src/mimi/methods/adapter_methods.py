"""Adapter methods (MiMi, fixed-size sequential and AdaptFormer-style parallel) and the simplest baselines."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from mimi.core.adapters import AdapterConfig, add_adapters, freeze_backbone
from mimi.methods.base import Method, method_kwargs, register

if TYPE_CHECKING:
    from mimi.config import TrainConfig


def adapter_config(cfg: TrainConfig, **overrides) -> AdapterConfig:
    kw = method_kwargs(
        cfg, {"act": "gelu", "dropout": 0.0, "scale": 1.0, "train_norms": False, "targets": ["attn", "mlp"]}
    )
    kw.update(overrides)
    return AdapterConfig(
        hidden_dim=cfg.adapter_dim,
        reduction=cfg.reduction,
        placement=cfg.placement,
        init_seed=cfg.seed,
        act=kw["act"],
        dropout=kw["dropout"],
        scale=kw["scale"],
        train_norms=kw["train_norms"],
        targets=tuple(kw["targets"]),
    )


@register("mimi")
class MiMi(Method):
    description = "large adapters, iteratively pruned (--score) to --budget-params, retrained after every cut"
    prunes = True

    def prepare(self, model: nn.Module, cfg: TrainConfig, *, total_steps: int) -> nn.Module:
        return add_adapters(model, adapter_config(cfg))


@register("mimi-oneshot")
class MiMiOneShot(MiMi):
    description = "ablation: one cut straight to the budget, then retraining (MiMi with rho=1)"


@register("adapter")
class FixedAdapter(Method):
    description = "fixed-size bottleneck adapters (--adapter-dim, --placement), no pruning"

    def prepare(self, model: nn.Module, cfg: TrainConfig, *, total_steps: int) -> nn.Module:
        return add_adapters(model, adapter_config(cfg))


@register("adaptformer")
class AdaptFormer(Method):
    description = "AdaptFormer: parallel adapter beside each MLP, output scaled by s=0.1"

    def prepare(self, model: nn.Module, cfg: TrainConfig, *, total_steps: int) -> nn.Module:
        defaults = {"scale": cfg.method_kwargs.get("scale", 0.1), "targets": cfg.method_kwargs.get("targets", ["mlp"])}
        config = adapter_config(cfg, **defaults)
        config.placement = "parallel"
        return add_adapters(model, config)


@register("linear")
class LinearProbe(Method):
    description = "linear probe: only the classifier head is trained"

    def prepare(self, model: nn.Module, cfg: TrainConfig, *, total_steps: int) -> nn.Module:
        freeze_backbone(model)
        return model


@register("full")
class FullFinetune(Method):
    description = "full fine-tuning: every parameter is trained"

    def prepare(self, model: nn.Module, cfg: TrainConfig, *, total_steps: int) -> nn.Module:
        model.requires_grad_(True)
        return model


@register("bitfit")
class BitFit(Method):
    description = "BitFit: only biases (and the head) are trained"

    def prepare(self, model: nn.Module, cfg: TrainConfig, *, total_steps: int) -> nn.Module:
        freeze_backbone(model)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)
        return model
