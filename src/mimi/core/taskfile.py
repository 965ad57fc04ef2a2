"""Tiny per-task checkpoints: only the trained tensors (adapters + head) as safetensors.

The adapter config and per-adapter hidden sizes live in the file's metadata, so a bare backbone of the
same architecture is restored exactly by :func:`load_adapters`.

Quantised files (``dtype=torch.int8`` / ``"int4"``, see :mod:`mimi.core.quant`) carry compact metadata
(:mod:`mimi.core.compact_meta`); :func:`read_metadata` and :func:`load_tensors` expand it back, so every reader
sees the same long entries as in any other file. :func:`byte_breakdown` says where a file's bytes go.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from mimi.core.adapters import AdapterConfig, adapter_config, adapters, add_adapters, freeze_backbone
from mimi.core.compact_meta import FORMAT, compact_metadata, expand_metadata
from mimi.core.errors import CheckpointError, ModelError
from mimi.core.files import atomic_write
from mimi.core.lora import apply_lora_layout, lora_layout
from mimi.core.modules import architecture_of, classifier
from mimi.core.quant import (
    META_KEY,
    SCHEMES,
    dequantize_state,
    layout_names,
    quantize_state,
    stored_bytes,
    unpack,
)
from mimi.core.shrink import apply_plan


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
            file; loading casts back to the model's dtype). ``torch.int8``: every weight matrix (adapters, LoRA,
            the head) as int8 codes with float16 scales (one per class for the head, one per hidden neuron for an
            adapter), biases in float16; ``torch.int4`` (or ``"int4"``): the same with the adapter and LoRA codes
            as int4, two a byte, the head int8 (see :mod:`mimi.core.quant`). Quantised files are dequantised once
            when read, and their metadata is compact (see above). Default: as trained, so logits reload exactly.

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
    bits = quantised_bits(dtype)
    if bits is not None:
        tensors, qmeta = quantize_state(tensors, head=set(head_param_names(model)), bits=bits)
        meta.update(qmeta)
        meta["stored_dtype"] = SCHEMES[qmeta[META_KEY]]
        del meta["trainable"]  # the layout names every trained tensor (see trainable_names)
        meta = compact_metadata(meta)
    elif dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        meta["stored_dtype"] = str(dtype).removeprefix("torch.")
    tensors.update({k: v.detach().contiguous().cpu() for k, v in (extra_tensors or {}).items()})
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def quantised_bits(dtype: object) -> int | None:
    """8 for ``torch.int8``, 4 for ``torch.int4`` or ``"int4"``, None for any other storage dtype."""
    if dtype is None:
        return None
    if dtype == torch.int8 or dtype == "int8":
        return 8
    if dtype == "int4" or dtype == getattr(torch, "int4", "int4"):
        return 4
    return None


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
    meta = expand_metadata(meta, path)
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
    """Every tensor of a safetensors file; quantised ones (``mimi export --dtype int8``) dequantised to float32
    unless ``dequantize`` is False (then as stored, by name: int8 codes, int4 codes as int8, float16 values, and
    every quantised tensor's scales together under ``mimi.core.quant.SCALES``)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: a truncated or damaged safetensors file ({e}); write it again") from e
    meta = expand_metadata(meta, path)
    return dequantize_state(tensors, meta, path) if dequantize else unpack(tensors, meta, path)


def _raw_header(path: Path) -> tuple[int, dict[str, Any]]:
    """The length of a safetensors file's JSON header and the header itself."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return n, json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: a truncated or damaged safetensors file ({e}); write it again") from e


def tensor_bytes(path: str | Path, meta: dict[str, str] | None = None) -> dict[str, int]:
    """Bytes on disk of each trained tensor of a task file, by name: its values, or its codes and scales."""
    path = Path(path)
    meta = meta if meta is not None else read_metadata(path)
    packed = stored_bytes(meta, path)
    if packed:
        return packed
    _, header = _raw_header(path)
    out = {}
    for name in trainable_names(meta, path):
        entry = header.get(name) or {}
        start, end = entry.get("data_offsets", (0, 0))
        out[name] = end - start
        if META_KEY in meta and entry.get("dtype") == "I8" and len(entry.get("shape", ())) == 2:
            out[name] += 2 * entry["shape"][0]  # the first int8 layout: its row scales, in one tensor apart
    return out


def byte_breakdown(path: str | Path) -> dict[str, int]:
    """Where a task file's bytes go: ``adapters`` (every trained tensor but the head's: adapters, LoRA, or other
    method tensors, their scales included), ``head``, ``header`` (the JSON header and its 8-byte length),
    ``other`` (tensors that are not trained ones, e.g. a resumable checkpoint's state; 0 for a task file) and
    ``total``, the file's size, which the other four add up to exactly."""
    path = Path(path)
    meta = read_metadata(path)
    n, _ = _raw_header(path)
    per = tensor_bytes(path, meta)
    head = set(file_head_names(meta, path))
    parts = {
        "adapters": sum(b for name, b in per.items() if name not in head),
        "head": sum(b for name, b in per.items() if name in head),
        "header": 8 + n,
    }
    total = path.stat().st_size
    parts["other"] = total - sum(parts.values())
    parts["total"] = total
    return parts


def file_head_names(meta: dict[str, str], path: str | Path = "the file") -> list[str]:
    """The names of the head's tensors a file records (its ``head`` entry)."""
    try:
        return json.loads(meta.get("head", "[]"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata entry 'head' is not valid JSON ({e.msg})") from e


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
