"""The frozen backbone in int8 for inference: its linear layers quantised once, every adapter left float32.

A bank (and ``mimi eval`` / ``predict`` / ``serve``) spends almost all of its time in the frozen backbone's
``qkv`` / ``proj`` / ``fc1`` / ``fc2`` matmuls. :func:`quantize_backbone` swaps those layers for int8 ones: int8
weights with one scale per output channel, activations quantised on the fly (dynamic int8), int32 accumulation.
Anything a task trains stays a float32 side path beside the layer it adapts: adapters, LoRA updates (never merged
into an int8 weight, where the update would be rounded away) and heads; so do the patch embedding, the norms and
the attention itself.

Two engines, measured side by side on real images by ``benchmarks/int8_backbone_engines.py`` (README, "An int8
backbone"; ViT-S/14 at 56 px, 2 cores: float32 123-160 images/s at batch 64):

* ``quantize_dynamic`` (the default): PyTorch's ``torch.ao.quantization.quantize_dynamic`` with per-channel weights
  (fbgemm / oneDNN kernels; the activation scale is one per call, so an image's features depend slightly on the
  other images of its batch). 1.8-1.9x float32 at batch 64, 2.2-2.9x at batch 1-8. PyTorch's module quantises
  activations to 7 bits (``reduce_range=True``: CPUs without VNNI sum pairs of uint8 x int8 products in int16,
  which 8 bits can overflow); on a CPU with VNNI (``torch.cpu._is_vnni_supported()``, AVX512-VNNI or AVX-VNNI) the
  products accumulate in int32, so :class:`FullRangeDynamicLinear` uses all 8 bits, at the same speed. That bit is
  what DINOv2's outlier channels need: on fmnist_count 3.95 points lost with 7 bits, 0.35 with 8
  (``benchmarks/int8_backbone.py``). PyTorch marks the API deprecated
  in favour of torchao, whose CPU path below is not yet faster than float32 without ``torch.compile``; the choice
  lives here alone, so changing it later changes one function.
* ``torchao``: torchao's ``Int8DynamicActivationInt8WeightConfig`` (one activation scale per row: an image's
  features do not depend on its batch). Closer to float32 (feature cosine 0.9992 against 0.9957; within 0.4 points
  on the same three tasks), but in eager
  mode on a CPU its quantise / dequantise ops cost more than the int8 matmuls save: 0.6-1.0x float32.

A bank records where its sites and linear layers are before quantising (names and shapes, no modules), so engines
that swap a layer's module class work as well as those that only swap its weight.

Both run on the CPU only: :func:`check_backbone_dtype` refuses another device in one line.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd

from mimi.core.adapters import Adapter, find_blocks
from mimi.core.errors import ConfigError, ModelError
from mimi.core.quiet import quiet_pytree_notes

#: ``backbone_dtype`` values: ``float32`` (the default: the backbone as trained) and ``int8``.
BACKBONE_DTYPES = ("float32", "int8")
#: Quantisation engines for ``int8``; the first is the default.
ENGINES = ("quantize_dynamic", "torchao")


@dataclass(frozen=True)
class QuantizedBackbone:
    """What :func:`quantize_backbone` did: the engine, the layers it quantised, their weight bytes before/after."""

    dtype: str
    engine: str | None
    layers: int
    float_bytes: int
    int8_bytes: int
    activation_bits: int = 8

    def describe(self) -> str:
        """One line for start-up output: ``int8 backbone (quantize_dynamic): 48 linear layers, weights 84.9 MB ...``."""
        if self.dtype == "float32":
            return "float32 backbone"
        mb = 1e6
        return (
            f"int8 backbone ({self.engine}): {self.layers} linear layers, weights {self.float_bytes / mb:.1f} MB -> "
            f"{self.int8_bytes / mb:.1f} MB, {self.activation_bits}-bit activations; adapters, LoRA and heads stay "
            "float32"
        )


def check_backbone_dtype(dtype: str, device: torch.device | str = "cpu", engine: str | None = None) -> str:
    """``dtype`` if it is known and can run on ``device``; else :class:`ConfigError` in one line naming the fix."""
    if dtype not in BACKBONE_DTYPES:
        raise ConfigError(f"unknown backbone dtype {dtype!r}; choose one of {', '.join(BACKBONE_DTYPES)}")
    if engine is not None and engine not in ENGINES:
        raise ConfigError(f"unknown int8 engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if dtype == "int8" and torch.device(device).type != "cpu":
        raise ConfigError(
            f"an int8 backbone runs on the CPU (its int8 kernels are CPU kernels), not on {device}; "
            "use --device cpu, or --backbone-dtype float32 on a GPU"
        )
    if dtype == "int8" and (engine or ENGINES[0]) == "quantize_dynamic" and not int8_kernels():
        raise ConfigError(
            "this build of PyTorch has no int8 CPU kernels (torch.backends.quantized.supported_engines lists none); "
            "use --backbone-dtype float32"
        )
    return dtype


def int8_kernels() -> list[str]:
    """PyTorch's quantised CPU kernel libraries in this build (``x86``, ``fbgemm``, ``onednn``, ``qnnpack``)."""
    return [e for e in torch.backends.quantized.supported_engines if e != "none"]


