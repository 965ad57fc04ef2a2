"""What a resumable run keeps between epochs, written and read back here: one safetensors file
(``checkpoint.safetensors``) with the trained tensors, the optimizer state, the gradient accumulator and the
best-validation snapshot as tensors, and the position, step and pruner state as metadata; no pickle anywhere.

:func:`save_checkpoint` writes it; :func:`read_checkpoint` parses it and :meth:`SavedState.restore` puts it back
into a :class:`~mimi.training.loop.Trainer`, returning the :class:`Cursor` the loop continues from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mimi.core import taskfile as ckpt
from mimi.core.adapters import adapters
from mimi.core.files import atomic_write_text
from mimi.core.schedule import MiMiPruner
from mimi.core.scores import GradientAccumulator

if TYPE_CHECKING:
    from mimi.training.loop import Trainer


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
    run: Any,  # a mimi.training.run.Run: its .model and .out
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


@dataclass
class Cursor:
    """Where the loop stands: the cycle and epoch to run next, and (mid-cycle) the optimizer state and step."""

    cycle: int = 0
    epoch: int = 0
    optimizer: dict | None = None
    step: int = 0
    elapsed: float = 0.0

    @property
    def fresh(self) -> bool:
        """At the start of a cycle: nothing of it has run yet."""
        return self.epoch == 0 and self.optimizer is None

    def next_cycle(self) -> Cursor:
        return Cursor(cycle=self.cycle + 1)


@dataclass
class SavedState:
    """``checkpoint.safetensors`` read back: its metadata and tensors, parsed."""

    meta: dict[str, str]
    tensors: dict[str, torch.Tensor]
    position: dict

    @property
    def sizes(self) -> dict[str, int] | None:
        """Per-adapter hidden sizes at the checkpoint (None: the run has no bottleneck adapters)."""
        return json.loads(self.meta["sizes"]) if json.loads(self.meta["adapter_config"]) else None

    @property
    def done_cycles(self) -> int:
        return self.position["cycle"] + (1 if self.position["cycle_done"] else 0)

    def restore(self, trainer: Trainer) -> Cursor:
        """Put the pruner, gradient accumulator and best-val snapshot back into ``trainer``; the cursor to resume at.

        The trained tensors themselves are restored into the model by the caller (before the trainer is built).
        """
        meta, tensors = self.meta, self.tensors
        pruner_state = json.loads(meta["pruner"])
        if pruner_state is not None:
            trainer.pruner = MiMiPruner.from_state_dict(pruner_state)
        if trainer.grad_acc is not None:
            for name, _ in adapters(trainer.run.model):
                if f"__gradacc__.{name}.down" in tensors:
                    trainer.grad_acc.grads[name] = (
                        tensors[f"__gradacc__.{name}.down"],
                        tensors[f"__gradacc__.{name}.up"],
                    )
            trainer.grad_acc.steps = int(meta["gradacc_steps"])
        best = json.loads(meta.get("best", "null"))
        if best is not None:
            best["state"] = {k.removeprefix("__best__."): v for k, v in tensors.items() if k.startswith("__best__.")}
            trainer.best = best
        if self.position["cycle_done"]:  # the finished cycle's selection is already in the weights
            trainer.best = None
            return Cursor(cycle=self.position["cycle"] + 1)
        device = trainer.run.device
        opt_state = optimizer_state({k: v.to(device) for k, v in tensors.items()}, json.loads(meta["optimizer"]))
        return Cursor(
            cycle=self.position["cycle"],
            epoch=self.position["epoch"],
            optimizer=opt_state,
            step=int(meta["step"]),
            elapsed=self.position["elapsed"],
        )


def read_checkpoint(path: Path) -> SavedState:
    """Parse a run's ``checkpoint.safetensors`` (raises :class:`~mimi.core.errors.CheckpointError` if damaged)."""
    meta = ckpt.read_metadata(path)
    return SavedState(meta=meta, tensors=ckpt.load_tensors(path), position=json.loads(meta["position"]))
