"""Mixed-task forward passes: the modules a bank puts at adapter sites and LoRA layers, and the router they share.

One frozen backbone runs once for a batch whose rows belong to different tasks. Before the pass the bank tells the
:class:`Router` which rows belong to which task; every wrapped site then computes its frozen branch on the whole
batch and adds each task's adapter output to that task's rows only (gather -> small matmuls -> scatter-add, the
way multi-LoRA servers batch their adapters). A task with no adapter at a site costs nothing there.
"""

from __future__ import annotations

import torch
from torch import nn

from mimi.core.errors import ModelError


class Router:
    """Which rows of the current batch belong to which task (set by the bank around each forward pass)."""

    def __init__(self) -> None:
        self.single: str | None = None  # every row belongs to this task: the no-gather fast path
        self.groups: dict[str, torch.Tensor] = {}  # task -> image indices (LongTensor) in the batch
        self.batch = 0
        self._rows: dict[tuple[str, int], torch.Tensor] = {}

    def set_single(self, task: str, batch: int) -> None:
        self.single, self.groups, self.batch, self._rows = task, {}, batch, {}

    def set_groups(self, groups: dict[str, torch.Tensor], batch: int) -> None:
        self.single, self.groups, self.batch, self._rows = None, groups, batch, {}

    def clear(self) -> None:
        self.set_groups({}, 0)

    def rows(self, task: str, lead: int) -> torch.Tensor:
        """Row indices of ``task`` in a tensor whose first dimension is ``lead``.

        Most sites see ``(B, N, D)``; Swin's window attention sees ``(B * windows, N, D)`` with each image's windows
        contiguous, so image ``b`` owns rows ``b * k .. b * k + k - 1``.
        """
        key = (task, lead)
        if key not in self._rows:
            idx = self.groups[task]
            k, rem = divmod(lead, self.batch)
            if rem or k == 0:
                raise ModelError(f"a site sees {lead} rows for a batch of {self.batch} images; cannot route tasks")
            self._rows[key] = idx if k == 1 else (idx[:, None] * k + torch.arange(k, device=idx.device)).reshape(-1)
        return self._rows[key]


class BankSite(nn.Module):
    """A frozen branch (``attn``/``mlp``/``ls1``/``ls2``) or linear layer, plus every task's adapter at this site.

    ``modes[task]`` is "sequential" (the adapter reads the branch output, the paper's placement) or "parallel"
    (it reads the branch input: AdaptFormer, and LoRA updates of a linear layer).
    """

    def __init__(self, branch: nn.Module, router: Router) -> None:
        super().__init__()
        self.branch = branch
        self.adapters = nn.ModuleDict()
        self.modes: dict[str, str] = {}
        self.router = router

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.branch(x, *args, **kwargs)
        r = self.router
        if r.single is not None:
            if r.single not in self.adapters:
                return y
            return y + self.adapters[r.single](y if self.modes[r.single] == "sequential" else x)
        out = None
        for task in r.groups:
            if task not in self.adapters:
                continue
            rows = r.rows(task, y.shape[0])
            src = y if self.modes[task] == "sequential" else x
            delta = self.adapters[task](src.index_select(0, rows))  # (rows, N, D): this task's rows only
            out = y.clone() if out is None else out
            out.index_add_(0, rows, delta.to(out.dtype))
        return y if out is None else out
