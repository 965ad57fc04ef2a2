"""PEFT's LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``), written and read without PEFT.

Out: :func:`lora_parts` reads the LoRA updates and the head of a model trained with ``lora`` (:class:`LoRALinear`),
``mimi-lora`` (linear adapters: parallel, no activation, no bias, on an ``nn.Linear``) or ``peft-lora`` (a
``PeftModel``); :func:`write_peft_folder` writes them as PEFT does: one entry of ``target_modules`` per adapted layer
(layers pruned to rank 0 left out), ``rank_pattern`` / ``alpha_pattern`` where ranks or scales differ, the head in
``modules_to_save``, tensors named ``base_model.model.<layer>.lora_A.weight``. ``PeftModel.from_pretrained`` then
rebuilds the same function on a timm model holding the same backbone weights.

In: :func:`read_peft_folder` turns such a folder (written by mimi or by PEFT's ``save_pretrained``) into a
:class:`~mimi.deploy.tasks.TaskFile`, so a bank serves it like any task file. PEFT's scaling is matched exactly:
``lora_alpha / r`` per layer (``alpha_pattern`` and ``rank_pattern`` matched as PEFT matches them), or
``lora_alpha / sqrt(r)`` with ``use_rslora``; dropout does nothing at inference. Features mimi cannot serve (DoRA,
LoRA biases, trained backbone biases, extra ``modules_to_save``) are refused by name.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mimi.core.adapters import AdaptedBranch
from mimi.core.errors import CheckpointError, ConfigError
from mimi.core.files import atomic_write_dir
from mimi.core.lora import LoRALinear
from mimi.core.modules import architecture_of, classifier, is_transformers
from mimi.core.taskfile import load_tensors
from mimi.deploy.tasks import TaskFile

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
LABELS = "labels.json"
CARD = "README.md"
PREFIX = "base_model.model."  # PEFT's name of the wrapped model in its state dict
META_KEY = "mimi_task"  # safetensors metadata entry: what mimi records about the task (backbone, data, classes)
ADAPTER = "default"

# PEFT LoraConfig fields whose non-default values change what the folder computes in ways mimi does not serve.
_REFUSED = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "fan_in_fan_out": (False, None),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_qalora": (False, None),
}


@dataclass
class LoRAParts:
    """What a LoRA task holds: per layer ``(A (r, in), B (out, r), scale)``, and the head.

    Attributes:
        layers: ``<layer name> -> (A, B, scale)``, in model order; the update is ``scale * B @ A``.
        head_name: the head's module name in the timm model (``head``; ``head.fc`` on Swin).
        head: ``{"weight": (C, F), "bias": (C,)}``.
    """

    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    head_name: str
    head: dict[str, torch.Tensor] = field(repr=False)


def _not_lora(what: str) -> ConfigError:
    return ConfigError(
        f"{what}: PEFT's LoRA format cannot express it; export a task file (--out FILE.safetensors) or the whole "
        "model as ONNX (--onnx FILE.onnx) instead"
    )


def _linear_adapter(w: AdaptedBranch) -> bool:
    a = w.adapter
    return (
        w.placement == "parallel"
        and isinstance(a.act, nn.Identity)
        and a.down.bias is None
        and a.up.bias is None
        and isinstance(w.branch, nn.Linear)
    )


def _head(model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    head = classifier(model)
    name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    if not isinstance(head, nn.Linear) or name is None:
        raise ConfigError(f"{type(model).__name__} has no linear classifier head to put in modules_to_save")
    out = {"weight": head.weight.detach().cpu().float().contiguous()}
    if head.bias is not None:
        out["bias"] = head.bias.detach().cpu().float().contiguous()
    return name, out


def _peft_parts(model: nn.Module) -> LoRAParts:
    import peft

    inner = model.base_model.model
    layers, heads = {}, []
    for name, m in inner.named_modules():
        if isinstance(m, peft.utils.ModulesToSaveWrapper):
            heads.append((name, m.modules_to_save[ADAPTER]))
        elif isinstance(m, peft.tuners.lora.LoraLayer) and ADAPTER in m.lora_A:
            if m.use_dora.get(ADAPTER) or not isinstance(m.get_base_layer(), nn.Linear):
                raise _not_lora(f"{name} (DoRA, or LoRA on a layer that is not nn.Linear)")
            a, b = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
            layers[name] = (a.detach().cpu().float(), b.detach().cpu().float(), float(m.scaling[ADAPTER]))
        elif isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer):
            raise _not_lora(f"{name} is a {type(m).__name__}")
    if len(heads) != 1 or not isinstance(heads[0][1], nn.Linear):
        raise ConfigError(f"the PEFT model saves {[n for n, _ in heads]}; expected its linear classifier head alone")
    name, head = heads[0]
    t = {"weight": head.weight.detach().cpu().float()}
    if head.bias is not None:
        t["bias"] = head.bias.detach().cpu().float()
    return LoRAParts(layers, name, t)


def lora_parts(model: nn.Module, *, method: str = "this method") -> LoRAParts:
    """The LoRA updates and head of a ``lora``, ``mimi-lora`` or ``peft-lora`` model.

    Raises:
        ConfigError: one line naming ``--onnx`` and the task file, for a model PEFT's LoRA cannot express
            (bottleneck adapters, AdaptFormer, prompts, SSF, trained norms or biases) or one without LoRA layers.
    """
    if hasattr(model, "peft_config"):
        parts = _peft_parts(model)
    else:
        layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for name, m in model.named_modules():
            if isinstance(m, LoRALinear):
                layers[name] = (
                    m.lora_a.weight.detach().cpu().float(),
                    m.lora_b.weight.detach().cpu().float(),
                    m.scaling,
                )
            elif isinstance(m, AdaptedBranch):
                if not _linear_adapter(m) or m.config.train_norms:
                    raise _not_lora(f"{method} (adapters on {name}: bottleneck adapters or AdaptFormer)")
                a = m.adapter
                layers[name] = (a.down.weight.detach().cpu().float(), a.up.weight.detach().cpu().float(), a.scale)
        head_name, head = _head(model)
        owned = {f"{n}.lora_a.weight" for n in layers} | {f"{n}.lora_b.weight" for n in layers}
        owned |= {f"{n}.adapter.down.weight" for n in layers} | {f"{n}.adapter.up.weight" for n in layers}
        owned |= {f"{head_name}.{k}" for k in head}
        other = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in owned)
        if other:
            raise _not_lora(f"{method} also trains {other[:3]}")
        parts = LoRAParts(layers, head_name, head)
    if not parts.layers:
        raise _not_lora(f"{method} holds no LoRA layer (all pruned, or a head-only run)")
    return parts


#: The name of the ``transformers`` model inside mimi's wrapper of it (``mimi.backbones.hf.TransformersBackbone``).
TRANSFORMERS_INNER = "model."


def for_transformers(parts: LoRAParts) -> LoRAParts:
    """``parts`` of a model on a ``transformers`` backbone, named as the ``transformers`` model itself names its
    layers (``layers.0.attention.q_proj``), so that ``PeftModel.from_pretrained`` opens the folder on it. The head
    is not part of that model: it stays in the folder (``base_model.model.head.*``), which PEFT leaves aside."""
    layers = {n.removeprefix(TRANSFORMERS_INNER): t for n, t in parts.layers.items()}
    return LoRAParts(layers, parts.head_name, parts.head)


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def peft_config(parts: LoRAParts, *, base_model: str | None) -> dict[str, Any]:
    """``adapter_config.json``: the most common rank and alpha as ``r`` / ``lora_alpha``, the others in patterns."""
    ranks = {n: int(a.shape[0]) for n, (a, _, _) in parts.layers.items()}
    alphas = {n: _number(s * ranks[n]) for n, (_, _, s) in parts.layers.items()}  # PEFT scales by lora_alpha / r
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha},
        "target_modules": list(parts.layers),
        "modules_to_save": [parts.head_name],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def write_peft_folder(
    parts: LoRAParts,
    folder: str | Path,
    *,
    base_model: str | None = None,
    task: dict[str, Any] | None = None,
    classes: list[str] | None = None,
    card: str | Callable[[dict[str, int]], str] | None = None,
) -> Path:
    """Write a PEFT LoRA folder atomically (a temporary folder renamed into place).

    Args:
        parts: from :func:`lora_parts`.
        folder: destination; an existing folder is replaced only if it is a PEFT folder (or empty).
        base_model: ``base_model_name_or_path`` (e.g. ``timm/vit_small_patch14_dinov2.lvd142m``).
        task: what mimi records about the task (backbone, resolution, data...), kept in the safetensors metadata
            (PEFT ignores it; a bank reads it).
        classes: class names, written as ``labels.json``.
        card: a model card, written as ``README.md``; or a function of the other files' bytes returning it.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not is_peft_folder(folder))):
        raise ConfigError(f"--peft {folder}: exists and is not a PEFT folder; pick a new folder")
    tensors = {}
    for name, (a, b, _) in parts.layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
    for k, t in parts.head.items():
        tensors[f"{PREFIX}{parts.head_name}.{k}"] = t.contiguous()
    meta = {"format": "pt"}
    if task:
        meta[META_KEY] = json.dumps(task)
    config = peft_config(parts, base_model=base_model)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata=meta)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if classes:
            (tmp / LABELS).write_text(json.dumps(list(classes), indent=1) + "\n")
        if card:
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            (tmp / CARD).write_text(card(files) if callable(card) else card)

    return atomic_write_dir(folder, write)


