"""An adapter bank: one frozen backbone in memory, any number of tasks, mixed-task batches in one pass.

    bank = mimi.AdapterBank("vit_small_patch14_dinov2", weights="imgfocus", img_size=56)
    bank.add("digits", "digits.safetensors")          # MiMi: uneven sizes, some adapters removed
    bank.add("defects", "elpv.safetensors")            # LoRA, AdaptFormer, linear probe, fixed adapters too
    bank.logits(x, ["digits", "defects", "digits"])    # one backbone pass, three 1-d logit tensors

Each task's adapters sit beside the frozen branches they adapt (see :mod:`mimi.deploy.routing`); its head is a
plain ``nn.Linear`` on the backbone's pooled features (``bank.model`` has no classifier of its own).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from mimi.backbones import create_backbone, model_img_size, preprocessing
from mimi.core.adapters import (
    AdaptedBranch,
    Adapter,
    AdapterConfig,
    AdapterSite,
    adapter_sites,
    find_blocks,
    new_adapter,
)
from mimi.core.device import resolve_device
from mimi.core.errors import CheckpointError, ConfigError, DataError, ModelError
from mimi.core.int8_backbone import QuantizedBackbone, check_backbone_dtype, quantize_backbone
from mimi.core.layouts import block_layout
from mimi.core.lora import LoRALinear
from mimi.core.modules import architecture_of
from mimi.core.taskfile import backbone_fingerprint, model_architecture, unit_sizes
from mimi.data.base import normalize, to_uint8
from mimi.deploy.routing import DEFAULT_STRATEGY, BankSite, Router, check_strategy
from mimi.deploy.tasks import TaskFile, read_task_file, serving_backbone
from mimi.methods import servable_methods


def _all_sites(model: nn.Module, placement: str) -> dict[str, AdapterSite]:
    """Every site an adapter of this placement can sit on: each branch, and each linear layer inside one."""
    blocks = find_blocks(model)
    if not blocks:
        raise ModelError(f"{type(model).__name__} has no transformer block with 'attn' and 'mlp'; a bank needs one")
    targets = {"attn", "mlp"}
    for _, block in blocks:
        for role in ("attn", "mlp"):
            branch = block.get_submodule(block_layout(block).branch(role))  # attn, or transformers' attention
            targets |= {f"{role}.{n}" for n, m in branch.named_modules() if n and isinstance(m, nn.Linear)}
    sites = {}
    for target in sorted(targets):
        try:
            sites.update(
                {s.name: s for s in adapter_sites(model, AdapterConfig(placement=placement, targets=(target,)))}
            )
        except ModelError:  # a layer not every block has: no task trained with add_adapters can use it
            continue
    return sites


@dataclass
class _Task:
    key: str  # module-safe key used inside the backbone (task names may hold dots)
    file: TaskFile
    sites: list[str] = field(default_factory=list)  # slot paths holding one of its adapters
    memory_bytes: int = 0


@dataclass
class _Built:
    adapters: dict[str, tuple[str, nn.Module]]  # slot path -> (placement, adapter or LoRA update)
    head: nn.Linear


class AdapterBank:
    """Many tasks on one frozen backbone.

    Args:
        backbone: a timm model name (built as ``mimi train`` builds it, with the same weight sources) or an
            ``nn.Module`` holding no adapters. It is held once, frozen, in eval mode, as ``bank.model``.
        weights: weight source when ``backbone`` is a name (``auto``, ``hub``, ``none``, ``imgfocus``, a file).
        img_size: input resolution when ``backbone`` is a name (position embeddings are resampled).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``...
        mixed: how a batch of several tasks routes rows to adapters: ``padded`` (default: the batch sorted by task,
            each site's adapters in one batched matmul), ``grouped`` (sorted, one small matmul pair per task) or
            ``gather`` (per-site gather / scatter-add); see :mod:`mimi.deploy.routing`. Same logits to 1e-5;
            settable later as ``bank.mixed``.
        backbone_dtype: ``float32`` (default) or ``int8``: the frozen backbone's linear layers quantised once, here
            (int8 weights, activations quantised on the fly; see :mod:`mimi.core.int8_backbone`): about twice the
            images per second on a CPU, at a cost in accuracy that depends on the task (check it with ``mimi eval
            --backbone-dtype int8``). Every task's adapters, LoRA updates and head stay float32 side paths, so
            tasks are added, replaced and removed as on a float32 bank. CPU only.
        int8_engine: which library quantises an ``int8`` backbone (``quantize_dynamic`` or ``torchao``; default:
            the first of :data:`mimi.core.int8_backbone.ENGINES`, chosen by measuring them side by side).

    Raises:
        ConfigError, BackboneError, ModelError: bad arguments, unknown model or weights, a backbone that already
            holds adapters or no transformer blocks.
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        *,
        weights: str | None = "auto",
        img_size: int | None = None,
        device: str = "auto",
        mixed: str = DEFAULT_STRATEGY,
        backbone_dtype: str = "float32",
        int8_engine: str | None = None,
    ) -> None:
        check_strategy(mixed)
        self.device = resolve_device(device)
        # before the backbone is built: a bad flag costs nothing
        check_backbone_dtype(backbone_dtype, self.device, int8_engine)
        if isinstance(backbone, str):
            model, self.weights_source = create_backbone(backbone, weights=weights, img_size=img_size)
            self.name: str | None = backbone
        elif isinstance(backbone, nn.Module):
            if any(isinstance(m, AdaptedBranch | LoRALinear | BankSite) for m in backbone.modules()):
                raise ModelError("the backbone already holds adapters or LoRA; give the bank a bare backbone")
            model, self.weights_source = backbone, "given module"
            self.name = model_architecture(model)
            if img_size is not None and img_size != model_img_size(model):
                raise ConfigError(f"img_size={img_size} but the given module takes {model_img_size(model)} px")
        else:
            raise ConfigError(f"backbone must be a timm model name or an nn.Module, got {type(backbone).__name__}")
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(0)  # the backbone returns pooled features; every task brings its own head
        self.model: nn.Module = model.requires_grad_(False).eval().to(self.device)
        self.dtype = next(model.parameters()).dtype
        self.img_size = model_img_size(model)
        self.mean, self.std = preprocessing(model)
        self._mean_t, self._std_t = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        self.num_features = int(getattr(model, "num_features", 0))
        self.architecture = model_architecture(model) or architecture_of(self.name)
        self.fingerprint = backbone_fingerprint(model)
        self._router = Router(mixed)
        # The bare backbone's structure, recorded before any wrapping: where adapters and LoRA updates can go.
        self._sites = {p: _all_sites(model, p) for p in ("sequential", "parallel")}
        # (in, out) of every linear layer, by name: shapes, not modules (an int8 engine may swap the modules)
        self._linears = {
            n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)
        }
        slots = {s.name.removesuffix(".adapter") for sites in self._sites.values() for s in sites.values()}
        # module objects, not paths: wrapping a branch must not change where a layer inside it is found
        self._parents = {n: model.get_submodule(n.rpartition(".")[0]) for n in set(self._linears) | slots}
        # once, before any task: the sites and linear layers above are recorded as names and shapes, so they hold
        # whether the engine swaps a layer's weight (torchao) or its module (quantize_dynamic)
        self.quantized: QuantizedBackbone = quantize_backbone(model, backbone_dtype, engine=int8_engine)
        self.backbone_dtype = backbone_dtype
        self._frozen = dict(model.named_parameters())  # by their bare names (references, no copies)
        self._site_modules: dict[str, BankSite] = {}
        self._tasks: dict[str, _Task] = {}
        self.heads = nn.ModuleDict()
        self._next_key = 0

    @classmethod
    def from_task_files(
        cls,
        tasks: dict[str, str | Path],
        *,
        backbone: str | None = None,
        weights: str | None = None,
        img_size: int | None = None,
        device: str = "auto",
        backbone_dtype: str = "float32",
        int8_engine: str | None = None,
    ) -> AdapterBank:
        """A bank on the backbone the task files record (model, weight source, resolution), holding them all.

        ``backbone``, ``weights`` and ``img_size`` override what the files record; ``backbone_dtype`` and
        ``int8_engine`` are as for the constructor. Raises :class:`ConfigError` when no backbone is given and the
        files record none or different ones, and what :meth:`add` raises for a bad file.
        """
        files = [read_task_file(p) for p in tasks.values()]
        rec = serving_backbone(files, backbone=backbone, weights=weights, img_size=img_size)
        bank = cls(
            rec.model,
            weights=rec.weights,
            img_size=rec.img_size,
            device=device,
            backbone_dtype=backbone_dtype,
            int8_engine=int8_engine,
        )
        for name, path in tasks.items():
            bank.add(name, path)
        return bank

    # ------------------------------------------------------------------ tasks

    @property
    def tasks(self) -> list[str]:
        """Task names, in insertion order."""
        return list(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, task: object) -> bool:
        return task in self._tasks

    def __repr__(self) -> str:
        dtype = "" if self.backbone_dtype == "float32" else f", {self.backbone_dtype}"
        return f"AdapterBank({self.name or type(self.model).__name__}, {self.img_size}px{dtype}, tasks={self.tasks})"

    def add(self, task: str, path: str | Path, *, replace: bool = False) -> None:
        """Load a task file (``mimi.save_adapters`` / ``mimi export``: float32, float16 or int8) or a PEFT LoRA
        folder (``save_pretrained`` of a LoRA on a timm model, or ``mimi export --peft``) into the bank.

        Everything is checked before anything changes: a file made for another architecture or width raises
        :class:`CheckpointError` naming the mismatch and leaves the bank as it was.

        Raises:
            ConfigError: the name is empty, or already in the bank and ``replace`` is False.
            CheckpointError: the file is missing, damaged, trains the backbone itself, or does not fit it.
        """
        if not isinstance(task, str) or not task:
            raise ConfigError(f"a task name must be a non-empty string, got {task!r}")
        if task in self._tasks and not replace:
            raise ConfigError(f"task {task!r} is already in the bank; pass replace=True or remove it first")
        file = read_task_file(path)
        built = self._build(file)
        if task in self._tasks:
            self.remove(task)
        self._commit(task, file, built)

    def remove(self, task: str) -> None:
        """Drop a task; sites left with no adapter give their branch back to the backbone."""
        entry = self._tasks.pop(self._check_name(task))
        for path in entry.sites:
            site = self._site_modules[path]
            del site.adapters[entry.key], site.modes[entry.key]
            if not site.adapters:
                setattr(self._parents[path], path.rpartition(".")[2], site.branch)
                del self._site_modules[path]
        del self.heads[entry.key]

    def info(self) -> dict[str, dict[str, Any]]:
        """Per task: method, adapter params (head excluded), head params, bytes on disk and in memory, classes,
        class names (or None), per-adapter hidden sizes (or per-layer LoRA ranks), removed adapters, file."""
        out = {}
        for task, entry in self._tasks.items():
            f = entry.file
            cfg = f.adapter_config
            n_sites = sum(s.role in cfg.targets for s in self._sites[cfg.placement].values()) if cfg else 0
            out[task] = {
                "method": f.method,
                "adapter_params": f.adapter_params,
                "head_params": f.head_params,
                "bytes": f.file_bytes,
                "memory_bytes": entry.memory_bytes,
                "stored_dtype": f.stored_dtype,
                "classes": f.num_classes,
                "class_names": f.classes,
                "sizes": unit_sizes(f.sizes, f.lora),
                "removed_adapters": n_sites - len(f.sizes),
                "path": str(f.path),
            }
        return out

    def _check_name(self, task: str) -> str:
        if task not in self._tasks:
            known = ", ".join(self._tasks) or "none yet; add one with bank.add(name, file)"
            raise ConfigError(f"unknown task {task!r}; tasks in the bank: {known}")
        return task

    # ------------------------------------------------------------------ building a task (no change to the bank)

    def _build(self, f: TaskFile) -> _Built:
        mine, theirs = self.architecture, f.architecture
        if f.model_class and f.model_class != type(self.model).__name__:
            raise CheckpointError(
                f"{f.path}: made for a {f.model_class}, but the bank's backbone is a {type(self.model).__name__}: "
                "another architecture; build a bank with that backbone"
            )
        if mine and theirs and mine != theirs:
            raise CheckpointError(
                f"{f.path}: made for {f.model or theirs}, but the bank's backbone is {self.name or mine}: another "
                "architecture; build a bank with that backbone"
            )
        for name, t in f.backbone_tensors.items():
            own = self._frozen.get(name)
            quantized = own is not None and type(own) not in (torch.Tensor, nn.Parameter)  # an int8 weight
            if quantized or own is None or own.shape != t.shape or not torch.equal(own, t.to(own.device, own.dtype)):
                raise CheckpointError(
                    f"{f.path}: the task trained {name!r}, a tensor of the backbone itself; a bank shares one frozen "
                    f"backbone and serves tasks of {', '.join(servable_methods())} (evaluate this one with `mimi eval`)"
                )
        weight = f.head["weight"]
        if weight.shape[1] != self.num_features:
            raise CheckpointError(
                f"{f.path}: its head reads {weight.shape[1]} features but this backbone gives {self.num_features}: "
                "the file was made for another architecture or width"
            )
        with torch.device("meta"):  # modules take the file's tensors as they are: nothing allocated twice
            head = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in f.head)
        self._load(head, f.head, f, "head")
        adapters_ = {}
        if f.adapter_config is not None:
            sites = self._sites[f.adapter_config.placement]
            for name, hidden in f.sizes.items():
                site = sites.get(name)
                if site is None:
                    raise CheckpointError(
                        f"{f.path}: adapter {name!r} has no place in this backbone "
                        f"({type(self.model).__name__}); the file was made for another architecture"
                    )
                tensors = f.adapter_tensors.get(name, {})
                with torch.device("meta"):
                    adapter = new_adapter(site, f.adapter_config, hidden)
                self._load(adapter, tensors, f, name)
                adapter.neuron_ids = torch.arange(hidden, device=self.device)
                adapters_[name.removesuffix(".adapter")] = (f.adapter_config.placement, adapter)
        for layer, spec in f.lora.items():
            shape = self._linears.get(layer)
            if shape is None:
                raise CheckpointError(
                    f"{f.path}: LoRA layer {layer!r} does not exist in this backbone ({type(self.model).__name__}, "
                    f"{len(find_blocks(self.model))} blocks): the file was made for another depth or architecture"
                )
            t = f.lora_tensors.get(layer, {})
            a, b = t.get("lora_a.weight"), t.get("lora_b.weight")
            rank = int(spec["rank"])
            n_in, n_out = shape
            if a is None or b is None or a.shape != (rank, n_in) or b.shape != (n_out, rank):
                raise CheckpointError(
                    f"{f.path}: LoRA tensors of {layer} have shapes {None if a is None else tuple(a.shape)} / "
                    f"{None if b is None else tuple(b.shape)} but this backbone's layer is {n_in} -> "
                    f"{n_out} at rank {rank}: the file was made for another architecture or width"
                )
            alpha = float(spec.get("alpha") or rank)
            # a LoRA update scale * B A x is a parallel adapter of its layer: no activation, no bias, A down, B up
            with torch.device("meta"):
                update = Adapter(n_in, n_out, rank, act="identity", bias=False, scale=alpha / rank)
            self._load(update, {"down.weight": a, "up.weight": b}, f, layer)
            update.neuron_ids = torch.arange(rank, device=self.device)
            adapters_[layer] = ("parallel", update)
        if f.fingerprint and self.fingerprint and f.fingerprint != self.fingerprint:
            warnings.warn(
                f"{f.path} was trained on other weights of {theirs or 'this architecture'} than the bank's "
                f"({self.weights_source}); its predictions will be off",
                stacklevel=3,
            )
        if f.img_size is not None and f.img_size != self.img_size:
            warnings.warn(f"{f.path} was trained at {f.img_size}px, the bank runs at {self.img_size}px", stacklevel=3)
        return _Built(adapters_, head)

    def _load(self, module: nn.Module, tensors: dict[str, torch.Tensor], f: TaskFile, what: str) -> None:
        expected = module.state_dict()
        for k, v in expected.items():
            t = tensors.get(k)
            if t is None or t.shape != v.shape:
                got = None if t is None else tuple(t.shape)
                raise CheckpointError(
                    f"{f.path}: {what}.{k} has shape {got} but this backbone expects {tuple(v.shape)}: "
                    "the file was made for another architecture or width"
                )
        if set(tensors) - set(expected):
            raise CheckpointError(f"{f.path}: {what} holds unexpected tensors {sorted(set(tensors) - set(expected))}")
        module.load_state_dict({k: v.to(self.device, self.dtype) for k, v in tensors.items()}, assign=True)

    def _commit(self, task: str, f: TaskFile, built: _Built) -> None:
        key = f"t{self._next_key}"
        self._next_key += 1
        entry = _Task(key, f)
        for path, (placement, adapter) in built.adapters.items():
            site = self._site_modules.get(path) or self._wrap_site(path)
            site.adapters[key] = adapter
            site.modes[key] = placement
            entry.sites.append(path)
        self.heads[key] = built.head
        modules = [a for _, a in built.adapters.values()] + [built.head]
        entry.memory_bytes = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
        for m in modules:
            m.to(self.device).requires_grad_(False).eval()
        entry.file = f.without_tensors()
        self._tasks[task] = entry

    def _wrap_site(self, path: str) -> BankSite:
        parent, attr = self._parents[path], path.rpartition(".")[2]
        site = BankSite(getattr(parent, attr), self._router).eval()
        setattr(parent, attr, site)
        self._site_modules[path] = site
        return site

    # ------------------------------------------------------------------ inference

    @property
    def mixed(self) -> str:
        """The mixed-batch strategy (``padded``, ``grouped`` or ``gather``; see :mod:`mimi.deploy.routing`)."""
        return self._router.strategy

    @mixed.setter
    def mixed(self, strategy: str) -> None:
        self._router.strategy = check_strategy(strategy)

    def _check_images(self, x: torch.Tensor) -> torch.Tensor:
        s = self.img_size
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(f"images must be a (B, 3, {s}, {s}) tensor with B >= 1, got {got}")
        if tuple(x.shape[2:]) != (s, s):
            raise ConfigError(f"images are {tuple(x.shape[2:])} but the bank's backbone takes {s}x{s}; resize them")
        return x.to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def logits(self, x: torch.Tensor, tasks: str | Sequence[str]) -> torch.Tensor | list[torch.Tensor]:
        """Logits of a batch, the frozen backbone running once whatever the mix of tasks.

        Args:
            x: ``(B, 3, H, W)`` images preprocessed as training does (see :meth:`preprocess`).
            tasks: one task name for the whole batch, or a sequence of ``B`` names (one per image).

        Returns:
            For one name, a ``(B, C_task)`` tensor; for a sequence, a list of ``B`` 1-d tensors (each task has its
            own number of classes).
        """
        x = self._check_images(x)
        batch = x.shape[0]
        if isinstance(tasks, str):
            key = self._tasks[self._check_name(tasks)].key
            return self.heads[key](self._features(x, {key: None}, batch))
        names = list(tasks)
        if len(names) != batch:
            raise ConfigError(f"{len(names)} task names for a batch of {batch} images; give one name per image")
        keys = [self._tasks[self._check_name(t)].key for t in names]
        groups: dict[str, list[int]] = {}  # task key -> its rows, tasks in order of first appearance
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        out: list[torch.Tensor] = [torch.empty(0)] * batch
        if len(groups) == 1 or self._router.strategy == "gather":
            index = {k: torch.tensor(v, device=self.device) for k, v in groups.items()}
            feats = self._features(x, index, batch)  # (B, F): ONE pass of the backbone
            for k, idx in index.items():
                rows = self.heads[k](feats.index_select(0, idx))  # (n_k, C_k)
                for i, row in zip(groups[k], rows):
                    out[i] = row
            return out
        # grouped / padded: permute the rows ONCE so that each task's rows are contiguous; every site and head then
        # works on slices, and the rows go back to the caller's order when the list is built. Tasks in the order
        # they joined the bank (keys are "t<n>", n increasing), so that batches of one set of tasks share one
        # layout, whatever their order and counts: the padded sites' stacked weights are cached per layout.
        groups = dict(sorted(groups.items(), key=lambda kv: int(kv[0][1:])))
        perm = [i for rows in groups.values() for i in rows]
        if perm != list(range(batch)):
            x = x.index_select(0, torch.tensor(perm, device=self.device))  # (B, 3, H, W), sorted by task
        feats = self._features(x, {k: len(v) for k, v in groups.items()}, batch)  # (B, F): ONE backbone pass
        start = 0
        for k, rows_of_k in groups.items():
            n = len(rows_of_k)
            rows = self.heads[k](feats[start : start + n])  # (n_k, C_k)
            start += n
            for i, row in zip(rows_of_k, rows):
                out[i] = row
        return out

    def _features(self, x: torch.Tensor, index: dict[str, torch.Tensor | int | None], batch: int) -> torch.Tensor:
        """The backbone's pooled features ``(B, F)``, the router set for the pass.

        ``index``: task key -> None (one task, every row), its row indices (``gather``), or its number of rows
        when the batch is sorted by task (``grouped`` / ``padded``: the counts in row order).
        """
        if len(index) == 1:
            self._router.set_single(next(iter(index)), batch)  # every row one task: no gather / scatter
        elif all(isinstance(v, int) for v in index.values()):
            self._router.set_spans(index, batch)
        else:
            self._router.set_groups(index, batch)
        try:
            return self.model(x)
        finally:
            self._router.clear()

    def preprocess(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """PIL images or image files -> ``(B, 3, H, W)``: RGB, bicubic resize, the backbone's mean/std (as training)."""
        return self.normalize(self.pixels(images))

    def pixels(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """PIL images or image files -> uint8 ``(B, 3, H, W)``: RGB, bicubic resize; :meth:`normalize` finishes them.

        A server decodes each request's image with this and normalises the whole batch at once: the same values as
        :meth:`preprocess`, bit for bit, in one tensor operation instead of one per image.
        """
        out = []
        for img in images:
            if isinstance(img, Image.Image):
                out.append(to_uint8(img, self.img_size))
                continue
            try:
                with Image.open(img) as opened:
                    out.append(to_uint8(opened, self.img_size))
            except (OSError, ValueError, Image.DecompressionBombError) as e:  # PIL's pixel limit is kept
                raise DataError(f"cannot read image {img}: {e}") from e
        return torch.stack(out)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``(..., 3, H, W)`` from :meth:`pixels` -> float32, the backbone's mean and std (as training)."""
        if pixels.dtype != torch.uint8:
            raise ConfigError(f"normalize takes uint8 pixels (AdapterBank.pixels), got {pixels.dtype}")
        return normalize(pixels, self._mean_t, self._std_t)

    def stack(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Requests' ``(3, H, W)`` images -> one batch; uint8 pixels are normalised together, in one operation."""
        if all(x.dtype == torch.uint8 for x in images):
            return self.normalize(torch.stack(list(images)))
        return torch.stack([self.normalize(x) if x.dtype == torch.uint8 else x for x in images])

    def predict(
        self,
        images: Sequence[Image.Image | str | Path] | Image.Image | str | Path,
        tasks: str | Sequence[str],
        topk: int = 1,
        *,
        batch_size: int = 64,
    ) -> list[dict[str, Any]]:
        """Top-k classes of images (PIL or files), one task for all or one task per image (mixed batches).

        Returns:
            One dict per image: ``task``, ``ids`` (top-k class ids), ``names`` (class names, or None when the task
            file records none), ``probs`` (softmax probabilities), and ``image`` when a path was given.
        """
        if isinstance(images, Image.Image | str | Path):
            images = [images]
        images = list(images)
        per_image = [tasks] * len(images) if isinstance(tasks, str) else list(tasks)
        if len(per_image) != len(images):
            raise ConfigError(f"{len(per_image)} task names for {len(images)} images; give one name per image")
        if not isinstance(topk, int) or topk < 1:
            raise ConfigError(f"topk must be a positive integer, got {topk!r}")
        for t in set(per_image):
            self._check_name(t)
        results = []
        for start in range(0, len(images), batch_size):
            chunk, names = images[start : start + batch_size], per_image[start : start + batch_size]
            x = self.preprocess(chunk)
            single = len(set(names)) == 1
            logits = self.logits(x, names[0]) if single else self.logits(x, names)
            for img, task, row in zip(chunk, names, logits):
                results.append(self.decode(task, row, topk, None if isinstance(img, Image.Image) else str(img)))
        return results

    def decode(self, task: str, row: torch.Tensor, topk: int = 1, image: str | None = None) -> dict[str, Any]:
        """One image's logits for ``task`` -> its top-k ``ids``, class ``names`` (or None) and ``probs``."""
        probs = row.float().softmax(-1)
        p, ids = probs.topk(min(topk, probs.numel()))
        classes = self._tasks[task].file.classes
        out = {
            "task": task,
            "ids": ids.tolist(),
            "names": [classes[i] for i in ids.tolist()] if classes else None,
            "probs": p.tolist(),
        }
        if image is not None:
            out = {"image": image, **out}
        return out
