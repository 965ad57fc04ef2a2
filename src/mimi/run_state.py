"""What a resumable run keeps between epochs: one safetensors file with the trained tensors, the optimizer
state, the pruner and the position in the schedule; no pickle anywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .io_utils import atomic_write_text
from .schedule import MiMiPruner
from .scores import GradientAccumulator


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state split into named tensors (for safetensors) and a JSON-able rest."""
    state = opt.state_dict()
    tensors = {f"__optim__.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    return tensors, {
        "param_groups": state["param_groups"],
        "keys": {str(i): list(s) for i, s in state["state"].items()},
    }


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`optimizer_tensors`: a state dict ``optimizer.load_state_dict`` accepts."""
    state = {int(i): {k: tensors[f"__optim__.{i}.{k}"] for k in keys} for i, keys in meta["keys"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run: Any,  # a trainer.Run: its .model and .out
    opt: torch.optim.Optimizer,
    step: int,
    position: dict,
    pruner: MiMiPruner | None,
    acc: GradientAccumulator | None,
    best: dict | None = None,
) -> None:
    """Write ``<run>/checkpoint.safetensors`` atomically: trained tensors, optimizer state, gradient
    accumulator and best-val snapshot as tensors; position, step and pruner state as metadata."""
    tensors, opt_meta = optimizer_tensors(opt)
    if best is not None:
        tensors.update({f"__best__.{n}": t for n, t in best["state"].items()})
    if acc is not None:
        for name, (gd, gu) in acc.grads.items():
            tensors[f"__gradacc__.{name}.down"], tensors[f"__gradacc__.{name}.up"] = gd, gu
    meta = {
        "position": json.dumps(position),
        "optimizer": json.dumps(opt_meta),
        "step": str(step),
        "pruner": json.dumps(pruner.state_dict() if pruner else None),
        "gradacc_steps": str(acc.steps if acc else 0),
        "best": json.dumps({k: v for k, v in best.items() if k != "state"} if best else None),
    }
    ckpt.save_adapters(run.model, run.out / "checkpoint.safetensors", metadata=meta, extra_tensors=tensors)


def read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def truncate_metrics(path: Path, position: dict) -> None:
    """Drop epoch lines written after the checkpoint (they will be written again), and a torn last line."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill mid-write
            continue
        if (rec["cycle"], rec["epoch"]) <= (position["cycle"], position["epoch"]):
            keep.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in keep))