# ---------------------------------------------------------------------------------------------- reading


def is_peft_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding PEFT's ``adapter_config.json``."""
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """The value PEFT takes for layer ``name`` from a ``rank_pattern`` / ``alpha_pattern`` (PEFT's
    ``get_pattern_key``: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / CONFIG}: not readable JSON ({e}); save the adapter again") from e
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        got = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise CheckpointError(f"{folder}: a PEFT {got} adapter; mimi serves PEFT LoRA folders (peft_type LORA) only")
    for key, fine in _REFUSED.items():
        if cfg.get(key, fine[0]) not in fine:
            raise CheckpointError(
                f"{folder}: {key}={cfg[key]!r} in {CONFIG}; mimi serves plain LoRA (retrain without {key})"
            )
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), int | float) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise CheckpointError(f"{folder / CONFIG}: {key} must be a positive number, got {cfg.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise CheckpointError(f"{folder / CONFIG}: {key} must be a mapping, got {cfg[key]!r}")
    return cfg


def _read_labels(folder: Path, num_classes: int) -> list[str] | None:
    path = folder / LABELS
    if not path.is_file():
        return None
    try:
        labels = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e}); write a list of class names") from e
    if isinstance(labels, dict):  # {"0": "cat", ...}, as in a Hugging Face id2label
        try:
            labels = [labels[str(i)] for i in range(num_classes)]
        except KeyError as e:
            raise CheckpointError(f"{path}: no name for class {e}; name classes 0..{num_classes - 1}") from e
    if not isinstance(labels, list) or len(labels) != num_classes or not all(isinstance(s, str) for s in labels):
        raise CheckpointError(f"{path}: expected a list of {num_classes} class names (the head's classes)")
    return labels


def _split(folder: Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]):
    """LoRA factors by layer and the head tensors; anything else refused by name."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        if m:
            lora.setdefault(m.group(1), {})[f"lora_{m.group(2).lower()}.weight"] = t
            continue
        module, _, attr = name.rpartition(".")
        other.setdefault(module, {})[attr] = t
    saved = [str(s) for s in cfg.get("modules_to_save") or []]
    heads = {m: t for m, t in other.items() if any(m == s or m.endswith("." + s) for s in saved)}
    rest = sorted(set(other) - set(heads))
    if rest:
        raise CheckpointError(
            f"{folder}: tensors of {rest[:3]} besides LoRA and the head (LoRA biases, DoRA, or trained backbone "
            "modules); a bank shares one frozen backbone and serves LoRA + head only"
        )
    if len(heads) != 1:
        raise CheckpointError(
            f"{folder}: {'no' if not heads else len(heads)} classifier head in modules_to_save ({saved}); train the "
            "LoRA with modules_to_save=[<the head>] so that the folder holds its head"
        )
    ((head_name, head),) = heads.items()
    if set(head) - {"weight", "bias"} or "weight" not in head or head["weight"].ndim != 2:
        raise CheckpointError(f"{folder}: {head_name} is not a linear classifier head (tensors {sorted(head)})")
    return lora, head_name, head


