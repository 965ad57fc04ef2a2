"""Tiny per-task checkpoints: only the trained tensors (adapters + head) as safetensors.

The adapter config and per-adapter hidden sizes live in the file's metadata, so a bare backbone of the
same architecture is restored exactly by :func:`load_adapters`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from mimi.core.adapters import AdapterConfig, adapter_config, adapters, add_adapters, freeze_backbone
from mimi.core.errors import CheckpointError, ModelError
from mimi.core.files import atomic_write
from mimi.core.lora import apply_lora_layout, lora_layout
from mimi.core.modules import architecture_of, classifier
from mimi.core.quant import dequantize_state, layout_names, quantize_state, unpack
from mimi.core.shrink import apply_plan

FORMAT = "mimi-adapters/1"


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a task owns: every trainable parameter (adapters, head, trained norms)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def head_param_names(model: nn.Module) -> list[str]:
    """Full names (as in ``model.named_parameters()``) of the trainable classifier-head parameters."""
    head = classifier(model)
    if head is None:
        return []
    ids = {id(p) for p in head.parameters() if p.requires_grad}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def save_adapters(
    model: nn.Module,
    path: str | Path,
    *,
    metadata: dict[str, str] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the trained tensors of ``model`` (never the frozen backbone) as a safetensors file.

    Args:
        model: a model adapted with :func:`mimi.add_adapters` (or with only its head trained).
        path: destination ``.safetensors`` file (written atomically).
        metadata: extra string entries to store (e.g. the backbone name).
        extra_tensors: more tensors to store under their own names (e.g. optimizer state of a resumable
            checkpoint); they must not clash with parameter names and are ignored by :func:`load_adapters`.
        dtype: store the trained floating-point tensors in this dtype (e.g. ``torch.float16`` halves the
            file; loading casts back to the model's dtype). ``torch.int8``: adapter and LoRA weights as int8 with a
            float16 scale per output channel, biases and head in float16 (see :mod:`mimi.core.quant`); dequantised
            once when read. Default: as trained, so logits reload exactly.

    Returns:
        The path written.
    """
    config = adapter_config(model)
    meta = {
        "format": FORMAT,
        "adapter_config": json.dumps(config.to_dict() if config else None),
        "sizes": json.dumps({n: a.hidden_dim for n, a in adapters(model)}),
        "num_classes": str(getattr(model, "num_classes", "")),
        "trainable": json.dumps(sorted(trained_state(model))),
        "head": json.dumps(head_param_names(model)),
    }
    arch = model_architecture(model)
    if arch:
        meta["architecture"] = arch  # lets a bank refuse a task made for another backbone even when shapes agree
    fp = backbone_fingerprint(model)
    if fp:
        meta["backbone_fingerprint"] = fp
    layout = lora_layout(model)
    if layout:
        meta["lora"] = json.dumps(layout)  # per-layer rank and alpha: uneven ranks reload from the file alone
    meta.update(metadata or {})
    tensors = trained_state(model)
    if dtype == torch.int8:
        tensors, qmeta = quantize_state(tensors, keep_float=set(head_param_names(model)))
        meta.update(qmeta)
        meta["stored_dtype"] = "int8"
        del meta["trainable"]  # the layout names every trained tensor (see trainable_names)
    elif dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        meta["stored_dtype"] = str(dtype).removeprefix("torch.")
    tensors.update({k: v.detach().contiguous().cpu() for k, v in (extra_tensors or {}).items()})
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def model_architecture(model: nn.Module) -> str | None:
    """The timm architecture a model was built as (``vit_small_patch14_dinov2``), when timm recorded it."""
    cfg = getattr(model, "pretrained_cfg", None)
    return cfg.get("architecture") if isinstance(cfg, dict) else None


def backbone_fingerprint(model: nn.Module) -> str | None:
    """A short hash of the frozen patch-embedding weights: tells which pretrained weights a task was trained on."""
    import hashlib

    pe = getattr(model, "patch_embed", None)
    weight = getattr(getattr(pe, "proj", None), "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    data = weight.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a checkpoint written by :func:`save_adapters`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a mimi adapter checkpoint (format {meta.get('format')!r}, expected {FORMAT})"
        )
    return meta


def unit_sizes(sizes: dict[str, int], lora: dict[str, dict]) -> dict[str, int]:
    """What a task's size map shows: the rank of each LoRA layer where the file holds LoRA layers (``lora``
    metadata), else the hidden size of each adapter present (``sizes``; a removed adapter is absent)."""
    if lora:
        return {name: int(spec["rank"]) for name, spec in lora.items()}
    return {name: int(h) for name, h in sizes.items()}