def backbone_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The backbone's own linear layers in its transformer blocks, by name (what inference quantises).

    Skipped: adapters (whole subtrees); in a wrapper of a backbone layer (our ``LoRALinear`` with its ``base``, a
    PEFT layer with its ``base_layer``) everything but that layer; and layers outside the blocks (the classifier, a
    patch embedding written as a linear layer). Told apart by module type, not by ``requires_grad``: a loaded run
    has every tensor frozen.
    """
    for block_name, block in find_blocks(model):
        yield from _block_linears(block, block_name)


def _block_linears(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Linear]]:
    if isinstance(module, Adapter):
        return
    if type(module) is nn.Linear:
        yield prefix, module
        return
    base = next((a for a in ("base", "base_layer") if isinstance(getattr(module, a, None), nn.Module)), None)
    children = [(base, getattr(module, base))] if base else module.named_children()
    for name, child in children:
        yield from _block_linears(child, f"{prefix}.{name}")


def quantize_backbone(model: nn.Module, dtype: str = "int8", *, engine: str | None = None) -> QuantizedBackbone:
    """Quantise ``model``'s backbone linear layers (:func:`backbone_linears`) in place; ``float32`` leaves them.

    Call it once, on the CPU, before inference; adapters and LoRA updates added later are float32 modules beside
    the quantised layers and are never touched.

    Raises:
        ConfigError: an unknown dtype or engine, or a model not on the CPU.
        ModelError: the engine is not installed, or the model has no linear layer in transformer blocks.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    check_backbone_dtype(dtype, device, engine)
    if dtype == "float32":
        return QuantizedBackbone("float32", None, 0, 0, 0)
    engine = engine or ENGINES[0]
    layers = dict(backbone_linears(model))
    if not layers:
        raise ModelError(f"{type(model).__name__} has no linear layer in transformer blocks to quantise")
    before = sum(m.weight.numel() * m.weight.element_size() for m in layers.values())
    after = sum(m.weight.numel() + 4 * m.out_features for m in layers.values())  # int8 codes + a float32 scale per row
    bits = 8
    if engine == "torchao":
        _torchao(model, set(map(id, layers.values())))
    else:
        bits = _quantize_dynamic(model, layers)
    return QuantizedBackbone("int8", engine, len(layers), before, after, bits)


def _torchao(model: nn.Module, ids: set[int]) -> None:
    try:
        with quiet_pytree_notes():
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as e:
        raise ModelError(f"an int8 backbone needs torchao ({e}); pip install 'mimi-adapters[int8]'") from e
    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, _fqn: id(m) in ids)


def _quantize_dynamic(model: nn.Module, layers: dict[str, nn.Linear]) -> None:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao on every call
        warnings.simplefilter("ignore")
        quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in layers}, inplace=True)
    if not vnni():
        return 7
    for name in layers:
        model.get_submodule(name).__class__ = FullRangeDynamicLinear
    return 8


def vnni() -> bool:
    """Whether this CPU multiplies uint8 x int8 with int32 accumulation (AVX512-VNNI or AVX-VNNI)."""
    check = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(check and check())


class FullRangeDynamicLinear(nnqd.Linear):
    """PyTorch's dynamic int8 linear layer with 8-bit activations (``reduce_range=False``), for CPUs with VNNI.

    Without VNNI, x86 int8 kernels add pairs of uint8 x int8 products in int16 (``vpmaddubsw``), which saturates
    unless activations keep to 7 bits; PyTorch's module always asks for 7. VNNI accumulates in int32, so the eighth
    bit is free: half the activation rounding error at the same speed.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed_params
        if packed.dtype != torch.qint8:
            return super().forward(x)
        return torch.ops.quantized.linear_dynamic(x, packed._packed_params, reduce_range=False).to(x.dtype)