def _layout(folder: Path, lora: dict[str, dict[str, torch.Tensor]], cfg: dict[str, Any]) -> dict[str, dict]:
    """Per-layer ``{"rank", "alpha"}`` such that ``alpha / rank`` is PEFT's scaling of that layer."""
    out = {}
    for layer, t in lora.items():
        a, b = t.get("lora_a.weight"), t.get("lora_b.weight")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{folder}: LoRA of {layer} is not a pair of linear factors A (r, in), B (out, r) (shapes "
                f"{None if a is None else tuple(a.shape)} / {None if b is None else tuple(b.shape)}); mimi serves "
                "LoRA on nn.Linear layers only"
            )
        rank = int(pattern_value(cfg.get("rank_pattern") or {}, layer, cfg["r"]))
        if rank != a.shape[0]:
            raise CheckpointError(f"{folder}: {layer} has rank {a.shape[0]} but {CONFIG} says {rank}")
        alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, layer, cfg["lora_alpha"]))
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        out[layer] = {"rank": rank, "alpha": scale * rank}
    return out


def _model_name(base: Any) -> str | None:
    """A timm model name from ``base_model_name_or_path`` (``timm/vit_small_patch14_dinov2.lvd142m``)."""
    if not isinstance(base, str) or not base:
        return None
    return base.removeprefix("hf-hub:").removeprefix("timm/")


