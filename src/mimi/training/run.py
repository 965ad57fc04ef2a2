"""Building a run: the checks that need no weights (preflight), then backbone + data + method as live objects."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimi.backbones import (
    architecture_weights,
    backbone_param_count,
    check_img_size,
    check_weights_source,
    create_backbone,
    model_img_size,
    preprocessing,
)
from mimi.config import TrainConfig, budget_list
from mimi.core.adapters import adapter_param_count, adapter_roles, adapters
from mimi.core.device import autocast_dtype, resolve_device
from mimi.core.errors import ConfigError
from mimi.core.modules import classifier
from mimi.core.scores import check_score
from mimi.core.shrink import apply_plan
from mimi.data import TaskData, build_task
from mimi.methods import Method, get_method, parameter_budgets
from mimi.training.distill import check_teacher


@dataclass
class Run:
    """Everything built for one run: the live objects the loop works on."""

    cfg: TrainConfig
    model: nn.Module
    task: TaskData
    method: Method
    device: torch.device
    amp_dtype: torch.dtype | None
    backbone_params: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def task_metadata(run: Run) -> dict[str, str]:
    """What a task file records beside its tensors, so that it can be served without the run folder."""
    meta = {
        "method": run.cfg.method,
        "model": run.cfg.model,
        "weights_source": str(run.info.get("weights_source", "")),
        "img_size": str(run.info.get("img_size", "")),
        "data": run.task.name,
    }
    if run.task.classes:
        meta["classes"] = json.dumps(list(run.task.classes))
    distill = run.cfg.distill_options()
    if distill is not None:  # teacher None: the run's own model at the end of cycle 0
        meta["distill"] = json.dumps(distill.to_dict())
    if run.task.license:
        meta["license"] = run.task.license
    meta.update(run.method.task_metadata(run.model))  # what the method needs to serve its file (FacT: its scale)
    return meta


def steps_per_epoch(cfg: TrainConfig, task: TaskData) -> int:
    return math.ceil(len(task.train) / cfg.batch_size)


def cycle_epochs(cfg: TrainConfig, cycle: int) -> int:
    return cfg.first_epochs if cycle == 0 and cfg.first_epochs is not None else cfg.epochs


def preflight(cfg: TrainConfig) -> None:
    """Every check that needs no weights and no decoded image, so that bad input fails in seconds, writing nothing.

    Names (method, score, model, dataset, weights source), flags that depend on the model (image size against the
    patch size; a pruning budget against the adapters at insertion and the cheapest neuron), the data listing
    (split files, image files, labels, paths), a ``--distill`` teacher (backbone, classes) and whether the output
    folder can be created.
    """
    if not cfg.data:
        raise ConfigError("no dataset given: pass --data (e.g. vtab1k:TASK with --data-root DIR)")
    method = get_method(cfg.method)
    check_score(cfg.score)
    check_weights_source(cfg.weights)
    with torch.device("meta"):  # the architecture alone: no memory, no weights
        weights = architecture_weights(cfg.model, cfg.weights)
        model, _ = create_backbone(cfg.model, weights=weights, img_size=cfg.img_size, model_kwargs=cfg.model_kwargs)
    check_img_size(model, cfg.model)
    task = build_task(
        cfg.data,
        root=cfg.data_root,
        img_size=model_img_size(model),
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        trainval=cfg.trainval,
        check_only=True,
    )
    method.options_from(cfg)  # --method-kwargs and the flags the method reads, refused here for every method
    if not method.traits.prunes and len(budget_list(cfg.budget_params) + budget_list(cfg.budget_dim)) > 1:
        raise ConfigError(
            f"method {cfg.method} trains one model: give it one budget (several budgets are for a pruning method, "
            "which keeps a task at each)"
        )
    check_teacher(cfg, task.num_classes)  # --distill: a teacher there is, on this backbone, with these classes
    if method.traits.prunes:
        model.reset_classifier(task.num_classes)
        with torch.device("meta"):
            model = method.prepare_from_config(model, cfg, total_steps=1)
        check_budget(cfg, model)
    probe_out(Path(cfg.out))


def check_budget(cfg: TrainConfig, model: nn.Module) -> None:
    """A pruning run must have something to prune, and must keep at least one neuron (at every budget it has)."""
    budgets = resolve_budgets(cfg, model)
    if not budgets:
        raise ConfigError(f"method {cfg.method} needs a budget: pass --budget-params N or --budget-dim H")
    start = adapter_param_count(model)
    cheapest = min((a.num_params(1) for _, a in adapters(model)), default=0)
    if budgets[0] >= start:
        raise ConfigError(
            f"budget {budgets[0]:,} is at or above the {start:,} adapter parameters at insertion: nothing to prune; "
            "lower --budget-params / --budget-dim, raise --adapter-dim, or train with --method adapter"
        )
    if budgets[-1] < cheapest:
        raise ConfigError(
            f"budget {budgets[-1]:,} is below the cheapest adapter neuron ({cheapest:,} parameters): every adapter "
            "would be removed; raise the budget, or train only the head with --method linear"
        )


def probe_out(out: Path) -> None:
    """Raise if the output folder cannot be created; leave nothing behind."""
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out} is a file; pick a folder")
        return
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:
        Path(tempfile.mkdtemp(prefix=".mimi-probe-", dir=ancestor)).rmdir()
    except OSError as e:
        raise ConfigError(
            f"--out {out}: cannot create the output folder in {ancestor} ({e.strerror}); pick a folder you can write to"
        ) from e


def build_run(cfg: TrainConfig, *, sizes: dict[str, int] | None = None, device: torch.device | None = None) -> Run:
    """Create the backbone, load the task with the backbone's preprocessing, and apply the method."""
    if not cfg.data:
        raise ConfigError("no dataset given: pass --data (e.g. vtab1k:TASK with --data-root DIR)")
    method = get_method(cfg.method)  # cheap checks first: fail before loading a backbone or decoding data
    torch.manual_seed(cfg.seed)
    model, source = create_backbone(
        cfg.model, weights=cfg.weights, img_size=cfg.img_size, model_kwargs=cfg.model_kwargs
    )
    img_size = model_img_size(model)
    mean, std = preprocessing(model)
    task = build_task(
        cfg.data,
        root=cfg.data_root,
        img_size=img_size,
        mean=mean,
        std=std,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        trainval=cfg.trainval,
        progress=cfg.progress,
    )
    backbone_params = backbone_param_count(model)
    torch.manual_seed(cfg.seed)  # the head and the adapters start the same whatever the data loading did
    model.reset_classifier(task.num_classes)
    total_steps = cycle_epochs(cfg, 0) * steps_per_epoch(cfg, task)
    model = method.prepare_from_config(model, cfg, total_steps=max(1, total_steps))
    layout = [{"name": n, "role": r} for n, r in adapter_roles(model).items()]
    head = classifier(model)
    # trainable head parameters only: PEFT keeps a frozen copy of the head beside the trained one
    head_params = sum(p.numel() for p in head.parameters() if p.requires_grad) if head is not None else 0
    if sizes is not None:
        apply_plan(model, {n: list(range(h)) for n, h in sizes.items()})
    device = device or resolve_device(cfg.device)  # under torchrun: this rank's device
    model.to(device)
    info = {
        "model": cfg.model,
        "method": cfg.method,
        "weights_source": source,
        "img_size": img_size,
        "mean": mean,
        "std": std,
        "backbone_params": backbone_params,
        "head_params": head_params,
        "num_classes": task.num_classes,
        "data": task.name,
        "n_train": len(task.train),
        "n_val": len(task.val),
        "n_test": len(task.test),
        "layout": layout,
        "device": str(device),
    }
    return Run(cfg, model, task, method, device, autocast_dtype(device, cfg.precision), backbone_params, info)


def resolve_budgets(cfg: TrainConfig, model: nn.Module) -> list[int]:
    """The adapter parameter budgets, largest first: given directly, or as uniform adapters of ``budget_dim``
    (one for most runs; ``[]`` when none is given)."""
    return parameter_budgets(model, budget_params=cfg.budget_params, budget_dim=cfg.budget_dim)
