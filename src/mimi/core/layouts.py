"""Where a transformer block keeps its branches: one description per block layout, in this one place.

mimi speaks of a block's two branches by role (``attn``, ``mlp``) and of its linear layers by timm's names
(``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``). A :class:`BlockLayout` says what those are called in a
family's blocks: the attention and MLP children, the LayerScale after each (an adapter on a branch output sits
before it, as in timm), and the layers behind each timm layer name (``transformers`` splits ``qkv`` into three).
Adapters, LoRA and every method built on them read blocks through :func:`block_layout` and never name a family.

A block is a module with both children of one layout; a layout's attention child may return a tuple (Hugging Face
attention modules return ``(output, weights)``), which :class:`mimi.core.adapters.AdaptedBranch` handles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class BlockLayout:
    """The names of one block layout's branches and layers.

    Attributes:
        name: what the layout is known as (``timm``, ``transformers``, ``transformers-clip``).
        attn: the attention branch's child name.
        mlp: the MLP branch's child name.
        scales: the LayerScale children after the attention and MLP branches, where the layout has them.
        layers: timm layer name -> this layout's layer names (a timm name absent here is the same in this layout).
    """

    name: str
    attn: str
    mlp: str
    scales: tuple[str, str] = ("", "")
    layers: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def branch(self, role: str) -> str:
        """The child name of branch ``role`` (``attn`` or ``mlp``)."""
        return {"attn": self.attn, "mlp": self.mlp}[role]

    def scale(self, role: str) -> str:
        """The LayerScale child after branch ``role``, or ``""``."""
        return self.scales[0 if role == "attn" else 1]

    def layer_names(self, target: str) -> tuple[str, ...]:
        """This layout's layers for a timm layer name (``attn.qkv`` -> q, k and v projections in ``transformers``)."""
        if target in self.layers:
            return self.layers[target]
        role, _, rest = target.partition(".")
        if rest and role in ("attn", "mlp"):
            return (f"{self.branch(role)}.{rest}",)
        return (target,)


def _hf(name: str, attn: str, out: str, scales: tuple[str, str] = ("", "")) -> BlockLayout:
    qkv = tuple(f"{attn}.{p}_proj" for p in "qkv")
    return BlockLayout(name, attn, "mlp", scales, {"attn.qkv": qkv, "attn.proj": (f"{attn}.{out}",)})


#: Every block layout mimi knows, tried in this order. timm's ViT, DeiT, DINOv2, Swin, EVA, ...: ``attn`` and
#: ``mlp``, LayerScale ``ls1``/``ls2``. ``transformers``' ViT, DeiT, DINOv2 (``layer_scale1``/``layer_scale2``) and
#: Swin: ``attention`` with ``q_proj``/``k_proj``/``v_proj``/``o_proj``; CLIP's vision tower: ``self_attn`` with
#: ``out_proj``.
LAYOUTS: tuple[BlockLayout, ...] = (
    BlockLayout("timm", "attn", "mlp", ("ls1", "ls2")),
    _hf("transformers", "attention", "o_proj", ("layer_scale1", "layer_scale2")),
    _hf("transformers-clip", "self_attn", "out_proj"),
)


def block_layout(module: nn.Module) -> BlockLayout | None:
    """The layout ``module`` is a transformer block of (both its branch children exist), else None."""
    for layout in LAYOUTS:
        if isinstance(getattr(module, layout.attn, None), nn.Module) and isinstance(
            getattr(module, layout.mlp, None), nn.Module
        ):
            return layout
    return None
