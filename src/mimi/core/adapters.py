"""Bottleneck adapters inserted into any transformer whose blocks :mod:`mimi.core.layouts` describes (timm's ``attn`` and
``mlp``, ``transformers``' ``attention`` / ``self_attn`` and ``mlp``).

The backbone is never copied: each adapted branch module is wrapped in place by an
:class:`AdaptedBranch` that holds the original module and an :class:`Adapter`.

* sequential (the paper's): ``x = x + A(branch(x))`` where ``A(h) = h + up(act(down(h)))``; the adapter sits
  after the branch's own output scaling (e.g. DINOv2 LayerScale ``ls1``/``ls2``) and before the residual add.
* parallel (AdaptFormer): ``x = x + branch(x) + s * up(act(down(x)))`` where ``x`` is the branch input.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from mimi.core.errors import ConfigError, ModelError
from mimi.core.layouts import block_layout
from mimi.core.modules import classifier

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "identity": nn.Identity}
_ROLES = ("attn", "mlp")


@dataclass
class AdapterConfig:
    """How adapters are built and placed.

    Args:
        hidden_dim: hidden size of every adapter at insertion. Exclusive with ``reduction``.
        reduction: hidden size = round(branch width / reduction) (e.g. 4 gives d/4). Exclusive with ``hidden_dim``.
            When both are None, ``reduction=4`` is used.
        placement: "sequential" (after the branch, paper) or "parallel" (beside the branch, AdaptFormer).
        act: activation between down and up projections ("gelu", "relu", "silu", "identity").
        bias: whether down/up projections carry biases.
        scale: multiplier of the adapter output (AdaptFormer's ``s``); 1.0 for the paper's adapters.
        dropout: dropout on the hidden activation.
        targets: where in each block adapters go: branches ("attn", "mlp") or linear layers inside them
            ("attn.qkv", "mlp.fc1", ...). An adapter on a linear layer with placement "parallel", act "identity"
            and no bias is a LoRA update whose rank MiMi can prune (``--method mimi-lora``).
        train_norms: also train the backbone's normalisation layers.
        init_seed: seed of the down-projection initialisation (None: use torch's global RNG).
    """

    hidden_dim: int | None = None
    reduction: float | None = None
    placement: Literal["sequential", "parallel"] = "sequential"
    act: str = "gelu"
    bias: bool = True
    scale: float = 1.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=("attn", "mlp"))
    train_norms: bool = False
    init_seed: int | None = None

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.hidden_dim is not None and self.reduction is not None:
            raise ConfigError("AdapterConfig: give hidden_dim or reduction, not both")
        if self.hidden_dim is None and self.reduction is None:
            self.reduction = 4.0
        if self.hidden_dim is not None and (not isinstance(self.hidden_dim, int) or self.hidden_dim < 1):
            raise ConfigError(f"AdapterConfig: hidden_dim must be a positive integer, got {self.hidden_dim!r}")
        if self.reduction is not None and not self.reduction > 0:
            raise ConfigError(f"AdapterConfig: reduction must be > 0, got {self.reduction!r}")
        if self.placement not in ("sequential", "parallel"):
            raise ConfigError(f"AdapterConfig: placement must be 'sequential' or 'parallel', got {self.placement!r}")
        if self.act not in _ACTIVATIONS:
            raise ConfigError(f"AdapterConfig: act must be one of {sorted(_ACTIVATIONS)}, got {self.act!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"AdapterConfig: dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets or any(t.split(".")[0] not in _ROLES for t in self.targets):
            raise ConfigError(
                f"AdapterConfig: targets must be branches {_ROLES} or layers inside them ('attn.qkv'), "
                f"got {self.targets!r}"
            )

    def hidden_for(self, width: int) -> int:
        """Hidden size of a new adapter on a branch of the given width."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        return max(1, round(width / self.reduction))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"AdapterConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


class Adapter(nn.Module):
    """``x -> scale * up(dropout(act(down(x))))``: the residual term of a bottleneck adapter.

    ``neuron_ids`` (a non-persistent buffer) remembers the original index of every surviving hidden
    neuron, so that pruning history and nested random scores survive physical shrinking.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int,
        *,
        act: str = "gelu",
        bias: bool = True,
        scale: float = 1.0,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.down = nn.Linear(in_dim, hidden_dim, bias=bias)
        self.act = _ACTIVATIONS[act]()
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(hidden_dim, out_dim, bias=bias)
        self.scale = scale
        self.register_buffer("neuron_ids", torch.arange(hidden_dim), persistent=False)
        with torch.no_grad():
            bound = 1.0 / in_dim**0.5  # nn.Linear's default fan-in bound, drawn from our own generator
            self.down.weight.uniform_(-bound, bound, generator=generator)
            nn.init.zeros_(self.up.weight)  # zero up-projection: the adapted model starts as the backbone
            if bias:
                nn.init.zeros_(self.down.bias)
                nn.init.zeros_(self.up.bias)

    @property
    def hidden_dim(self) -> int:
        return self.down.out_features

    @property
    def in_dim(self) -> int:
        return self.down.in_features

    @property
    def out_dim(self) -> int:
        return self.up.out_features

    def num_params(self, hidden_dim: int | None = None) -> int:
        """Parameters of this adapter with the given (default: current) hidden size; 0 if it has no neuron."""
        h = self.hidden_dim if hidden_dim is None else hidden_dim
        if h == 0:
            return 0
        return h * self.neuron_cost() + (self.out_dim if self.up.bias is not None else 0)

    def neuron_cost(self) -> int:
        """Parameters removed with one hidden neuron: its row of ``down``, column of ``up``, and down bias."""
        return self.in_dim + self.out_dim + (1 if self.down.bias is not None else 0)

    @torch.no_grad()
    def shrink_(self, keep: torch.Tensor) -> None:
        """Physically keep only the hidden neurons at indices ``keep`` (new, smaller Parameters)."""
        keep = torch.as_tensor(keep, dtype=torch.long, device=self.down.weight.device).sort().values
        self.down.weight = nn.Parameter(self.down.weight[keep].clone(), requires_grad=self.down.weight.requires_grad)
        if self.down.bias is not None:
            self.down.bias = nn.Parameter(self.down.bias[keep].clone(), requires_grad=self.down.bias.requires_grad)
        self.up.weight = nn.Parameter(self.up.weight[:, keep].clone(), requires_grad=self.up.weight.requires_grad)
        self.down.out_features = self.up.in_features = int(keep.numel())
        self.neuron_ids = self.neuron_ids[keep]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.down(x))
        if self.drop.p > 0:  # a p=0 dropout returns its input: skip the call (measurable on tiny adapters)
            h = self.drop(h)
        out = self.up(h)
        return out if self.scale == 1.0 else self.scale * out


class AdaptedBranch(nn.Module):
    """Wraps one branch module of a block (``attn``/``ls1`` or ``mlp``/``ls2``) with an adapter."""

    def __init__(self, branch: nn.Module, adapter: Adapter, *, role: str, placement: str, config: AdapterConfig):
        super().__init__()
        self.branch = branch
        self.adapter = adapter
        self.role = role
        self.placement = placement
        self.config = config

    def forward(self, *args, **kwargs):
        # A branch is called as its block calls it: timm passes x, transformers' CLIP passes hidden_states= only,
        # and transformers' attention modules return (output, weights): the adapter sees the output alone.
        x = args[0] if args else kwargs["hidden_states"]
        y = self.branch(*args, **kwargs)
        rest = None
        if isinstance(y, tuple):
            y, rest = y[0], y[1:]
        out = self.adapter(y if self.placement == "sequential" else x)
        if out.dtype != y.dtype:  # autocast: let the sum promote as usual
            out = y + out
        else:
            # The adapter's output is a fresh tensor that nothing saved for backward: add the branch into it in
            # place (one allocation less per site; a + b == b + a bit for bit).
            out = out.add_(y)
        return out if rest is None else (out, *rest)


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _slot(block: nn.Module, role: str, placement: str) -> str:
    """Attribute of the block to wrap: the branch output after any LayerScale (sequential), else the branch.
    ``block`` is one that :func:`find_blocks` found, so it has a layout."""
    layout = block_layout(block)
    if "." in role:  # a layer inside a branch: wrapped where it is
        names = layout.layer_names(role)
        if len(names) != 1:
            raise ModelError(f"{role} is {len(names)} layers in {type(block).__name__} ({', '.join(names)}); name one")
        return names[0]
    scaled = layout.scale(role)
    if placement == "sequential" and scaled and isinstance(getattr(block, scaled, None), nn.Module):
        return scaled
    return layout.branch(role)


def _branch_dims(block: nn.Module, role: str) -> tuple[int, int]:
    name = _slot(block, role, "parallel")  # the branch itself (or the layer), not its LayerScale
    try:
        lins = _linears(block.get_submodule(name))
    except AttributeError as e:
        raise ModelError(f"{type(block).__name__} has no submodule {name!r} to put an adapter on") from e
    if not lins:
        raise ModelError(f"cannot find the width of {type(block).__name__}.{name}: it holds no nn.Linear")
    return lins[0].in_features, lins[-1].out_features


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Transformer blocks of a model: modules with both branch children of a :mod:`mimi.core.layouts` layout (timm's
    ``attn`` and ``mlp``, ``transformers``' ``attention`` or ``self_attn`` and ``mlp``)."""
    return [(name, m) for name, m in model.named_modules() if block_layout(m) is not None]


@dataclass(frozen=True)
class AdapterSite:
    """Where one adapter goes: the block attribute it wraps and the widths it reads and writes.

    Attributes:
        name: the adapter's module name once inserted (``<block>.<slot>.adapter``), as in checkpoints.
        block: the transformer block's module name.
        role: "attn" or "mlp".
        slot: the block attribute that is wrapped (``attn``/``mlp``, or ``ls1``/``ls2`` after a LayerScale).
        in_dim: width the adapter reads (the branch output when sequential, its input when parallel).
        out_dim: width the adapter writes (the branch output).
    """

    name: str
    block: str
    role: str
    slot: str
    in_dim: int
    out_dim: int


def adapter_sites(model: nn.Module, config: AdapterConfig) -> list[AdapterSite]:
    """Every site ``config`` puts an adapter on in ``model`` (a bare backbone), in model order.

    Raises:
        ModelError: if the model has no transformer block with ``attn`` and ``mlp``.
    """
    blocks = find_blocks(model)
    if not blocks:
        raise ModelError(
            f"{type(model).__name__} has no transformer block with 'attn' and 'mlp' submodules; "
            "use a ViT-family timm model (vit_*, deit_*, swin_*, ...) or a transformers one (transformers:NAME)"
        )
    sites = []
    for block_name, block in blocks:
        layout = block_layout(block)
        # a layer target is each layer the block has under that timm name (transformers splits attn.qkv in three)
        roles = [r for t in config.targets for r in (layout.layer_names(t) if "." in t else (t,))]
        for role in roles:
            in_dim, out_dim = _branch_dims(block, role)
            if config.placement == "sequential":
                in_dim = out_dim  # the adapter reads the branch output
            slot = _slot(block, role, config.placement)
            prefix = f"{block_name}.{slot}" if block_name else slot
            sites.append(AdapterSite(f"{prefix}.adapter", block_name, role, slot, in_dim, out_dim))
    return sites


def new_adapter(site: AdapterSite, config: AdapterConfig, hidden_dim: int, generator=None) -> Adapter:
    """An :class:`Adapter` for ``site`` built as ``config`` says, with the given hidden size."""
    return Adapter(
        site.in_dim,
        site.out_dim,
        hidden_dim,
        act=config.act,
        bias=config.bias,
        scale=config.scale,
        dropout=config.dropout,
        generator=generator,
    )


def add_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Insert adapters into every transformer block and freeze all but adapters and the classifier head.

    Args:
        model: a timm model (ViT, DeiT, DINOv2, Swin, ...) whose blocks have ``attn`` and ``mlp``.
        config: the adapter configuration.

    Returns:
        The same model, modified in place.

    Raises:
        ModelError: if the model has no such block or already holds adapters.
    """
    if adapters(model):
        raise ModelError("the model already holds adapters; build a fresh backbone before add_adapters")
    generator = None
    if config.init_seed is not None:
        generator = torch.Generator().manual_seed(config.init_seed)
    for site in adapter_sites(model, config):
        block = model.get_submodule(site.block)
        ref = next(block.parameters())
        adapter = new_adapter(site, config, config.hidden_for(site.out_dim), generator)
        adapter = adapter.to(device=ref.device, dtype=ref.dtype)
        branch = block.get_submodule(site.slot)
        block.set_submodule(
            site.slot, AdaptedBranch(branch, adapter, role=site.role, placement=config.placement, config=config)
        )
    freeze_backbone(model, train_norms=config.train_norms)
    return model


def freeze_backbone(model: nn.Module, *, train_norms: bool = False) -> None:
    """Freeze every parameter except adapters, the classifier head and (optionally) normalisation layers."""
    model.requires_grad_(False)
    for _, adapter in adapters(model):
        adapter.requires_grad_(True)
    head = classifier(model)
    if head is not None:
        head.requires_grad_(True)
    if train_norms:
        for m in model.modules():
            if isinstance(m, nn.LayerNorm | nn.GroupNorm | nn.BatchNorm2d):
                m.requires_grad_(True)


def _wrappers(model: nn.Module) -> Iterator[tuple[str, AdaptedBranch]]:
    for name, m in model.named_modules():
        if isinstance(m, AdaptedBranch):
            yield name, m


def adapters(model: nn.Module) -> list[tuple[str, Adapter]]:
    """Every adapter of the model, as ``(module name, Adapter)`` in model order."""
    return [(f"{name}.adapter", w.adapter) for name, w in _wrappers(model)]


def adapter_config(model: nn.Module) -> AdapterConfig | None:
    """The configuration the model's adapters were built with (None if it holds none)."""
    return next((w.config for _, w in _wrappers(model)), None)


def adapter_roles(model: nn.Module) -> dict[str, str]:
    """Role ("attn" or "mlp") of each adapter, by adapter name."""
    return {f"{name}.adapter": w.role for name, w in _wrappers(model)}


def remove_adapter(model: nn.Module, name: str) -> None:
    """Remove one adapter: its wrapper is replaced by the original branch module."""
    wrapper_name = name.removesuffix(".adapter")
    try:
        wrapper = model.get_submodule(wrapper_name)
    except AttributeError:
        wrapper = None
    if not isinstance(wrapper, AdaptedBranch):
        raise ModelError(f"{name!r} is not an adapter of this model")
    model.set_submodule(wrapper_name, wrapper.branch)


@torch.no_grad()
def merge_linear_adapters(model: nn.Module) -> nn.Module:
    """Fold every linear adapter (parallel, identity activation, on an ``nn.Linear``) into its layer's weights.

    ``W x + b + s (U (D x + d) + u) = (W + s U D) x + (b + s (U d + u))``: the model computes the same function with
    no extra op (in eval mode). Other adapters are left as they are. In place; returns ``model``.
    """
    for name, wrapper in list(_wrappers(model)):
        a, base = wrapper.adapter, wrapper.branch
        if not (wrapper.placement == "parallel" and isinstance(a.act, nn.Identity) and isinstance(base, nn.Linear)):
            continue
        merged = copy.deepcopy(base)
        merged.weight += (a.scale * a.up.weight @ a.down.weight).to(merged.weight.dtype)
        shift = a.up.weight @ a.down.bias if a.down.bias is not None else 0
        shift = shift + (a.up.bias if a.up.bias is not None else 0)
        if isinstance(shift, torch.Tensor):
            if merged.bias is None:
                merged.bias = nn.Parameter(torch.zeros_like(merged.weight[:, 0]), requires_grad=False)
            merged.bias += a.scale * shift.to(merged.bias.dtype)
        model.set_submodule(name, merged)
    return model


def adapter_param_count(model: nn.Module) -> int:
    """Parameters held by all adapters together."""
    return sum(a.num_params() for _, a in adapters(model))


def uniform_adapter_params(model: nn.Module, hidden_dim: int, *, targets: tuple[str, ...] = ("attn", "mlp")) -> int:
    """Parameters of sequential adapters (with biases) of one hidden size on every block of ``model``.

    The common currency of budgets: ``--budget-dim 8`` means "as many parameters as r=8 adapters everywhere".
    """
    total = 0
    for _, block in find_blocks(model):
        for role in targets:
            d = _branch_dims(block, role)[1]
            total += hidden_dim * (2 * d + 1) + d if hidden_dim > 0 else 0
    return total


def count_trainable(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (adapters + head + anything else left trainable)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
