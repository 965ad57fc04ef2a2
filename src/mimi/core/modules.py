"""Small facts about a timm model used across the package: its classifier head and its architecture name."""

from __future__ import annotations

from torch import nn


def classifier(model: nn.Module) -> nn.Module | None:
    """The classifier head (timm's ``get_classifier()``), or None where the model has none or it is not a module
    (timm returns ``nn.Identity`` or a bare tensor for some heads)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return head if isinstance(head, nn.Module) else None


def trainable_without_head(model: nn.Module) -> int:
    """Trainable parameters outside the classifier head (PEFT's head copy included in the head)."""
    head = classifier(model)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    return sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in head_ids)


#: The prefix of a model name that asks for a Hugging Face ``transformers`` backbone (``transformers:ORG/NAME``).
TRANSFORMERS_PREFIX = "transformers:"


def is_transformers(model_name: str | None) -> bool:
    """Whether a model name asks for a ``transformers`` backbone (``transformers:ORG/NAME`` or ``transformers:PATH``)."""
    return bool(model_name) and model_name.startswith(TRANSFORMERS_PREFIX)


def architecture_of(model_name: str | None) -> str | None:
    """The timm architecture of a model name, without its pretrained tag:
    ``vit_small_patch14_dinov2.lvd142m`` -> ``vit_small_patch14_dinov2``; a ``transformers:`` name (a Hub id or a
    folder, whose dots are not tags) as it is."""
    if is_transformers(model_name):
        return model_name
    return model_name.split(".")[0] if model_name else None
