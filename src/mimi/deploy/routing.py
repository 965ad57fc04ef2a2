"""Mixed-task forward passes: the modules a bank puts at adapter sites and LoRA layers, and the router they share.

One frozen backbone runs once for a batch whose rows belong to different tasks. Before the pass the bank tells the
:class:`Router` which rows belong to which task; every wrapped site then computes its frozen branch on the whole
batch and adds each task's adapter output to that task's rows only. A task with no adapter at a site costs nothing
there. Three strategies do the "to that task's rows only" part (``Router.strategy``, see :data:`STRATEGIES`):

* ``gather``: at every site, for each task, ``index_select`` its rows -> adapter -> ``index_add`` (rows anywhere).
* ``grouped``: the bank sorts the batch by task once, so that each task's rows are one contiguous slice; every site
  runs each task's adapter on a narrow slice and writes it into the output, with no gather or scatter.
* ``padded``: the same sorted layout, and at every site the adapters of the batch's tasks stacked into zero-padded
  ``(T, H_max, D)`` tensors: one ``baddbmm`` down, the activation, one ``baddbmm`` up, whatever the number of tasks
  (vLLM's way of batching LoRAs). A padded neuron has zero down weights and bias, so its activation reads 0 and
  gives 0 (every activation here maps 0 to 0, checked when stacking), and its up column is zero: it adds nothing,
  and the results are those of each task alone. Tasks with no adapter at the site get an all-zero slot.

The per-task Python work of ``gather`` and ``grouped`` (a few small ops per task per site) is what makes a mixed batch
of many tasks slower than a single-task one; ``padded`` does a constant number of ops per site
(``benchmarks/bank_mixed.py``). Its costs: memory, every site's adapters held a second time, padded (about 2.5x the
adapters' own bytes for MiMi's uneven sizes), plus the stacks of the last few task sets seen (at most one slot per
image each); and a batch with a new set of tasks restacks (one ``index_select`` per tensor per site), and pads each
task's rows to the largest count when counts differ.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mimi.core.errors import ConfigError, ModelError

STRATEGIES = ("gather", "grouped", "padded")
DEFAULT_STRATEGY = "padded"  # fastest in benchmarks/bank_mixed.py for 8 and 64 tasks (see its JSON)
_STACKS_KEPT = 4  # per site: stacked weights of the last few task sets (a server sees the same mixes again)


class Router:
    """Which rows of the current batch belong to which task (set by the bank around each forward pass).

    ``single``: every row is one task's (the plain path). ``groups``: task -> row indices anywhere in the batch (the
    ``gather`` strategy). ``order`` / ``starts``: the batch is sorted by task, task ``order[j]`` owning images
    ``starts[j] .. starts[j + 1] - 1`` (``grouped`` and ``padded``).
    """

    def __init__(self, strategy: str = DEFAULT_STRATEGY) -> None:
        self.strategy = check_strategy(strategy)
        self.single: str | None = None  # every row belongs to this task: the no-gather fast path
        self.groups: dict[str, torch.Tensor] = {}  # task -> image indices (LongTensor) in the batch
        self.order: tuple[str, ...] = ()  # tasks in the sorted batch, in row order
        self.starts: list[int] = [0]  # len(order) + 1 image offsets
        self.batch = 0
        self._rows: dict[tuple[str, int], torch.Tensor] = {}
        self._pads: dict[int, tuple[int, torch.Tensor, torch.Tensor] | None] = {}

    def set_single(self, task: str, batch: int) -> None:
        self._reset(batch)
        self.single = task

    def set_groups(self, groups: dict[str, torch.Tensor], batch: int) -> None:
        self._reset(batch)
        self.groups = groups

    def set_spans(self, counts: dict[str, int], batch: int) -> None:
        """The batch is sorted by task: ``counts`` (task -> number of images) in row order."""
        self._reset(batch)
        self.order = tuple(counts)
        for n in counts.values():
            self.starts.append(self.starts[-1] + n)
        if self.starts[-1] != batch:
            raise ModelError(f"task spans cover {self.starts[-1]} images of a batch of {batch}")

    def clear(self) -> None:
        self._reset(0)

    def _reset(self, batch: int) -> None:
        self.single, self.groups, self.order, self.starts, self.batch = None, {}, (), [0], batch
        self._rows, self._pads = {}, {}

    @property
    def sorted(self) -> bool:
        """True when the batch is laid out by task (``grouped`` / ``padded``)."""
        return bool(self.order)

    def per_image(self, lead: int) -> int:
        """Rows per image in a tensor whose first dimension is ``lead``.

        Most sites see ``(B, N, D)``; Swin's window attention sees ``(B * windows, N, D)`` with each image's windows
        contiguous, so image ``b`` owns rows ``b * k .. b * k + k - 1``.
        """
        k, rem = divmod(lead, self.batch)
        if rem or k == 0:
            raise ModelError(f"a site sees {lead} rows for a batch of {self.batch} images; cannot route tasks")
        return k

    def rows(self, task: str, lead: int) -> torch.Tensor:
        """Row indices of ``task`` in a tensor whose first dimension is ``lead`` (``gather``)."""
        key = (task, lead)
        if key not in self._rows:
            idx = self.groups[task]
            k = self.per_image(lead)
            self._rows[key] = idx if k == 1 else (idx[:, None] * k + torch.arange(k, device=idx.device)).reshape(-1)
        return self._rows[key]

    def spans(self, lead: int) -> Iterator[tuple[str, int, int]]:
        """``(task, first row, end row)`` of each task of the sorted batch, in row order."""
        k = self.per_image(lead)
        s = self.starts
        for j, task in enumerate(self.order):
            yield task, s[j] * k, s[j + 1] * k

    def padding(self, lead: int, device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """For tasks of unequal counts: ``(rows per task padded, pad index, unpad index)``; None when all are equal.

        ``src.index_select(0, pad)`` lays the rows out as ``(T * m, ...)``, every task padded to ``m`` rows with
        copies of row 0 (computed, then dropped); ``out.index_select(0, unpad)`` takes the real rows back.
        """
        if lead not in self._pads:
            k = self.per_image(lead)
            counts = [(b - a) * k for a, b in zip(self.starts, self.starts[1:])]
            m = max(counts)
            if all(c == m for c in counts):
                self._pads[lead] = None
            else:
                pad = torch.zeros(len(counts) * m, dtype=torch.long)
                unpad = []
                for j, (a, c) in enumerate(zip(self.starts, counts)):
                    pad[j * m : j * m + c] = torch.arange(a * k, a * k + c)
                    unpad.extend(range(j * m, j * m + c))
                self._pads[lead] = (m, pad.to(device), torch.tensor(unpad, device=device))
        return self._pads[lead]


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ConfigError(f"mixed-batch strategy must be one of {STRATEGIES}, got {strategy!r}")
    return strategy


class _Adapters(nn.ModuleDict):
    """A ``ModuleDict`` that counts its changes, so a site knows when its stacked weights are stale."""

    version = 0

    def __setitem__(self, key: str, module: nn.Module) -> None:
        super().__setitem__(key, module)
        self.version += 1

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.version += 1

    def clear(self) -> None:
        super().clear()
        self.version += 1


@dataclass
class _Stack:
    """Zero-padded weights of some tasks at one site, ``T`` slots (one per task of a batch, in row order)."""

    down: torch.Tensor  # (T, H, D_in): down.weight as nn.Linear holds it, zero rows beyond each task's size
    down_bias: torch.Tensor | None  # (T, 1, H), None when no task has one
    up: torch.Tensor  # (T, H, D_out): up.weight transposed, zero rows beyond each task's hidden size
    up_bias: torch.Tensor | None  # (T, 1, D_out)
    scale: torch.Tensor | None  # (T, 1, 1), None when every scale is 1
    act: nn.Module

    def select(self, index: torch.Tensor) -> _Stack:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, index)

        return _Stack(
            pick(self.down), pick(self.down_bias), pick(self.up), pick(self.up_bias), pick(self.scale), self.act
        )


def _signature(adapter: nn.Module, mode: str) -> tuple[str, str] | None:
    """Adapters that can share one padded stack: same input (mode) and activation; None when one cannot be padded."""
    down, up, act = getattr(adapter, "down", None), getattr(adapter, "up", None), getattr(adapter, "act", None)
    if not (isinstance(down, nn.Linear) and isinstance(up, nn.Linear) and isinstance(act, nn.Module)):
        return None
    if getattr(adapter, "drop", None) is not None and adapter.drop.training and adapter.drop.p > 0:
        return None  # a live dropout draws per element: not the stacked computation's business
    with torch.no_grad():
        zero = torch.zeros(1, dtype=down.weight.dtype, device=down.weight.device)
        if act(zero).item() != 0:  # a padded neuron must stay silent: act(0) == 0
            return None
    return mode, repr(act)  # repr: GELU(approximate='tanh') is not GELU()


class BankSite(nn.Module):
    """A frozen branch (``attn``/``mlp``/``ls1``/``ls2``) or linear layer, plus every task's adapter at this site.

    ``modes[task]`` is "sequential" (the adapter reads the branch output, the paper's placement) or "parallel"
    (it reads the branch input: AdaptFormer, and LoRA updates of a linear layer).
    """

    def __init__(self, branch: nn.Module, router: Router) -> None:
        super().__init__()
        self.branch = branch
        self.adapters = _Adapters()
        self.modes: dict[str, str] = {}
        self.router = router
        # padded strategy: per signature, every task's weights stacked once (plus a zero slot), and the stacks of
        # recent batch layouts; both dropped when a task is added or removed (adapters.version changes)
        self._version = -1
        self._full: dict[tuple[str, str], tuple[_Stack, dict[str, int]]] = {}
        self._signatures: dict[str, tuple[str, str] | None] = {}
        self._layouts: OrderedDict[tuple[str, ...], list[tuple[str, _Stack]] | None] = OrderedDict()

    def forward(self, *args, **kwargs):
        # called as the block calls its branch (x, or hidden_states= alone); a transformers attention module
        # returns (output, weights), and only the output gets the tasks' adapters
        x = args[0] if args else kwargs["hidden_states"]
        y = self.branch(*args, **kwargs)
        if isinstance(y, tuple):
            return (self._add(x, y[0]), *y[1:])
        return self._add(x, y)

    def _add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r = self.router
        if r.single is not None:
            if r.single not in self.adapters:
                return y
            return y + self.adapters[r.single](y if self.modes[r.single] == "sequential" else x)
        if r.sorted:
            if r.strategy == "padded":
                out = self._padded(x, y)
                if out is not None:
                    return out
            return self._grouped(x, y)
        return self._gather(x, y)

    # ---------------------------------------------------------------- gather: rows anywhere in the batch

    def _gather(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = None
        r = self.router
        for task in r.groups:
            if task not in self.adapters:
                continue
            rows = r.rows(task, y.shape[0])
            src = y if self.modes[task] == "sequential" else x
            delta = self.adapters[task](src.index_select(0, rows))  # (rows, N, D): this task's rows only
            out = y.clone() if out is None else out
            out.index_add_(0, rows, delta.to(out.dtype))
        return y if out is None else out

    # ---------------------------------------------------------------- grouped: one contiguous slice per task

    def _grouped(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = None
        done = 0  # rows of ``out`` written so far
        for task, a, b in self.router.spans(y.shape[0]):
            adapter = self.adapters[task] if task in self.adapters else None
            if adapter is None:
                continue
            if out is None:
                # written slice by slice, each element once (as ``y + delta`` would); ``y`` itself is never
                # modified: it may be ``x`` (an Identity LayerScale) or held by the caller
                out = torch.empty_like(y)
            if done < a:
                out[done:a] = y[done:a]
            src = y if self.modes[task] == "sequential" else x
            torch.add(y[a:b], adapter(src[a:b]).to(y.dtype), out=out[a:b])  # (n_task * k, N, D)
            done = b
        if out is None:
            return y
        if done < y.shape[0]:
            out[done:] = y[done:]
        return out

    # ---------------------------------------------------------------- padded: one batched matmul per site

    def _padded(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """``y`` plus every task's adapter in one ``baddbmm`` pair per signature; None: use ``_grouped``."""
        stacks = self._stacks()
        if stacks is None:
            return None
        if not stacks:
            return y
        r = self.router
        lead, t = y.shape[0], len(r.order)
        pad = r.padding(lead, y.device)
        out = None
        for mode, st in stacks:
            src = y if mode == "sequential" else x
            if pad is None:
                xs = src.reshape(t, -1, src.shape[-1])  # (T, rows * N, D_in): the batch is sorted by task
            else:
                xs = src.index_select(0, pad[1]).reshape(t, -1, src.shape[-1])  # (T, m * N, D_in)
            w = st.down.transpose(1, 2)  # (T, D_in, H) as a view: bmm's fast path for a thin right-hand side
            h = torch.bmm(xs, w) if st.down_bias is None else torch.baddbmm(st.down_bias, xs, w)
            h = st.act(h)  # (T, rows * N, H); padded neurons read 0 and give 0
            d = torch.bmm(h, st.up) if st.up_bias is None else torch.baddbmm(st.up_bias, h, st.up)
            if st.scale is not None:
                d = d.mul_(st.scale)  # (T, rows * N, D_out)
            if pad is None:
                d = d.view(y.shape)
            else:
                d = d.view(t * pad[0], *y.shape[1:]).index_select(0, pad[2])
            out = d.add_(y) if out is None else out.add_(d)
        return out

    def _refresh(self) -> None:
        if self._version != self.adapters.version:
            self._version = self.adapters.version
            self._full, self._layouts = {}, OrderedDict()
            self._signatures = {k: _signature(a, self.modes[k]) for k, a in self.adapters.items()}

    def _stacks(self) -> list[tuple[str, _Stack]] | None:
        """The stacks of this batch's layout: ``(mode, stack)`` per signature present; None: not paddable."""
        self._refresh()
        order = self.router.order
        if order in self._layouts:
            self._layouts.move_to_end(order)
            return self._layouts[order]
        present = {self._signatures[k] for k in order if k in self.adapters}
        stacks: list[tuple[str, _Stack]] | None = []
        if None in present:
            stacks = None
        else:
            for sig in sorted(present, key=str):
                full, slot = self._full_stack(sig)
                zero = len(slot)  # the all-zero slot, for tasks with no adapter of this signature here
                index = [slot.get(k, zero) for k in order]
                if index == list(range(zero)):  # the batch holds every task of the signature, in site order
                    st = _narrow(full, zero)
                else:
                    st = full.select(torch.tensor(index, device=full.down.device))
                stacks.append((sig[0], st))
        self._layouts[order] = stacks
        if len(self._layouts) > _STACKS_KEPT:
            self._layouts.popitem(last=False)
        return stacks

    def _full_stack(self, sig: tuple[str, str]) -> tuple[_Stack, dict[str, int]]:
        """Every task of this signature at the site, stacked in site order, plus a last all-zero slot."""
        cached = self._full.get(sig)
        if cached is not None:
            return cached
        keys = [k for k, s in self._signatures.items() if s == sig]
        mods = [self.adapters[k] for k in keys]
        first = mods[0]
        w = first.down.weight
        hidden = _padded_width(max(m.down.out_features for m in mods))
        n, d_in, d_out = len(mods) + 1, first.down.in_features, first.up.out_features
        down = w.new_zeros(n, hidden, d_in)
        up = w.new_zeros(n, hidden, d_out)
        any_db = any(m.down.bias is not None for m in mods)
        any_ub = any(m.up.bias is not None for m in mods)
        down_bias = w.new_zeros(n, 1, hidden) if any_db else None
        up_bias = w.new_zeros(n, 1, d_out) if any_ub else None
        scales = [float(getattr(m, "scale", 1.0)) for m in mods]
        scale = None if all(s == 1.0 for s in scales) else torch.tensor(scales + [0.0], dtype=w.dtype).view(n, 1, 1)
        with torch.no_grad():
            for j, m in enumerate(mods):
                h = m.down.out_features
                down[j, :h] = m.down.weight
                up[j, :h] = m.up.weight.t()
                if m.down.bias is not None:
                    down_bias[j, 0, :h] = m.down.bias
                if m.up.bias is not None:
                    up_bias[j, 0] = m.up.bias
        stack = _Stack(down, down_bias, up, up_bias, None if scale is None else scale.to(w.device), first.act)
        self._full[sig] = (stack, {k: j for j, k in enumerate(keys)})
        return self._full[sig]


def _padded_width(h: int) -> int:
    """Hidden width of a stack whose largest adapter has ``h`` neurons.

    Rounded up past the largest size: CPU GEMM kernels are several times slower at odd thin widths than at multiples
    of 8 / 16 (measured with torch 2.14 on 2 EPYC cores: a (64, 17, 384) x (64, 384, H) bmm takes about as long at
    H=16 as at H=9, and less at H=48 than at H=37); the extra zero neurons change no result.
    """
    if h <= 4:
        return h
    if h <= 8:
        return 8
    return -(-h // 16) * 16


def _narrow(st: _Stack, n: int) -> _Stack:
    """The first ``n`` slots of a stack (views, no copy)."""

    def head(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[:n]

    return _Stack(head(st.down), head(st.down_bias), head(st.up), head(st.up_bias), head(st.scale), st.act)
