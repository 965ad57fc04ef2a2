"""Backbones: any timm model by name, with weights from timm's usual sources, a local file, or an importer; and
``transformers`` vision models by ``transformers:ORG/NAME`` or ``transformers:PATH`` (:mod:`mimi.backbones.hf`)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from mimi.core.errors import BackboneError, ConfigError
from mimi.core.modules import classifier, is_transformers

log = logging.getLogger(__name__)

# Named offline weight sources: name -> (timm model they fit, function returning the weight file path).
IMPORTERS: dict[str, tuple[str, str]] = {
    "imgfocus": ("vit_small_patch14_dinov2", "mimi.importers.imgfocus:import_imgfocus"),
}
# The same sources for transformers models: name -> (the model they fit, function returning a save_pretrained folder).
TRANSFORMERS_IMPORTERS: dict[str, tuple[str, str]] = {
    "imgfocus": ("transformers:facebook/dinov2-small", "mimi.importers.imgfocus:transformers_folder"),
}
_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def _kwargs(img_size: int | None, model_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    kw = dict(model_kwargs or {})
    if img_size is not None:
        kw["img_size"] = img_size
    return kw


def _create(name: str, **kw: Any) -> nn.Module:
    try:
        return timm.create_model(name, **kw)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise BackboneError(f"unknown timm model {name!r}; list them with `timm.list_models('vit*')`") from e
        raise


def _from_importer(source: str, name: str, num_classes: int, kw: dict[str, Any]) -> nn.Module:
    import importlib

    model_name, target = IMPORTERS[source]
    if name != model_name:
        raise BackboneError(f"--weights {source} holds weights for {model_name}, not {name}; pass --model {model_name}")
    module, func = target.split(":")
    path = getattr(importlib.import_module(module), func)()
    model = _create(name, pretrained=False, num_classes=num_classes, **kw)
    from mimi.importers.imgfocus import load_into

    load_into(model, path)
    return model


def check_weights_source(weights: str | None) -> None:
    """Raise unless ``weights`` is a known source name or an existing file of a supported type."""
    w = (weights or "none").strip()
    if w in ("none", "auto", "hub") or w in IMPORTERS or w in TRANSFORMERS_IMPORTERS:
        return
    path = Path(w).expanduser()
    if path.suffix not in _FILE_SUFFIXES:
        raise BackboneError(
            f"--weights {w}: neither a weight source (auto, hub, none, {', '.join(IMPORTERS)}) nor a weight file "
            f"({', '.join(_FILE_SUFFIXES)})"
        )
    if not path.is_file():
        raise BackboneError(f"--weights {path}: no such file")


def check_img_size(model: nn.Module, name: str) -> None:
    """Patch-embedding models need an image size that is a multiple of their patch size."""
    pe = getattr(model, "patch_embed", None)
    patch, size = getattr(pe, "patch_size", None), getattr(pe, "img_size", None)
    if patch is None or size is None or getattr(pe, "dynamic_img_pad", False):
        return
    patch = tuple(patch) if isinstance(patch, tuple | list) else (patch, patch)
    size = tuple(size) if isinstance(size, tuple | list) else (size, size)
    if any(s % p for s, p in zip(size, patch)):
        ok = max(patch[0], size[0] // patch[0] * patch[0])
        raise ConfigError(
            f"--img-size {size[0]} is not a multiple of the patch size {patch[0]} of {name}; use e.g. {ok}"
        )


def _from_file(path: Path, name: str, num_classes: int, kw: dict[str, Any]) -> nn.Module:
    check_weights_source(str(path))
    # timm's own pretrained path: resamples position embeddings, drops a mismatched head,
    # reads .pth/.bin with torch.load(weights_only=True) and .npz with the model's own loader.
    overlay = {"file": str(path), "custom_load": path.suffix == ".npz"}
    try:
        return _create(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes, **kw)
    except (RuntimeError, KeyError, ValueError) as e:
        raise BackboneError(f"--weights {path}: does not fit {name} ({str(e).splitlines()[0][:200]})") from e
    except Exception as e:  # safetensors / pickle readers raise their own types on a damaged file
        raise BackboneError(
            f"--weights {path}: cannot read the file ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "it is damaged or truncated"
        ) from e


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE=1`` (huggingface_hub's own switch): the cache only, and no network call at all."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers at all (a closed network otherwise costs a minute of retries)."""
    if hub_offline():
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_cache_only(enabled: bool) -> Iterator[None]:
    """Make huggingface_hub read its local cache only (as HF_HUB_OFFLINE=1 does), for this call alone."""
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _from_hub(name: str, num_classes: int, kw: dict[str, Any], *, strict: bool) -> tuple[nn.Module, str]:
    try:
        with _hub_cache_only(not hub_reachable()):
            return _create(name, pretrained=True, num_classes=num_classes, **kw), "hub"
    except BackboneError:
        raise
    except Exception as e:  # network / cache errors come in many types (OSError, HF errors, RuntimeError)
        if strict:
            where = "its local cache (HF_HUB_OFFLINE is set)" if hub_offline() else "the hub or its cache"
            raise BackboneError(
                f"cannot load pretrained weights of {name} from {where}: {type(e).__name__}; "
                "pass --weights PATH (or --weights imgfocus for the offline ViT-S/14)"
            ) from e
        log.warning("no pretrained weights for %s reachable (%s): using RANDOM initialisation", name, type(e).__name__)
        return _create(name, pretrained=False, num_classes=num_classes, **kw), "random-init (hub unreachable)"