def read_peft_folder(path: str | Path) -> TaskFile:
    """A PEFT LoRA folder as a :class:`TaskFile` (LoRA layers and head), checked; raises :class:`CheckpointError`."""
    folder = Path(path)
    if not is_peft_folder(folder):
        raise CheckpointError(f"{folder}: not a PEFT folder (no {CONFIG})")
    cfg = _read_config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise CheckpointError(
            f"{folder}: no {WEIGHTS}"
            + (
                "; adapter_model.bin is a pickle, which mimi never loads: save with safe_serialization=True"
                if pickled
                else ""
            )
        )
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e}); save the adapter again") from e
    tensors = load_tensors(weights)
    lora, head_name, head = _split(folder, tensors, cfg)
    layout = _layout(folder, lora, cfg)
    try:
        task = json.loads(meta.get(META_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{weights}: metadata entry {META_KEY!r} is not valid JSON ({e.msg})") from e
    num_classes = int(head["weight"].shape[0])
    model = task.get("model") or _model_name(cfg.get("base_model_name_or_path"))
    if is_transformers(model):  # layers named as in the transformers model: mimi wraps it
        lora = {n if n.startswith(TRANSFORMERS_INNER) else TRANSFORMERS_INNER + n: t for n, t in lora.items()}
        layout = {n if n.startswith(TRANSFORMERS_INNER) else TRANSFORMERS_INNER + n: t for n, t in layout.items()}
    img = str(task.get("img_size", ""))
    auto = cfg.get("auto_mapping") or {}
    return TaskFile(
        path=folder,
        method=task.get("method") or "peft-lora",
        model=model,
        architecture=task.get("architecture") or architecture_of(model),
        fingerprint=task.get("backbone_fingerprint") or None,
        img_size=int(img) if img.isdigit() else None,
        classes=_read_labels(folder, num_classes) or task.get("classes"),
        num_classes=num_classes,
        adapter_config=None,
        sizes={},
        lora=layout,
        adapter_tensors={},
        lora_tensors=lora,
        head=head,
        file_bytes=sum(p.stat().st_size for p in (folder / CONFIG, weights)),
        stored_dtype=str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        weights_source=task.get("weights_source") or None,
        model_class=auto.get("base_model_class") if isinstance(auto, dict) else None,
        license=task.get("license"),
    )
