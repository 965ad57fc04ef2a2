"""External peers through Hugging Face PEFT: LoRA and AdaLoRA on the same timm backbone (PEFT's custom-model path).

PEFT is an optional dependency (``pip install mimi-adapters[peft]``); it is imported only when a method is prepared.

* Targets are chosen by a regex built from the block names ``find_blocks`` returns, e.g.
  ``(?:blocks\\.\\d+)\\.(?:attn\\.qkv|attn\\.proj|mlp\\.fc1|mlp\\.fc2)`` on a ViT: a plain list such as
  ``["qkv", "proj"]`` would also hit ``patch_embed.proj`` (a Conv2d). The layers the regex selects are checked
  against the expected set before PEFT touches the model.
* The classifier head (found by identity with ``get_classifier()``) goes to ``modules_to_save``: PEFT wraps it in a
  ``ModulesToSaveWrapper`` that keeps the original head frozen and trains a copy.
* AdaLoRA: see :class:`PeftAdaLoRA` for how its rank allocation is hooked into our training loop.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mimi.core.adapters import find_blocks
from mimi.core.errors import ConfigError, ModelError
from mimi.core.layouts import block_layout
from mimi.core.lora import DEFAULT_TARGETS, lora_targets
from mimi.core.modules import classifier, trainable_without_head
from mimi.core.quiet import quiet_pytree_notes
from mimi.methods.base import Method, MethodOptions, PrepareContext, Traits, option, register, run_flag
from mimi.methods.lora import check_rank, resolve_rank

ADAPTER = "default"  # PEFT's adapter name


def _peft():
    try:
        with quiet_pytree_notes():
            import peft
    except ImportError as e:
        raise ConfigError("the peft-* methods need Hugging Face PEFT: pip install 'mimi-adapters[peft]'") from e
    return peft


def target_regex(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> str:
    """A ``target_modules`` regex matching exactly ``<block>.<target>`` for every transformer block.

    Block names are generalised over their indices (``blocks.0`` -> ``blocks\\.\\d+``, Swin's ``layers.0.blocks.1``
    -> ``layers\\.\\d+\\.blocks\\.\\d+``), so the regex reads like one written by hand.
    """
    found = find_blocks(model)
    blocks = sorted({re.sub(r"\d+", r"\\d+", re.escape(name)) for name, _ in found})
    if not blocks:
        raise ModelError(f"{type(model).__name__} has no transformer block with 'attn' and 'mlp'")
    # each timm layer name as the blocks call it (transformers: attn.qkv is q_proj, k_proj and v_proj)
    layers = dict.fromkeys(n for _, b in found for t in targets for n in block_layout(b).layer_names(t))
    return rf"(?:{'|'.join(blocks)})\.(?:{'|'.join(re.escape(n) for n in layers)})"


def head_name(model: nn.Module) -> str | None:
    """The name under which ``model.get_classifier()`` appears in ``model.named_modules()`` (None: no head)."""
    head = classifier(model)
    if head is None or not any(True for _ in head.parameters()):
        return None
    return next((name for name, m in model.named_modules() if m is head), None)


def apply_peft(model: nn.Module, config: Any, *, targets: Sequence[str]) -> nn.Module:
    """``peft.get_peft_model`` after checking that the regex selects exactly the intended linear layers."""
    peft = _peft()
    expected = {name for name, _ in lora_targets(model, targets)}
    matched = {name for name, _ in model.named_modules() if re.fullmatch(config.target_modules, name)}
    if matched != expected:
        raise ModelError(
            f"PEFT target regex {config.target_modules!r} selects {sorted(matched ^ expected)[:4]} unexpectedly"
        )
    peft_model = peft.get_peft_model(model, config)
    inner = peft_model.base_model.model  # the timm model, modified in place
    tuned = {n for n, m in inner.named_modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)}
    saved = {n for n, m in inner.named_modules() if isinstance(m, peft.utils.ModulesToSaveWrapper)}
    # modules_to_save matches names by suffix: make sure only the head was wrapped.
    if tuned != expected or saved != set(config.modules_to_save or []):
        raise ModelError(
            f"PEFT adapted {sorted(tuned ^ expected)[:4]} / saved {sorted(saved)}: not the intended layers"
        )
    return peft_model


@dataclass
class PeftLoRAOptions(MethodOptions):
    """Options of ``peft-lora``. ``budget_params`` picks the rank from a parameter budget (head excluded), to match
    a MiMi run."""

    rank: int | None = option(None, "LoRA rank r (default: from the budget, else --adapter-dim, else 8)")
    r: int | None = option(None, "alias of rank (PEFT's name)")
    alpha: float | None = option(None, "PEFT's lora_alpha (default: rank, scaling 1)")
    targets: list[str] = option(list(DEFAULT_TARGETS), "linear layers of every block that get an update")
    dropout: float = option(0.0, "PEFT's lora_dropout")
    budget_params: int | None = option(None, "pick the rank whose parameters (head excluded) are closest to this")
    adapter_dim: int | None = run_flag(None, "the rank when neither rank nor a budget is given")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank is not None and self.r is not None:
            raise ConfigError("give rank or r in method_kwargs, not both")
        if self.the_rank is not None and self.budget_params is not None:
            raise ConfigError("give rank or budget_params in method_kwargs, not both")
        check_rank("rank", self.the_rank)

    @property
    def the_rank(self) -> int | None:
        """``rank``, or its alias ``r``."""
        return self.rank if self.rank is not None else self.r


@register("peft-lora")
class PeftLoRA(Method):
    description = "Hugging Face PEFT LoRA on qkv/proj/fc1/fc2 of every block (the head in modules_to_save)"
    traits = Traits(size_unit="rank", budget_sets="rank")
    Options = PeftLoRAOptions

    def prepare(self, model: nn.Module, options: PeftLoRAOptions, ctx: PrepareContext) -> nn.Module:
        peft = _peft()
        targets = tuple(options.targets)
        rank = resolve_rank(
            model,
            ctx,
            rank=options.the_rank,
            budget_params=options.budget_params,
            adapter_dim=options.adapter_dim,
            targets=targets,
        )
        head = head_name(model)
        config = peft.LoraConfig(
            r=rank,
            lora_alpha=rank if options.alpha is None else options.alpha,  # alpha = rank: scaling 1, as our `lora`
            lora_dropout=options.dropout,
            target_modules=target_regex(model, targets),
            modules_to_save=[head] if head else None,
        )
        return apply_peft(model, config, targets=targets)

    def extra_info(self, model: nn.Module) -> dict[str, Any]:
        config = model.peft_config[ADAPTER]
        return {"lora_rank": config.r, "lora_alpha": config.lora_alpha, "lora_params": trainable_without_head(model)}


def _schedule(total_steps: int, tinit: int | None, tfinal: int | None) -> tuple[int, int]:
    """AdaLoRA's phases: warm-up ``tinit`` (default 10% of the steps) and final ``tfinal`` (default 20%).

    ``tfinal >= 1`` whenever there are 2+ steps: the final allocation happens at step ``total - tfinal``, which is
    never reached with ``tfinal = 0`` (steps run from 0 to total - 1).
    """
    if tfinal is None:
        tfinal = max(1, round(0.2 * total_steps)) if total_steps >= 2 else 0
    if tinit is None:
        tinit = min(round(0.1 * total_steps), max(0, total_steps - tfinal - 1))
    if tinit < 0 or tfinal < 0 or tinit >= total_steps - tfinal:
        raise ConfigError(
            f"peft-adalora: need 0 <= tinit < total_steps - tfinal, got tinit={tinit}, tfinal={tfinal}, "
            f"total_steps={total_steps}"
        )
    return tinit, tfinal


@dataclass
class PeftAdaLoRAOptions(MethodOptions):
    """Options of ``peft-adalora`` (None: derived, see the help). ``budget_params`` sets the final budget:
    ``target_r`` ranks of ``in + out + 1`` parameters each."""

    init_r: int | None = option(None, "starting rank of every layer (default: 1.5 * target_r, PEFT's 12 / 8)")
    target_r: int | None = option(None, "average final rank (default: init_r / 1.5, else the budget, else 8)")
    alpha: float | None = option(None, "PEFT's lora_alpha (default: init_r, scaling 1)")
    targets: list[str] = option(list(DEFAULT_TARGETS), "linear layers of every block that get an update")
    dropout: float = option(0.0, "PEFT's lora_dropout")
    tinit: int | None = option(None, "warm-up steps before ranks are pruned (default: 10% of the steps)")
    tfinal: int | None = option(None, "final steps at the final ranks (default: 20% of the steps)")
    deltaT: int = option(10, "steps between two rank allocations")
    beta1: float = option(0.85, "EMA factor of the importance (PEFT's beta1)")
    beta2: float = option(0.85, "EMA factor of the uncertainty (PEFT's beta2)")
    orth_reg_weight: float = option(0.5, "weight of the orthogonality penalty on A and B")
    budget_params: int | None = option(None, "pick target_r from this parameter budget (head excluded)")
    adapter_dim: int | None = run_flag(None, "target_r when neither ranks nor a budget are given")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_r is not None and self.budget_params is not None:
            raise ConfigError("give target_r or budget_params in method_kwargs, not both")
        check_rank("target_r", self.target_r)
        check_rank("init_r", self.init_r)


@register("peft-adalora")
class PeftAdaLoRA(Method):
    """Hugging Face PEFT AdaLoRA: SVD-form LoRA whose per-layer ranks are pruned from ``init_r`` to ``target_r``.

    Hook ordering. PEFT documents ``backward -> optimizer.step -> update_and_allocate -> zero_grad``; our loop calls
    ``after_backward`` between backward and ``optimizer.step``. Importance scores (``|w * grad|``) are the same either
    way (the gradients are there), but a mask applied before the step is partly undone by that step (AdamW moves the
    zeroed singular values again). So, besides calling ``update_and_allocate(step)`` in ``after_backward``, a forward
    pre-hook re-applies the final rank pattern before every forward once it is fixed: the model trained, evaluated and
    saved in the final phase holds exactly ``target_r`` ranks on average, as with PEFT's own order.

    PEFT adds AdaLoRA's orthogonality penalty only to outputs carrying ``.loss`` (HF models); a timm model returns
    logits, so ``after_backward`` back-propagates ``orth_reg_weight * R(A, B)`` itself, before the allocation.
    """

    description = "Hugging Face PEFT AdaLoRA: ranks pruned from init_r to an average target_r during training"
    traits = Traits(size_unit="rank", budget_sets="target_r")
    Options = PeftAdaLoRAOptions

    def __init__(self) -> None:
        self._step = -1

    def prepare(self, model: nn.Module, options: PeftAdaLoRAOptions, ctx: PrepareContext) -> nn.Module:
        peft = _peft()
        o = options
        targets = tuple(o.targets)
        # Ranks keep PEFT's default ratio init_r = 1.5 * target_r (12 / 8) when only one of them is given.
        # budget_params sets the FINAL budget: target_r ranks of (in + out + 1) parameters each.
        target_r = o.target_r
        if target_r is None and o.init_r is not None and o.budget_params is None:
            target_r = max(1, round(o.init_r / 1.5))
        target_r = resolve_rank(
            model,
            ctx,
            rank=target_r,
            budget_params=o.budget_params,
            adapter_dim=o.adapter_dim,
            targets=targets,
            extra_per_rank=1,
        )
        init_r = o.init_r if o.init_r is not None else max(target_r + 1, round(1.5 * target_r))
        if not target_r < init_r:
            raise ConfigError(f"peft-adalora: target_r ({target_r}) must be below init_r ({init_r})")
        tinit, tfinal = _schedule(ctx.total_steps, o.tinit, o.tfinal)
        head = head_name(model)
        config = peft.AdaLoraConfig(
            init_r=init_r,
            target_r=target_r,
            lora_alpha=init_r if o.alpha is None else o.alpha,  # scaling alpha / init_r = 1
            lora_dropout=o.dropout,
            total_step=ctx.total_steps,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=o.deltaT,
            beta1=o.beta1,
            beta2=o.beta2,
            orth_reg_weight=o.orth_reg_weight,
            target_modules=target_regex(model, targets),
            modules_to_save=[head] if head else None,
        )
        model = apply_peft(model, config, targets=targets)
        model.register_forward_pre_hook(self._mask_final)
        return model

    def _final(self, model: nn.Module) -> bool:
        config = model.peft_config[ADAPTER]
        return config.rank_pattern is not None and self._step >= config.total_step - config.tfinal

    def _mask_final(self, model: nn.Module, args: Any) -> None:
        if self._final(model):
            model.base_model.rankallocator.mask_using_rank_pattern(
                model.base_model.model, model.peft_config[ADAPTER].rank_pattern
            )

    def after_backward(self, model: nn.Module, step: int) -> None:
        tuner = model.base_model
        config = model.peft_config[ADAPTER]
        if config.orth_reg_weight > 0:
            penalty = orthogonal_penalty(tuner.model)
            if penalty is not None:
                (config.orth_reg_weight * penalty).backward()
        if config.rank_pattern is None and step > config.total_step - config.tfinal:
            # Resumed inside the final phase: the pattern lived only in memory; the masked values are zeros on disk.
            config.rank_pattern = current_rank_pattern(tuner.model)
        tuner.update_and_allocate(step)
        self._step = step

    def extra_info(self, model: nn.Module) -> dict[str, Any]:
        config = model.peft_config[ADAPTER]
        inner = model.base_model.model
        if self._final(model):
            self._mask_final(model, ())  # the last optimizer step may have moved masked values
        if config.rank_pattern is not None:
            suffix = f".lora_E.{ADAPTER}"
            ranks = {name.removesuffix(suffix): int(sum(keep)) for name, keep in config.rank_pattern.items()}
        else:  # no allocation yet (very short run): every rank is still allowed
            ranks = {name: int(e.shape[0]) for name, e in _singular_values(inner).items()}
        cost = {name: a.shape[1] + b.shape[0] + 1 for name, (a, b) in _factors(inner).items()}  # in + out + 1
        return {
            "adalora_ranks": ranks,
            "adalora_final": self._step >= config.total_step - config.tfinal,
            "adalora_total_rank": sum(ranks.values()),
            "adalora_target_total_rank": config.target_r * len(ranks),
            "lora_params": trainable_without_head(model),
            "effective_lora_params": sum(r * cost[name] for name, r in ranks.items()),
        }


def _by_layer(model: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    suffix = f".{kind}.{ADAPTER}"
    return {n.removesuffix(suffix): p for n, p in model.named_parameters() if n.endswith(suffix)}


def _singular_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """AdaLoRA's ``lora_E`` (r x 1) per adapted layer, by layer name."""
    return _by_layer(model, "lora_E")


def _factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """AdaLoRA's ``(lora_A (r x in), lora_B (out x r))`` per adapted layer, by layer name."""
    a, b = _by_layer(model, "lora_A"), _by_layer(model, "lora_B")
    return {name: (a[name], b[name]) for name in a}


def current_rank_pattern(model: nn.Module) -> dict[str, list[bool]]:
    """A ``rank_pattern`` (as PEFT stores it) read from the current singular values: masked ones are exactly zero."""
    return {f"{name}.lora_E.{ADAPTER}": (e != 0).view(-1).tolist() for name, e in _singular_values(model).items()}


def orthogonal_penalty(model: nn.Module) -> torch.Tensor | None:
    """AdaLoRA's regulariser: mean over A and B matrices of ``||A A^T - I||_F`` / ``||B^T B - I||_F``."""
    terms = []
    for name, p in model.named_parameters():
        if not p.requires_grad or ADAPTER not in name:
            continue
        if ".lora_A." in name:
            gram = p @ p.T  # (r, r)
        elif ".lora_B." in name:
            gram = p.T @ p  # (r, r)
        else:
            continue
        terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=p.device, dtype=p.dtype)))
    return torch.stack(terms).mean() if terms else None
