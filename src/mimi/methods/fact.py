"""FacT-TT (Jie & Deng, "FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer", AAAI 2023).

In every block, the frozen ``attn.qkv`` (d -> 3d), ``attn.proj`` (d -> d), ``mlp.fc1`` (d -> 4d) and ``mlp.fc2``
(4d -> d) get an additive weight update. Cut into d x d blocks these are 3 + 1 + 4 + 4 = 12 matrices per block, N in
all, and FacT-TT factorises the stack of their increments as a tensor train::

    dW_i = s * U Sigma_i V^T        U, V: (d, r), shared by all N matrices of all blocks;  Sigma_i: (r, r)

``2 d r + N r^2`` trained parameters besides the head (ViT-S/14, d=384, N=144: 5,376 at r=4, 15,360 at r=8). A layer
of ``a`` input blocks and ``b`` output blocks (qkv: a=1, b=3; fc2: a=4, b=1) holds its ``a * b`` Sigmas as one
``(b r, a r)`` tensor ``sigma`` (block (j, i) maps input chunk i to output chunk j) and adds a side path on its input,
never a materialised delta::

    y = W x + bias + s * unchunk( U . dropout( sigma . chunk(x) V ) )      chunk: (..., a d) -> (..., a, d)

That costs ``r d (a + b) + a b r^2`` multiply-adds a token; training through a merged ``W + dW`` would also need the
full ``(b d, a d)`` weight gradient every step, as much as the frozen layer's own matmul.

Faithful to the public code (JieShibo/PETL-ViT, ``FacT/fact_tt.py``):

* **Initialisation** (``init="code"``, the default): the input factor V as an ``nn.Linear(d, r)`` is drawn
  (``U(+-1/sqrt(d))``), every Sigma as that code's ``nn.Linear`` of its layer (``U(+-1/sqrt(a r))``), and the output
  factor U is **zero**, so the adapted model starts exactly at the pretrained one. ``init="sigma-zero"`` instead
  draws both factors (V as above, U as an ``nn.Linear(r, d)``: ``U(+-1/sqrt(r))``) and zeroes every Sigma: the same
  start, another first step (only the Sigmas move first, where the code's init moves only U first).
* **Dropout** (default 0.1) on the factor path, after Sigma and before U: the code's fixed ``Dropout(0.1)``, used for
  every task (it is not part of its per-task search).
* **Scale** s (default 1.0): the code tunes s per task over {0.01, 0.1, 1, 10, 100} (its 19 VTAB configs: 1.0 seven
  times, 10 six times, 100 four times, 0.1 and 0.01 once each). 1.0 is the most frequent choice and the neutral one
  (the update is the plain product); tune it like the learning rate where a task allows a search.

Beyond the paper: a backbone whose blocks have several widths (Swin stages) gets one (U, V) pair per width; on a
plain ViT there is one width, hence exactly one pair as in the paper. The shared factors live once on the model, as
``fact_tt.d<width>.u`` / ``.v``; each adapted layer holds its ``sigma`` and its frozen ``base``.

Task files: the trained tensors are U, V, the Sigmas and the head, so ``mimi eval`` / ``mimi export`` (which rebuild
the run and restore the file) reload them exactly. The file also records the one thing the tensors do not hold, in
the metadata entry ``fact`` (:data:`META`): ``{"s": scale}``, plus ``"w"`` where the backbone has several widths
(the width of each layer, run-length coded over the sorted layer names: ``[[width, layers], ...]``); about 20 bytes
of header on a ViT. A bank serves the file as it is (``servable=True``): :func:`fact_lora_task` rewrites it, when read,
as the equal per-layer LoRA (every update ``s U_blk Sigma V_blk^T`` is a rank-``r min(a, b)`` product ``B A``, see
:func:`lora_pair`), so the file stays FacT's small one and the bank runs its usual LoRA side paths.
:func:`fact_to_lora` does the same to a live model; :func:`merge_fact` folds the updates into the frozen weights.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from mimi.core.adapters import find_blocks, freeze_backbone
from mimi.core.errors import CheckpointError, ConfigError, ModelError
from mimi.core.layouts import block_layout
from mimi.core.lora import DEFAULT_TARGETS, LoRALinear, apply_lora_layout
from mimi.methods.base import Method, MethodOptions, PrepareContext, Traits, option, register
from mimi.methods.lora import check_rank, check_rank_or_budget

TARGETS: tuple[str, ...] = DEFAULT_TARGETS  # attn.qkv, attn.proj, mlp.fc1, mlp.fc2: the paper's layers
DEFAULT_RANK = 8
FACTORS = "fact_tt"  # the model attribute holding the shared factors (one FacTFactors per width)
INITS = ("code", "sigma-zero")
META = "fact"  # the task-file metadata entry a bank needs: {"s": scale[, "w": [[width, layers], ...]]}


class FacTFactors(nn.Module):
    """The factors shared by every FacT matrix of one width ``d``: ``u`` (output side) and ``v`` (input side), both
    ``(d, r)``."""

    def __init__(self, dim: int, rank: int, *, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.zeros(dim, rank, device=device, dtype=dtype))
        self.v = nn.Parameter(torch.zeros(dim, rank, device=device, dtype=dtype))

    @property
    def dim(self) -> int:
        return self.u.shape[0]

    @property
    def rank(self) -> int:
        return self.u.shape[1]


class FacTLinear(nn.Module):
    """A frozen ``nn.Linear`` (``in = a d``, ``out = b d``) plus the FacT-TT side path ``s U Sigma_ji V^T`` on every
    ``d x d`` block (j, i) of its weight.

    Args:
        base: the layer (kept as ``self.base``, not copied).
        factors: the shared U, V of the layer's width; referenced, not registered (they belong to the model).
        scale: s.
        dropout: dropout on the factor path, after Sigma.
    """

    def __init__(self, base: nn.Linear, factors: FacTFactors, *, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        d, r = factors.dim, factors.rank
        if base.in_features % d or base.out_features % d:
            raise ModelError(
                f"FacT cuts a layer into {d} x {d} blocks, but this one is {base.in_features} -> {base.out_features}"
            )
        self.base = base
        self.n_in, self.n_out = base.in_features // d, base.out_features // d
        self.scale = float(scale)
        ref = base.weight
        self.sigma = nn.Parameter(torch.zeros(self.n_out * r, self.n_in * r, device=ref.device, dtype=ref.dtype))
        self.drop = nn.Dropout(dropout)
        self._shared = (factors,)  # a tuple: nn.Module does not register it, so U and V have one name, on the model

    @property
    def factors(self) -> FacTFactors:
        return self._shared[0]

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def matrices(self) -> int:
        """How many ``d x d`` matrices (Sigmas) this layer holds."""
        return self.n_in * self.n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factors
        d, r = f.dim, f.rank
        h = torch.matmul(x.unflatten(-1, (self.n_in, d)), f.v)  # (..., a, r): V^T x_i for every input chunk
        h = self.drop(F.linear(h.flatten(-2), self.sigma))  # (..., b r): sum_i Sigma_ji V^T x_i
        h = torch.matmul(h.unflatten(-1, (self.n_out, r)), f.u.t())  # (..., b, d)
        return self.base(x) + self.scale * h.flatten(-2)

    def _blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U_blk, V_blk)``: U repeated ``b`` times and V ``a`` times on a block diagonal."""
        f = self.factors
        return torch.block_diag(*[f.u] * self.n_out), torch.block_diag(*[f.v] * self.n_in)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``s U_blk sigma V_blk^T`` of shape ``(out, in)``: block (j, i) is ``s U Sigma_ji V^T``."""
        u_blk, v_blk = self._blocks()
        return self.scale * u_blk @ self.sigma @ v_blk.t()

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``B @ A == delta_weight()``, of rank ``r min(a, b)`` (see :func:`lora_pair`)."""
        f = self.factors
        return lora_pair(f.u, f.v, self.sigma, self.scale)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` equal to this module in eval mode (the base is left untouched)."""
        out = copy.deepcopy(self.base)
        out.weight += self.delta_weight().to(out.weight.dtype)
        return out


def lora_pair(u: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A`` the update ``s U_blk sigma V_blk^T`` of a layer of ``a`` input and ``b`` output
    blocks (``sigma``: ``(b r, a r)``; ``u``, ``v``: ``(d, r)``), of rank ``r min(a, b)``.

    ``a <= b`` (qkv, proj, fc1): ``A = V^T``, ``B = s [U Sigma_1; ...; U Sigma_b]``; else (fc2):
    ``A = [Sigma_1 V^T | ... | Sigma_a V^T]``, ``B = s U``.
    """
    r = u.shape[1]
    n_out, n_in = sigma.shape[0] // r, sigma.shape[1] // r
    u_blk, v_blk = torch.block_diag(*[u] * n_out), torch.block_diag(*[v] * n_in)
    if n_in <= n_out:
        return v_blk.t(), scale * u_blk @ sigma
    return sigma @ v_blk.t(), scale * u_blk


def fact_targets(model: nn.Module) -> list[tuple[str, nn.Linear, int]]:
    """``(name, layer, width d)`` of every layer FacT adapts, in model order; ``d`` is the width of the block's
    residual stream (the input of its ``attn.qkv``). Already-wrapped layers are reported by their base.

    Raises:
        ModelError: no transformer block, a block without one of the layers, or a layer not cut into d x d blocks.
    """
    blocks = find_blocks(model)
    if not blocks:
        raise ModelError(f"{type(model).__name__} has no transformer block with 'attn' and 'mlp'; FacT needs one")
    found = []
    for block_name, block in blocks:
        layers = []
        # transformers splits attn.qkv into q, k and v: the same three d x d matrices, each its own layer
        for target in (n for t in TARGETS for n in block_layout(block).layer_names(t)):
            try:
                layer = block.get_submodule(target)
            except AttributeError as e:
                raise ModelError(f"block {block_name!r} has no {target!r} for FacT (it adapts {TARGETS})") from e
            layer = layer.base if isinstance(layer, FacTLinear) else layer
            if not isinstance(layer, nn.Linear):
                raise ModelError(f"{block_name}.{target} is a {type(layer).__name__}, FacT needs an nn.Linear")
            layers.append((f"{block_name}.{target}", layer))
        d = layers[0][1].in_features
        for name, layer in layers:
            if layer.in_features % d or layer.out_features % d:
                raise ModelError(
                    f"{name} is {layer.in_features} -> {layer.out_features}, which FacT cannot cut into {d} x {d} "
                    "blocks (the block's width)"
                )
            found.append((name, layer, d))
    return found


def fact_shape(model: nn.Module) -> tuple[list[int], int]:
    """``(widths, N)``: the distinct widths (one (U, V) pair each) and the number of ``d x d`` matrices."""
    targets = fact_targets(model)
    widths = sorted({d for _, _, d in targets})
    n = sum((layer.in_features // d) * (layer.out_features // d) for _, layer, d in targets)
    return widths, n


def fact_params_at(widths: list[int], matrices: int, rank: int) -> int:
    """FacT-TT's trained parameters (head excluded) at ``rank``: ``2 d r`` per width plus ``N r^2``."""
    return 2 * rank * sum(widths) + matrices * rank * rank


def fact_rank_for_budget(model: nn.Module, budget_params: int) -> int:
    """The rank (1 to the smallest width) whose parameter count is nearest to ``budget_params``; on a tie the
    larger rank (as LoRA's rank rounds half up)."""
    if budget_params < 0:
        raise ConfigError(f"budget_params must be >= 0, got {budget_params}")
    widths, n = fact_shape(model)
    best = 1
    for r in range(2, min(widths) + 1):
        count = fact_params_at(widths, n, r)
        if abs(count - budget_params) <= abs(fact_params_at(widths, n, best) - budget_params):
            best = r
        if count > budget_params:  # the count grows with r: nothing further is nearer
            break
    return best


def _uniform(t: torch.Tensor, fan_in: int, generator: torch.Generator | None) -> None:
    """``nn.Linear``'s default draw for a weight of this fan-in: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in)
    t.uniform_(-bound, bound, generator=generator)


def add_fact(
    model: nn.Module,
    *,
    rank: int,
    scale: float = 1.0,
    dropout: float = 0.0,
    init: str = "code",
    seed: int | None = None,
) -> nn.Module:
    """Wrap every targeted layer in a :class:`FacTLinear`, add the shared factors as ``model.fact_tt``, and freeze
    all but the factors, the Sigmas and the head (in place; returns ``model``).

    Raises:
        ModelError: the model already holds FacT, or has no layers FacT can adapt.
        ConfigError: a rank below 1 or above the smallest width, or an unknown ``init``.
    """
    if hasattr(model, FACTORS) or any(isinstance(m, FacTLinear) for m in model.modules()):
        raise ModelError("the model already holds FacT factors; build a fresh backbone")
    if init not in INITS:
        raise ConfigError(f"fact-tt: init must be one of {', '.join(INITS)}, got {init!r}")
    targets = fact_targets(model)
    widths = sorted({d for _, _, d in targets})
    check_rank("rank", rank)
    if rank > min(widths):
        raise ConfigError(f"fact-tt: rank {rank} is above the backbone's width {min(widths)}; pick at most that")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    ref = targets[0][1].weight
    shared = nn.ModuleDict({f"d{d}": FacTFactors(d, rank, device=ref.device, dtype=ref.dtype) for d in widths})
    with torch.no_grad():
        for d in widths:
            f = shared[f"d{d}"]
            _uniform(f.v, d, generator)  # the input factor, as an nn.Linear(d, r)
            if init == "sigma-zero":
                _uniform(f.u, rank, generator)  # the output factor, as an nn.Linear(r, d)
    model.add_module(FACTORS, shared)
    for name, layer, d in targets:
        wrapped = FacTLinear(layer, shared[f"d{d}"], scale=scale, dropout=dropout)
        if init == "code":
            with torch.no_grad():
                _uniform(wrapped.sigma, wrapped.sigma.shape[1], generator)  # the code's nn.Linear(a r, b r)
        model.set_submodule(name, wrapped)
    freeze_backbone(model)
    shared.requires_grad_(True)
    for m in model.modules():
        if isinstance(m, FacTLinear):
            m.sigma.requires_grad_(True)
    return model


def fact_layers(model: nn.Module) -> list[tuple[str, FacTLinear]]:
    """Every :class:`FacTLinear` of the model, as ``(name, module)`` in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FacTLinear)]


def fact_param_count(model: nn.Module) -> int:
    """Parameters of FacT: the shared factors and every Sigma (head excluded)."""
    factors = getattr(model, FACTORS, None)
    shared = sum(p.numel() for p in factors.parameters()) if isinstance(factors, nn.Module) else 0
    return shared + sum(m.sigma.numel() for _, m in fact_layers(model))


def _unwrap(model: nn.Module, replace) -> list[str]:
    layers = fact_layers(model)
    if not layers:
        raise ModelError("the model holds no FacT layers")
    for name, m in layers:
        model.set_submodule(name, replace(m))
    delattr(model, FACTORS)
    return [n for n, _ in layers]


@torch.no_grad()
def merge_fact(model: nn.Module) -> nn.Module:
    """Fold every FacT update into its frozen weight (plain ``nn.Linear`` s again) and drop the shared factors."""
    _unwrap(model, lambda m: m.merged())
    return model


@torch.no_grad()
def fact_to_lora(model: nn.Module) -> nn.Module:
    """Rewrite every FacT layer as the :class:`~mimi.core.lora.LoRALinear` of the same update (alpha = rank, so
    ``B A`` is the update itself): its ``save_adapters`` file is a LoRA task that an ``AdapterBank`` serves.

    Each layer then stores ``r min(a, b) (in + out)`` numbers instead of sharing U and V, so the file is larger than
    the FacT one; the logits are the same (eval mode). The head is kept; only LoRA and the head are left trainable.
    """
    parts = {name: m.lora_factors() for name, m in fact_layers(model)}
    parts = {name: (a.detach().clone(), b.detach().clone()) for name, (a, b) in parts.items()}
    _unwrap(model, lambda m: m.base)
    apply_lora_layout(model, {name: {"rank": a.shape[0], "alpha": float(a.shape[0])} for name, (a, _) in parts.items()})
    for name, (a, b) in parts.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, LoRALinear)
        layer.lora_a.weight.copy_(a)
        layer.lora_b.weight.copy_(b)
    return model


def fact_metadata(model: nn.Module) -> dict[str, str]:
    """The metadata entry :data:`META` a task file of ``model`` needs to be served (see the module doc); ``{}`` for a
    model without FacT layers."""
    layers = sorted(fact_layers(model), key=lambda nm: nm[0])
    if not layers:
        return {}
    scale = layers[0][1].scale
    entry: dict[str, Any] = {"s": int(scale) if scale.is_integer() else scale}
    if len({m.factors.dim for _, m in layers}) > 1:  # several widths: which pair of factors each layer uses
        runs: list[list[int]] = []
        for _, m in layers:
            if runs and runs[-1][0] == m.factors.dim:
                runs[-1][1] += 1
            else:
                runs.append([m.factors.dim, 1])
        entry["w"] = runs
    return {META: json.dumps(entry, separators=(",", ":"))}


_FACTOR = re.compile(rf"{FACTORS}\.d(\d+)\.([uv])")


def _entry(meta: dict[str, str], layers: list[str]) -> tuple[float, list[int] | None]:
    """``(scale, width of each layer or None)`` from the file's :data:`META` entry; CheckpointError if it is bad."""
    fix = "export it again with this version of mimi (`mimi export RUN --out FILE`)"
    if META not in meta:
        raise CheckpointError(f"a FacT-TT task file without its {META!r} metadata entry (the scale s); {fix}")
    try:
        entry = json.loads(meta[META])
        scale, runs = entry["s"], entry.get("w")
        ok = isinstance(scale, int | float) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0
        widths = None if runs is None else [int(d) for d, n in runs for _ in range(int(n))]
    except (json.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError):
        ok, widths = False, None
    if not ok or (widths is not None and len(widths) != len(layers)):
        raise CheckpointError(f"a FacT-TT task file whose {META!r} metadata entry is damaged ({meta[META]!r}); {fix}")
    return float(scale), widths


def fact_lora_task(
    meta: dict[str, str], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, dict]] | None:
    """A FacT-TT task's trained tensors as the equal LoRA layers (alpha = rank, ``s`` folded into B) and their
    layout; every other tensor (the head) passed on. None where the tensors hold no FacT factors (e.g. a file saved
    after :func:`fact_to_lora`). See :meth:`mimi.methods.Method.lora_task`.

    Raises:
        CheckpointError: no :data:`META` entry (a file from before it), or factors and Sigmas that do not fit.
    """
    factors = {n: _FACTOR.fullmatch(n) for n in tensors if n.startswith(FACTORS + ".")}
    layers = sorted(n.removesuffix(".sigma") for n in tensors if n.endswith(".sigma"))
    if not factors and not layers:
        return None
    scale, widths = _entry(meta, layers)
    pairs: dict[int, dict[str, torch.Tensor]] = {}
    for name, m in factors.items():
        if m is None:
            raise CheckpointError(f"a FacT-TT task file with an unknown factor {name!r}; export it again")
        pairs.setdefault(int(m[1]), {})[m[2]] = tensors[name].float()
    r = next((t.shape[-1] for p in pairs.values() for t in p.values()), 0)
    fits = all(set(p) == {"u", "v"} and all(t.shape == (d, r) for t in p.values()) for d, p in pairs.items())
    if not (fits and pairs and layers and (widths is not None or len(pairs) == 1)):
        shapes = {n: tuple(tensors[n].shape) for n in factors}
        raise CheckpointError(
            f"a FacT-TT task file whose factors and Sigmas do not fit together ({shapes}, {len(layers)} Sigmas); "
            "export it again"
        )
    out = {n: t for n, t in tensors.items() if n not in factors and not n.endswith(".sigma")}
    layout: dict[str, dict] = {}
    for i, layer in enumerate(layers):
        d = widths[i] if widths is not None else next(iter(pairs))
        sigma = tensors[f"{layer}.sigma"].float()
        if d not in pairs or sigma.ndim != 2 or sigma.shape[0] % r or sigma.shape[1] % r:
            raise CheckpointError(
                f"a FacT-TT task file whose {layer}.sigma {tuple(sigma.shape)} does not fit rank {r} and width {d}; "
                "export it again"
            )
        a, b = lora_pair(pairs[d]["u"], pairs[d]["v"], sigma, scale)
        out[f"{layer}.lora_a.weight"], out[f"{layer}.lora_b.weight"] = a.contiguous(), b.contiguous()
        layout[layer] = {"rank": a.shape[0], "alpha": float(a.shape[0])}
    return out, layout


@dataclass
class FacTOptions(MethodOptions):
    """Options of ``fact-tt``: the rank is ``rank``, else the one nearest to a budget, else 8."""

    rank: int | None = option(
        None, "r, the inner size of U, V and every Sigma (default: nearest to the budget, else 8); at least 1"
    )
    scale: float = option(1.0, "s, the update's scale (the FacT code tunes it per task in 0.01..100; 1 is its mode)")
    dropout: float = option(0.1, "dropout on the factor path, after Sigma (0.1 in the FacT code, for every task)")
    init: Literal["code", "sigma-zero"] = option(
        "code", "code: U = 0, V and Sigmas drawn (the FacT code); sigma-zero: U and V drawn, Sigmas 0"
    )
    budget_params: int | None = option(
        None, "pick the rank whose parameters (2dr + N r^2, head excluded) are nearest to this"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank_or_budget(self.rank, self.budget_params)
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"scale must be a positive number, got {self.scale!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")


def resolve_fact_rank(model: nn.Module, options: FacTOptions, ctx: PrepareContext) -> int:
    """The rank from, in order: ``rank``, the option ``budget_params``, the run's budget (``--budget-params`` /
    ``--budget-dim``), else 8."""
    if options.rank is not None:
        return options.rank
    budget = options.budget_params if options.budget_params is not None else ctx.budget
    return fact_rank_for_budget(model, budget) if budget is not None else DEFAULT_RANK


@register("fact-tt")
class FacTTT(Method):
    description = (
        "FacT-TT: dW = s U Sigma_i V^T on the d x d blocks of qkv/proj/fc1/fc2, U and V shared by all blocks; "
        "rank from method_kwargs or nearest to the budget"
    )
    traits = Traits(servable=True, size_unit="rank", budget_sets="rank")  # served as LoRA (fact_lora_task)
    Options = FacTOptions

    def prepare(self, model: nn.Module, options: FacTOptions, ctx: PrepareContext) -> nn.Module:
        rank = resolve_fact_rank(model, options, ctx)
        return add_fact(
            model, rank=rank, scale=options.scale, dropout=options.dropout, init=options.init, seed=ctx.seed
        )

    def task_metadata(self, model: nn.Module) -> dict[str, str]:
        return fact_metadata(model)

    def lora_task(
        self, meta: dict[str, str], tensors: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict]] | None:
        return fact_lora_task(meta, tensors)

    def extra_info(self, model: nn.Module) -> dict[str, Any]:
        layers = fact_layers(model)
        factors = getattr(model, FACTORS, None)
        return {
            "fact_rank": next(iter(factors.values())).rank if isinstance(factors, nn.ModuleDict) else 0,
            "fact_scale": layers[0][1].scale if layers else 0.0,
            "fact_matrices": sum(m.matrices for _, m in layers),
            "fact_layers": len(layers),
            "fact_params": fact_param_count(model),
        }
