"""The plain training and evaluation loop: AdamW, warmup + cosine, autocast, one function per job."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mimi.core.device import autocast
from mimi.core.errors import TrainingError


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases, norms and other 1-d tensors."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def warmup_cosine(total_steps: int, warmup_frac: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup over ``warmup_frac`` of the steps, then cosine to zero."""
    warmup = max(1, round(total_steps * warmup_frac)) if warmup_frac > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def loader(
    dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1
) -> DataLoader:
    """A single-process loader; the shuffle order depends only on ``seed`` (resumable, reproducible).

    With ``world > 1`` (DDP), ``batch_size`` is the GLOBAL batch: the global batches are exactly those of a single
    process with the same seed, and rank ``r`` gets items ``r, r + world, ...`` of each. A last global batch
    smaller than ``world`` is dropped, so every rank runs the same number of steps.
    """
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    if world == 1:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=0)
    # The single-process loader's own batches of indices (whatever order its sampler draws), then each rank's share.
    batches = [
        b.tolist() for b in DataLoader(range(len(dataset)), batch_size=batch_size, shuffle=shuffle, generator=gen)
    ]
    return DataLoader(dataset, batch_sampler=[b[rank::world] for b in batches if len(b) >= world], num_workers=0)


class Indexed(Dataset):
    """``dataset`` whose items also carry their position: ``(image, label, index)``. The order a seeded loader draws
    depends only on the dataset's length, so wrapping changes no batch; the index finds an image's cached teacher
    logits."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        x, y = self.dataset[index]
        return x, y, index


#: A training loss other than cross-entropy: ``(logits (B, C) fp32, labels (B,), images (B, 3, H, W), indices (B,)
#: or None) -> loss``.
Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class StepContext:
    """What one epoch of training needs besides the model and the data."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    amp_dtype: torch.dtype | None = None
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    after_backward: Callable[[int], None] | None = None  # called with the global step
    criterion: Criterion | None = None  # None: cross-entropy with label_smoothing


def train_epoch(
    model: nn.Module, data: DataLoader, ctx: StepContext, *, progress: bool = False, desc: str = ""
) -> dict:
    """One pass over ``data``; returns mean loss and accuracy."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(data, desc=desc, leave=False, disable=None if progress else True, dynamic_ncols=True)
    for batch in bar:
        x, y = batch[0].to(ctx.device, non_blocking=True), batch[1].to(ctx.device, non_blocking=True)  # (B,3,H,W), (B,)
        index = batch[2] if len(batch) > 2 else None  # (B,) positions in the dataset, from an Indexed one
        with autocast(ctx.device, ctx.amp_dtype):
            logits = model(x)  # (B, C)
            if ctx.criterion is None:
                loss = nn.functional.cross_entropy(logits.float(), y, label_smoothing=ctx.label_smoothing)
            else:
                loss = ctx.criterion(logits.float(), y, x, index)
        value = loss.item()  # one sync per step, needed for the running mean anyway
        if not math.isfinite(value):  # stop before the step: NaN gradients would spoil every weight
            raise TrainingError(f"the loss became {value} at step {ctx.scheduler.last_epoch}")
        ctx.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if ctx.after_backward is not None:
            ctx.after_backward(ctx.scheduler.last_epoch)
        if ctx.grad_clip is not None:
            params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
            nn.utils.clip_grad_norm_(params, ctx.grad_clip)
        ctx.optimizer.step()
        ctx.scheduler.step()
        n = y.numel()
        total_loss += value * n
        correct += (logits.argmax(-1) == y).sum().item()
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return {"train_loss": total_loss / max(1, seen), "train_acc": correct / max(1, seen)}


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    num_classes: int,
    device: torch.device,
    batch_size: int = 256,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "eval",
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Top-1 accuracy, mean loss and per-class accuracy of ``model`` on ``dataset``.

    ``reduce`` (DDP): sums a tensor over ranks, each rank having evaluated its own share of the data; the
    confusion matrix and the loss are reduced, so every rank returns the same numbers.
    """
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    total_loss, seen = 0.0, 0
    data = loader(dataset, batch_size=batch_size, shuffle=False)
    for x, y in tqdm(data, desc=desc, leave=False, disable=None if progress else True, dynamic_ncols=True):
        x, y = x.to(device), y.to(device)
        with autocast(device, amp_dtype):
            logits = model(x).float()  # (B, C)
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        pred = logits.argmax(-1)
        confusion += torch.bincount((y * num_classes + pred).cpu(), minlength=num_classes**2).view(num_classes, -1)
        seen += y.numel()
    if reduce is not None:
        totals = reduce(torch.tensor([total_loss, float(seen)], dtype=torch.float64))
        total_loss, seen = float(totals[0]), int(totals[1])
        confusion = reduce(confusion)
    per_class = (confusion.diag().float() / confusion.sum(1).clamp_min(1)).tolist()
    return {
        "acc": confusion.diag().sum().item() / max(1, seen),
        "loss": total_loss / max(1, seen),
        "per_class_acc": per_class,
        "n": seen,
    }