def check_architecture(model: nn.Module, meta: dict[str, str], path: str | Path) -> None:
    """Refuse a file recorded as made for another timm architecture than ``model`` (when both are known)."""
    theirs = meta.get("architecture") or architecture_of(meta.get("model"))
    mine = model_architecture(model)
    if theirs and mine and theirs != mine:
        raise CheckpointError(
            f"{path}: made for {meta.get('model') or theirs}, not for {mine}; use the backbone it was trained with"
        )


def load_tensors(path: str | Path, *, dequantize: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; int8 ones (``mimi export --dtype int8``) dequantised to float32 unless
    ``dequantize`` is False (then as stored, their scales included)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: a truncated or damaged safetensors file ({e}); write it again") from e
    return dequantize_state(tensors, meta, path) if dequantize else unpack(tensors, meta, path)


def trainable_names(meta: dict[str, str], path: str | Path = "the file") -> list[str]:
    """The trained tensors a file holds: its ``trainable`` entry, or an int8 file's packed layout."""
    try:
        return json.loads(meta["trainable"]) if "trainable" in meta else layout_names(meta)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata entry 'trainable' is not valid JSON ({e.msg})") from e


def load_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Restore an adapted model from a bare backbone and a file written by :func:`save_adapters`.

    The backbone must be the same architecture (and pretrained weights) as the one trained. Adapters
    are inserted with the saved config, shrunk to the saved sizes (absent ones removed), LoRA layers
    are wrapped with their saved ranks, the head is resized to the saved number of classes, and the
    saved tensors are loaded strictly.

    Returns:
        The same model, modified in place.
    """
    meta = read_metadata(path)
    check_architecture(model, meta, path)
    tensors = load_tensors(path)
    config_d = json.loads(meta["adapter_config"])
    sizes: dict[str, int] = json.loads(meta["sizes"])
    num_classes = int(meta["num_classes"]) if meta.get("num_classes", "").isdigit() else None
    if num_classes is not None and getattr(model, "num_classes", num_classes) != num_classes:
        model.reset_classifier(num_classes)
    if config_d is not None:
        if adapters(model):
            raise CheckpointError("load_adapters expects a bare backbone, but the model already holds adapters")
        add_adapters(model, AdapterConfig.from_dict(config_d))
        present = {n for n, _ in adapters(model)}
        if not set(sizes) <= present:
            raise CheckpointError(f"{path}: adapters {sorted(set(sizes) - present)[:3]} do not exist in this backbone")
        apply_plan(model, {n: list(range(h)) for n, h in sizes.items()})
    elif "lora" in meta:
        try:
            apply_lora_layout(model, json.loads(meta["lora"]))
        except ModelError as e:
            raise CheckpointError(f"{path}: {e} (the file was made for another architecture?)") from e
    else:
        freeze_backbone(model)
    return restore_trained(model, path, meta=meta, tensors=tensors)


def restore_trained(
    model: nn.Module,
    path: str | Path,
    *,
    meta: dict[str, str] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Copy the saved trainable tensors into a model that already has the right structure and sizes.

    Parameters listed as trainable in the file become trainable, every other one is frozen.
    """
    meta = meta if meta is not None else read_metadata(path)
    check_architecture(model, meta, path)
    tensors = tensors if tensors is not None else load_tensors(path)
    expected = set(trainable_names(meta, path))
    params = dict(model.named_parameters())
    if expected - set(tensors):
        raise CheckpointError(
            f"{path}: truncated checkpoint, tensors {sorted(expected - set(tensors))[:3]} are missing"
        )
    missing = expected - set(params)
    if missing:
        raise CheckpointError(
            f"{path}: tensors {sorted(missing)[:3]} have no place in this model (other architecture?)"
        )
    with torch.no_grad():
        for name in sorted(expected):
            p, t = params[name], tensors[name]
            if p.shape != t.shape:
                raise CheckpointError(
                    f"{path}: {name} has shape {tuple(t.shape)} but the model expects {tuple(p.shape)}; "
                    "use the backbone (and --img-size) the checkpoint was trained with"
                )
            p.copy_(t.to(dtype=p.dtype, device=p.device))
    for name, p in params.items():
        p.requires_grad_(name in expected)
    return model
