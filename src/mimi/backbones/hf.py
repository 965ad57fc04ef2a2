"""Backbones from Hugging Face ``transformers``: ``--model transformers:ORG/NAME`` (the Hub, or its local cache when
the Hub cannot be reached) or ``--model transformers:PATH`` (a folder written by ``save_pretrained``).

The model is wrapped in :class:`TransformersBackbone`, which gives it what mimi reads from a timm model: pooled
features, a classifier head (``get_classifier`` / ``reset_classifier``), ``num_features`` and a ``pretrained_cfg``
with the image size, mean and std (from the model's config and image processor). Its transformer blocks are found
by :mod:`mimi.core.layouts`, so adapters, LoRA and every method built on them work unchanged. ``transformers`` is
imported only here, and only when such a model is asked for: ``import mimi`` stays light.

What differs between the families lives in :data:`FAMILIES` (one row each): the model class, the pooled feature
(timm's ``num_classes=0`` output) and whether the forward pass must be told to resize position embeddings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimi.core.errors import BackboneError, ConfigError
from mimi.core.modules import TRANSFORMERS_PREFIX as PREFIX
from mimi.core.quiet import quiet_pytree_notes

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Family:
    """One ``transformers`` model family mimi knows.

    Attributes:
        label: its name in messages and the README.
        model_class: the ``transformers`` class that loads its checkpoints as a bare encoder.
        pool: the pooled feature: ``cls`` (``last_hidden_state[:, 0]``, after the final norm) or ``pooler``
            (``pooler_output``: DINOv2's normed CLS token, Swin's token mean, CLIP's post-normed CLS token).
        interpolate: the forward pass takes ``interpolate_pos_encoding=True`` (other image sizes than the config's).
        load_kwargs: extra ``from_pretrained`` / constructor arguments (no randomly initialised pooler).
    """

    label: str
    model_class: str
    pool: str
    interpolate: bool
    load_kwargs: dict[str, Any] = field(default_factory=dict)


#: ``config.model_type`` -> family. A full CLIP checkpoint (``clip``) is loaded as its vision tower.
FAMILIES: dict[str, Family] = {
    "vit": Family("ViT", "ViTModel", "cls", True, {"add_pooling_layer": False}),
    "deit": Family("DeiT", "DeiTModel", "cls", True, {"add_pooling_layer": False}),
    "dinov2": Family("DINOv2", "Dinov2Model", "pooler", False),
    "swin": Family("Swin", "SwinModel", "pooler", True),
    "clip_vision_model": Family("CLIP vision", "CLIPVisionModel", "pooler", True),
    "clip": Family("CLIP vision", "CLIPVisionModel", "pooler", True),
}


def _transformers():
    with quiet_pytree_notes():
        try:
            import transformers
        except ImportError as e:
            raise BackboneError(
                f"a transformers: backbone needs the transformers package ({e}); pip install 'mimi-adapters[hf]'"
            ) from e
    transformers.logging.set_verbosity_error()  # no "weights not initialised" chatter for a pooler we never use
    transformers.logging.disable_progress_bar()  # a bar per load of a few MB: mimi prints its own progress
    return transformers


def source_of(name: str) -> str:
    """The Hub id or folder a ``transformers:`` name points at (a folder path is expanded)."""
    source = name[len(PREFIX) :].strip()
    if not source:
        raise ConfigError("--model transformers: needs a name: transformers:ORG/NAME or transformers:PATH")
    path = Path(source).expanduser()
    return str(path) if path.is_dir() else source


def family_of(config) -> Family:
    """The :class:`Family` of a ``transformers`` config, or a one-line refusal naming the supported ones."""
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        known = ", ".join(sorted({f"{f.label} ({t})" for t, f in FAMILIES.items() if t != "clip"}))
        raise BackboneError(
            f"transformers model type {getattr(config, 'model_type', None)!r} is not supported; supported: {known}"
        )
    return family


def _config(transformers, source: str, *, local_only: bool):
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as e:
        where = "this folder" if Path(source).is_dir() else "the Hub or its local cache"
        raise BackboneError(
            f"transformers:{source}: no model config in {where} ({type(e).__name__}); give a save_pretrained folder "
            "(transformers:PATH) or a Hub name that is cached here"
        ) from e
    family = family_of(config)
    if config.model_type == "clip":
        config = config.vision_config
    return config, family


def _mean_std(transformers, source: str, *, local_only: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image processor's mean and std; ImageNet's, with a warning, where the model has no image processor."""
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
        return tuple(float(v) for v in processor.image_mean), tuple(float(v) for v in processor.image_std)
    except (OSError, ValueError, AttributeError, TypeError) as e:
        logging.getLogger(__name__).warning(
            "%s has no image processor with a mean and std (%s): using ImageNet's", source, type(e).__name__
        )
        return _IMAGENET


class TransformersBackbone(nn.Module):
    """A ``transformers`` vision encoder with what mimi reads from a timm model.

    ``forward(x)`` gives logits of ``head`` on the pooled feature (the feature itself when ``head`` is an identity:
    ``reset_classifier(0)``). ``model`` is the ``transformers`` model itself, unchanged but for the adapters a method
    puts into its blocks, so it can be saved or handed to PEFT as it is.
    """

    def __init__(
        self,
        model: nn.Module,
        family: Family,
        *,
        name: str,
        img_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.name = name
        self.img_size = img_size
        config = model.config
        self.num_features = int(getattr(model, "num_features", 0) or config.hidden_size)
        self.patch_size = int(config.patch_size)
        self.pretrained_cfg = {
            "input_size": (3, img_size, img_size),
            "mean": mean,
            "std": std,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
        }
        self.head: nn.Module = nn.Identity()
        self.reset_classifier(num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new linear head for ``num_classes`` (0: none, the model gives pooled features)."""
        ref = next(self.model.parameters())
        self.head = (
            nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes
            else nn.Identity()
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature of each image (timm's ``num_classes=0`` output)."""
        kwargs = {"interpolate_pos_encoding": True} if self.family.interpolate else {}
        out = self.model(pixel_values=x, **kwargs)
        return out.last_hidden_state[:, 0] if self.family.pool == "cls" else out.pooler_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def create_transformers_backbone(
    name: str,
    *,
    weights: str | None = "auto",
    num_classes: int = 0,
    img_size: int | None = None,
    folder: str | Path | None = None,
) -> tuple[TransformersBackbone, str]:
    """Build a ``transformers`` backbone from ``transformers:ORG/NAME`` or ``transformers:PATH``.

    Args:
        name: the model name with its ``transformers:`` prefix.
        weights: ``auto`` (the Hub or its cache if reachable, a save_pretrained folder as it is; random init with a
            warning where neither has weights), ``hub`` (the same, or fail), ``none`` (the config's architecture,
            random init), or a ``.safetensors`` file holding the model's state dict (``transformers`` names).
        num_classes: classes of the new head (0: pooled features).
        img_size: input resolution (default: the config's ``image_size``); a multiple of the patch size.
        folder: where to read config, weights and image processor instead of the name's own source (an importer's
            folder for the same architecture).

    Returns:
        ``(model, source)`` where ``source`` says where the weights came from.
    """
    from mimi.backbones import hub_reachable  # the package's own Hub check (HF_HUB_OFFLINE, a closed network)

    transformers = _transformers()
    source = str(folder) if folder is not None else source_of(name)
    local_only = Path(source).is_dir() or not hub_reachable()
    config, family = _config(transformers, source, local_only=local_only)
    size = int(img_size or config.image_size)
    if size % int(config.patch_size):
        raise ConfigError(
            f"--img-size {size} is not a multiple of the patch size {config.patch_size} of {name}; "
            f"use e.g. {max(1, size // config.patch_size) * config.patch_size}"
        )
    cls = getattr(transformers, family.model_class)
    w = (weights or "none").strip()
    with quiet_pytree_notes():
        if w == "none":
            model, where = cls(config, **family.load_kwargs), "random-init"
        elif w in ("auto", "hub"):
            try:
                model = cls.from_pretrained(source, local_files_only=local_only, **family.load_kwargs)
                where = source if Path(source).is_dir() else ("hub" if not local_only else "hub cache")
            except OSError as e:
                if w == "hub":
                    raise BackboneError(f"cannot load the weights of {name}: {str(e).splitlines()[0][:200]}") from e
                logging.getLogger(__name__).warning(
                    "no weights for %s (%s): using RANDOM initialisation", name, type(e).__name__
                )
                model, where = cls(config, **family.load_kwargs), "random-init (no weights found)"
        else:
            model, where = cls(config, **family.load_kwargs), str(Path(w).expanduser())
            _load_file(model, Path(w).expanduser(), name)
    mean, std = _mean_std(transformers, source, local_only=local_only)
    model.eval()
    backbone = TransformersBackbone(
        model, family, name=name, img_size=size, mean=mean, std=std, num_classes=num_classes
    )
    return backbone, where


def _load_file(model: nn.Module, path: Path, name: str) -> None:
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise BackboneError(f"--weights {path}: a transformers: backbone reads .safetensors files only")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError besides OSError
        raise BackboneError(f"--weights {path}: cannot read the file ({type(e).__name__}); it is damaged") from e
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise BackboneError(
            f"--weights {path} does not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {wrong[:3]}"
        )
    model.load_state_dict(state)
