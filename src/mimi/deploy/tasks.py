"""A task file (written by :func:`mimi.save_adapters` / ``mimi export``) read into its parts, without a model.

A task is what a bank adds to its shared backbone: adapters of their own sizes at named sites, LoRA updates on
named linear layers, and a classifier head. Anything else a file trains (backbone norms, biases, prompts, SSF
scales) would change the shared backbone itself: such tensors are kept apart (``backbone_tensors``) and a bank
accepts the file only if they equal its own backbone's (e.g. a linear probe saved without freezing the backbone).
A method whose trained tensors are neither (FacT-TT's shared factors) is read as the equal LoRA layers, through its
:meth:`~mimi.methods.Method.lora_task`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mimi.backbones import IMPORTERS
from mimi.core.adapters import AdapterConfig
from mimi.core.errors import CheckpointError, ConfigError
from mimi.core.modules import architecture_of
from mimi.core.taskfile import load_tensors, read_metadata, trainable_names
from mimi.methods import get_method, method_traits, servable_methods


@dataclass
class TaskFile:
    """The parts of one task file.

    Attributes:
        path: where it was read from.
        method: training method (recorded by ``mimi train``; inferred from the tensors for older files).
        model: backbone name recorded in the file, if any.
        architecture: timm architecture of the backbone it was trained on, if recorded.
        fingerprint: hash of that backbone's patch-embedding weights, if recorded.
        img_size: input resolution it was trained at, if recorded.
        classes: class names indexed by label, if recorded.
        num_classes: size of the head.
        adapter_config: how its adapters were built (None: no adapters).
        sizes: hidden size of every adapter present (removed adapters are absent).
        lora: per-layer ``{"rank", "alpha"}`` of its LoRA updates (a method's own tensors rewritten as LoRA
            layers where the method defines :meth:`~mimi.methods.Method.lora_task`).
        adapter_tensors: ``<adapter name> -> {"down.weight": ..., "up.weight": ..., ...}``.
        lora_tensors: ``<layer name> -> {"lora_a.weight": ..., "lora_b.weight": ...}``.
        head: ``{"weight": (C, F), "bias": (C,)}``.
        backbone_tensors: other tensors listed as trained, by name (they must equal the serving backbone's).
        file_bytes: size on disk.
        stored_dtype: dtype of the stored tensors.
        adapter_params: parameters of the adapters or LoRA updates (head excluded); for a file read as LoRA
            layers (:meth:`mimi.methods.Method.lora_task`, e.g. FacT-TT), the parameters the file stores.
        head_params: parameters of the head.
        weights_source: where the backbone's weights came from when it was trained (``imgfocus``, ``hub``, a
            file path, ``random-init``...), if recorded.
        model_class: the model class it was trained on (``VisionTransformer``), where recorded (PEFT folders).
        license: licence of the training data, where the data source records one.
    """

    path: Path
    method: str
    model: str | None
    architecture: str | None
    fingerprint: str | None
    img_size: int | None
    classes: list[str] | None
    num_classes: int
    adapter_config: AdapterConfig | None
    sizes: dict[str, int]
    lora: dict[str, dict]
    adapter_tensors: dict[str, dict[str, torch.Tensor]] = field(repr=False)
    lora_tensors: dict[str, dict[str, torch.Tensor]] = field(repr=False)
    head: dict[str, torch.Tensor] = field(repr=False)
    backbone_tensors: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    file_bytes: int = 0
    stored_dtype: str = "float32"
    adapter_params: int = 0
    head_params: int = 0
    weights_source: str | None = None
    model_class: str | None = None
    license: str | None = None

    def __post_init__(self) -> None:
        groups = list(self.adapter_tensors.values()) + list(self.lora_tensors.values())
        self.adapter_params = self.adapter_params or sum(t.numel() for g in groups for t in g.values())
        self.head_params = self.head_params or sum(t.numel() for t in self.head.values())

    def without_tensors(self) -> TaskFile:
        """The same description, tensors dropped (once they live in modules, keeping them would double memory)."""
        return dataclasses.replace(self, adapter_tensors={}, lora_tensors={}, head={}, backbone_tensors={})


def _json(meta: dict[str, str], key: str, default):
    try:
        return json.loads(meta[key]) if key in meta else default
    except json.JSONDecodeError as e:
        raise CheckpointError(f"metadata entry {key!r} is not valid JSON ({e.msg})") from e


def _infer_method(config: AdapterConfig | None, lora: dict) -> str:
    if lora:
        return "lora"
    if config is None:
        return "linear"
    return "adaptformer" if config.placement == "parallel" else "adapter"


def _split(path: Path, tensors: dict[str, torch.Tensor], trainable: list[str], head_names: list[str], sizes, lora):
    """Sort the trained tensors into adapters, LoRA layers and head; refuse anything else."""
    adapter_t: dict[str, dict[str, torch.Tensor]] = {}
    lora_t: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    other: dict[str, torch.Tensor] = {}
    for name in trainable:
        t = tensors[name]
        if name in head_names:
            head[name.rpartition(".")[2]] = t
            continue
        owner = next((a for a in sizes if name.startswith(a + ".")), None)
        if owner is not None:
            adapter_t.setdefault(owner, {})[name[len(owner) + 1 :]] = t
            continue
        layer = next((n for n in lora if name.startswith(n + ".lora_")), None)
        if layer is not None:
            lora_t.setdefault(layer, {})[name[len(layer) + 1 :]] = t
            continue
        other[name] = t
    if set(head) - {"weight", "bias"} or "weight" not in head or head["weight"].ndim != 2:
        raise CheckpointError(f"{path}: no linear classifier head in the file (head tensors {sorted(head)})")
    return adapter_t, lora_t, head, other


def read_task_file(path: str | Path) -> TaskFile:
    """Read and check a task file (or a PEFT LoRA folder); raises :class:`CheckpointError` naming what is wrong."""
    path = Path(path)
    if path.is_dir():
        from mimi.deploy.peft_folder import is_peft_folder, read_peft_folder

        if not is_peft_folder(path):
            raise CheckpointError(
                f"{path}: a folder without adapter_config.json; give a task file (.safetensors) or a PEFT LoRA folder"
            )
        return read_peft_folder(path)
    meta = read_metadata(path)
    try:
        tensors = load_tensors(path)
    except Exception as e:  # safetensors raises several types on a damaged file
        raise CheckpointError(f"{path}: cannot read its tensors ({type(e).__name__}: {e}); export it again") from e
    trainable = trainable_names(meta, path)
    missing = sorted(set(trainable) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: truncated task file, tensors {missing[:3]} are missing; export it again")
    config_d = _json(meta, "adapter_config", None)
    config = AdapterConfig.from_dict(config_d) if config_d is not None else None
    sizes: dict[str, int] = _json(meta, "sizes", {}) if config is not None else {}
    lora: dict[str, dict] = _json(meta, "lora", {})
    if config is not None and config.train_norms:
        raise CheckpointError(f"{path}: the task trains the backbone's norms; a bank serves frozen-backbone tasks only")
    head_names = _json(meta, "head", [])
    method = meta.get("method") or _infer_method(config, lora)
    traits = method_traits(method)
    stored_params = 0
    stored_dtype = next((str(t.dtype).removeprefix("torch.") for t in tensors.values()), "float32")  # as stored
    if traits is not None and traits.servable:  # a method whose tensors a bank serves as LoRA layers (FacT-TT)
        try:
            converted = get_method(method).lora_task(meta, {n: tensors[n] for n in trainable})
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from e
        if converted is not None:
            stored_params = sum(tensors[n].numel() for n in trainable if n not in head_names)
            tensors, lora = converted
            trainable = list(tensors)
    adapter_t, lora_t, head, other = _split(path, tensors, trainable, head_names, sizes, lora)
    if traits is None or not traits.servable:
        why = "is not installed here" if traits is None else "cannot be served by a bank"
        raise CheckpointError(f"{path}: method {method!r} {why}; servable: {', '.join(servable_methods())}")
    img = meta.get("img_size", "")
    return TaskFile(
        path=path,
        method=method,
        model=meta.get("model") or None,
        architecture=meta.get("architecture") or architecture_of(meta.get("model")),
        fingerprint=meta.get("backbone_fingerprint") or None,
        img_size=int(img) if img.isdigit() else None,
        classes=_json(meta, "classes", None),
        num_classes=int(head["weight"].shape[0]),
        adapter_config=config,
        sizes={n: int(h) for n, h in sizes.items()},
        lora=lora,
        adapter_tensors=adapter_t,
        lora_tensors=lora_t,
        head=head,
        backbone_tensors=other,
        file_bytes=path.stat().st_size,
        adapter_params=stored_params,
        stored_dtype=meta.get("stored_dtype", stored_dtype),
        weights_source=meta.get("weights_source") or None,
        license=meta.get("license") or None,
    )


@dataclass(frozen=True)
class RecordedBackbone:
    """The backbone a set of task files was trained on, as they record it: what a bank for them is built from.

    Attributes:
        model: timm model name.
        weights: a weight source that rebuilds those weights here (``imgfocus``, ``hub``, an existing file), or
            ``auto`` where the files do not record one that can be reused (random init, a file no longer there).
        img_size: input resolution, or None where the files do not agree or do not record it.
    """

    model: str
    weights: str
    img_size: int | None


def _reusable(source: str | None) -> bool:
    return bool(source) and (source == "hub" or source in IMPORTERS or Path(source).expanduser().is_file())


def recorded_backbone(files: list[TaskFile]) -> RecordedBackbone:
    """The backbone ``files`` were trained on; raises :class:`ConfigError` unless they all record the same one."""
    if not files:
        raise ConfigError("no task files given")
    unnamed = [str(f.path) for f in files if not f.model]
    if unnamed:
        raise ConfigError(f"{unnamed[0]} does not record its backbone; name it (--backbone MODEL)")
    models = sorted({str(f.model) for f in files})
    if len(models) > 1:
        raise ConfigError(
            f"the task files were trained on different backbones ({', '.join(models)}); serve each backbone's "
            "tasks separately, or name one with --backbone"
        )
    sources = {f.weights_source for f in files}
    source = sources.pop() if len(sources) == 1 else None
    sizes = {f.img_size for f in files}
    size = sizes.pop() if len(sizes) == 1 else None
    return RecordedBackbone(models[0], source if source and _reusable(source) else "auto", size)


def serving_backbone(
    files: list[TaskFile], *, backbone: str | None = None, weights: str | None = None, img_size: int | None = None
) -> RecordedBackbone:
    """The backbone to serve ``files`` on: ``backbone``, ``weights`` and ``img_size`` where given, else what the
    files record (recorded weights and resolution apply only to the backbone they were recorded for)."""
    try:
        rec = recorded_backbone(files)
    except ConfigError:
        if backbone is None:
            raise
        return RecordedBackbone(backbone, weights or "auto", img_size)
    if backbone is not None and backbone != rec.model:  # another backbone: nothing recorded applies
        return RecordedBackbone(backbone, weights or "auto", img_size)
    return RecordedBackbone(rec.model, weights or rec.weights, img_size or rec.img_size)