def create_backbone(
    name: str,
    *,
    weights: str | None = "auto",
    num_classes: int = 0,
    img_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, str]:
    """Build a timm model and load its weights.

    Args:
        name: any timm model name (``vit_base_patch16_224.augreg_in21k``, ``vit_small_patch14_dinov2``, ...), or a
            ``transformers`` one: ``transformers:ORG/NAME`` or ``transformers:PATH`` (:mod:`mimi.backbones.hf`).
        weights: ``auto`` (hub/cache if reachable, else random init with a warning), ``hub`` (hub/cache or
            fail), ``none`` (random init), a registered importer (``imgfocus``), or a path to a
            ``.safetensors`` / ``.pth`` / ``.bin`` / ``.npz`` file.
        num_classes: classes of the new head.
        img_size: input resolution (position embeddings are resampled).
        model_kwargs: extra keyword arguments of ``timm.create_model``.

    Returns:
        ``(model, source)`` where ``source`` says where the weights came from.
    """
    if is_transformers(name):
        return _transformers(name, weights, num_classes, img_size, model_kwargs)
    kw = _kwargs(img_size, model_kwargs)
    w = (weights or "none").strip()
    if w == "none":
        return _create(name, pretrained=False, num_classes=num_classes, **kw), "random-init"
    if w in IMPORTERS:
        return _from_importer(w, name, num_classes, kw), w
    if w in ("auto", "hub"):
        return _from_hub(name, num_classes, kw, strict=w == "hub")
    return _from_file(Path(w).expanduser(), name, num_classes, kw), str(Path(w).expanduser())


def _transformers(
    name: str, weights: str | None, num_classes: int, img_size: int | None, model_kwargs: dict[str, Any] | None
) -> tuple[nn.Module, str]:
    import importlib

    from mimi.backbones.hf import create_transformers_backbone

    if model_kwargs:
        raise ConfigError(f"--model-kwargs are timm's create_model arguments; {name} takes none")
    w = (weights or "none").strip()
    if w in TRANSFORMERS_IMPORTERS:
        fits, target = TRANSFORMERS_IMPORTERS[w]
        if name != fits:
            raise BackboneError(f"--weights {w} holds weights for {fits}, not {name}; pass --model {fits}")
        module, func = target.split(":")
        folder = getattr(importlib.import_module(module), func)()
        # on the meta device (a preflight's architecture check) the folder's config alone, no weights read
        load = "none" if torch.empty(0).device.type == "meta" else "auto"
        model, _ = create_transformers_backbone(
            name, weights=load, num_classes=num_classes, img_size=img_size, folder=folder
        )
        return model, w
    return create_transformers_backbone(name, weights=w, num_classes=num_classes, img_size=img_size)


def architecture_weights(name: str, weights: str | None) -> str:
    """The ``weights`` that build ``name``'s architecture alone (for checks on the meta device): ``none``, except
    for a ``transformers`` model named after an importer's, whose config lives in the importer's folder."""
    if is_transformers(name) and (weights or "").strip() in TRANSFORMERS_IMPORTERS:
        return weights.strip()
    return "none"


def preprocessing(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The backbone's own normalisation (mean, std), as timm resolves it."""
    cfg = resolve_data_config({}, model=model)
    return tuple(cfg["mean"]), tuple(cfg["std"])


def backbone_param_count(model: nn.Module) -> int:
    """Parameters of the bare backbone without its classifier head (call before adding any method)."""
    head = classifier(model)
    head_params = sum(p.numel() for p in head.parameters()) if head is not None else 0
    return sum(p.numel() for p in model.parameters()) - head_params


def model_img_size(model: nn.Module) -> int:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None:
        return int(resolve_data_config({}, model=model)["input_size"][-1])
    return int(size[0] if isinstance(size, tuple | list) else size)
