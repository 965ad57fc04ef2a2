"""int8 task files: adapter and LoRA weights as int8 with one float16 scale per output channel (symmetric).

A weight ``W`` of shape ``(out, in)`` is stored as ``q = round(W / s)`` in int8 (``|q| <= 127``) and ``s`` (one float16
per row, ``s_i = max_j |W_ij| / 127`` rounded up to float16, so no entry is clipped): the error of every entry is at
most half a step, ``s_i / 2``. Biases, 1-d tensors and the classifier head stay in float16 (they are a few hundred
values, and the head's errors reach the logits undamped). Reading dequantises once, to float32.

The codes keep the weight's name; the scales of all int8 weights are one float16 tensor (:data:`SCALES`), in the
sorted order of the int8 tensors' names (a weight of ``out`` rows takes the next ``out`` values). One tensor, and no
list of names, because a MiMi task at r=3 has ~40 weights of ~4 rows x 384: one safetensors entry per scale vector
(~100 bytes of header each) and a list of names would add ~5 KB to a ~95 KB file.
"""

from __future__ import annotations

import torch

from mimi.core.errors import CheckpointError

SCALES = "__int8_scales__"  # every int8 weight's row scales, concatenated in the sorted order of their names
QMAX = 127
META_KEY = "int8"  # metadata entry of an int8 file: the scheme
SCHEME = "symmetric, one float16 scale per output channel"


def row_scales(weight: torch.Tensor) -> torch.Tensor:
    """One float16 scale per output channel (row) of a 2-d weight, ``max |row| / 127`` rounded up to float16.

    Rounding up keeps ``|W / s| <= 127`` for the float16 scale actually stored. An all-zero row gets scale 1 (its
    codes are 0). A row whose scale would underflow float16 gets float16's smallest positive value.
    """
    amax = weight.detach().abs().amax(dim=1).to(torch.float32)  # (out,)
    if not torch.isfinite(amax).all():
        raise CheckpointError("a weight holds inf or NaN; it cannot be stored as int8")
    exact = amax / QMAX
    s = exact.to(torch.float16)
    below = s.to(torch.float32) < exact  # float16 rounded down: step to the next float16 value up
    s = torch.where(below, torch.nextafter(s, torch.full_like(s, torch.inf)), s)
    tiny = torch.finfo(torch.float16).smallest_normal * 2.0**-10  # smallest subnormal
    s = torch.where((s == 0) & (amax > 0), torch.full_like(s, tiny), s)
    s = torch.where(amax == 0, torch.ones_like(s), s)
    if torch.isinf(s).any():
        raise CheckpointError("a weight exceeds 127 * 65504 in magnitude; it cannot be stored as int8")
    return s


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)``: int8 codes ``(out, in)`` and float16 scales ``(out,)`` of a 2-d weight."""
    if weight.ndim != 2:
        raise ValueError(f"int8 quantisation is per output channel of a 2-d weight, got shape {tuple(weight.shape)}")
    s = row_scales(weight)
    codes = torch.round(weight.detach().to(torch.float32) / s.to(torch.float32)[:, None])
    return codes.clamp_(-QMAX, QMAX).to(torch.int8), s


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 weights from int8 codes and their float16 row scales."""
    return codes.to(torch.float32) * scales.to(torch.float32)[:, None]


def quantize_state(
    tensors: dict[str, torch.Tensor], *, keep_float: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors as an int8 task file stores them, and the metadata entry that says which ones are int8.

    Every 2-d floating-point tensor not in ``keep_float`` (the head) becomes int8 + scales; every other
    floating-point tensor becomes float16.
    """
    out: dict[str, torch.Tensor] = {}
    scales = {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            out[name] = t
        elif t.ndim == 2 and name not in keep_float:
            out[name], scales[name] = quantize(t)
        else:
            out[name] = t.to(torch.float16)
    if scales:
        out[SCALES] = torch.cat([scales[n] for n in sorted(scales)])
    return out, {META_KEY: SCHEME}


def scale_rows(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each int8 weight's float16 row scales, by name, cut from the one :data:`SCALES` tensor (empty: no int8)."""
    names = sorted(k for k, t in tensors.items() if t.dtype == torch.int8)
    flat = tensors.get(SCALES, torch.zeros(0, dtype=torch.float16))
    rows = [tensors[n].shape[0] if tensors[n].ndim == 2 else -1 for n in names]
    if min(rows, default=0) < 0 or sum(rows) != flat.numel():
        raise ValueError(f"{flat.numel()} scales for int8 weights of {rows} rows")
    return dict(zip(names, flat.split(rows))) if names else {}


def dequantize_state(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: object) -> dict[str, torch.Tensor]:
    """The tensors of a file with its int8 ones dequantised to float32 and the scales dropped (others as stored)."""
    if META_KEY not in meta:
        return tensors
    if meta[META_KEY] != SCHEME:
        raise CheckpointError(f"{path}: int8 scheme {meta[META_KEY]!r} is not {SCHEME!r}; a newer mimi wrote it?")
    try:
        scales = scale_rows(tensors)
    except ValueError as e:
        raise CheckpointError(f"{path}: a damaged int8 task file (its scales do not fit: {e}); export it again") from e
    out = {k: v for k, v in tensors.items() if k != SCALES}
    for name, s in scales.items():
        out[name] = dequantize(tensors[name], s)
    return out
