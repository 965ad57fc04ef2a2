"""int8 task files: adapter and LoRA weights as int8 with one float16 scale per output channel (symmetric).

A weight ``W`` of shape ``(out, in)`` is stored as ``q = round(W / s)`` in int8 (``|q| <= 127``) and ``s`` (one float16
per row, ``s_i = max_j |W_ij| / 127`` rounded up to float16, so no entry is clipped): the error of every entry is at
most half a step, ``s_i / 2``. Biases, 1-d tensors and the classifier head stay in float16 (they are a few hundred
values, and the head's errors reach the logits undamped). Reading dequantises once, to float32.

The file is packed: three tensors hold everything, in the sorted order of the trained tensors' names, and one
metadata entry (:data:`LAYOUT`, ``{module: {param: shape}}``) says what they hold. :data:`CODES` is every int8
weight's codes, :data:`SCALES` their row scales, :data:`FLOATS` every float16 tensor (biases, the head); a tensor is
int8 when it is 2-d and not the head's. A MiMi task at r=3 has ~80 tensors of a few hundred values: one safetensors
entry each (~90 bytes of header) and the list of trainable names beside them came to ~10 KB of a ~105 KB file,
the packed layout to ~2 KB. Files of the first int8 layout (one entry per tensor) are still read.
"""

from __future__ import annotations

import json
import math

import torch

from mimi.core.errors import CheckpointError

SCALES = "__int8_scales__"  # every int8 weight's row scales, concatenated in the sorted order of their names
CODES = "__int8_codes__"  # every int8 weight's codes, flattened and concatenated in the same order
FLOATS = "__float16__"  # every other floating-point tensor (biases, the head), flattened, in sorted name order
LAYOUT = "int8_layout"  # metadata: {module: {param: shape}} of the packed tensors, in the order they are packed
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


def _is_int8(name: str, shape: list[int] | torch.Size, head: set[str]) -> bool:
    """The rule both sides apply: a 2-d tensor that is not the head's is int8, every other one float16."""
    return len(shape) == 2 and name not in head


def quantize_state(
    tensors: dict[str, torch.Tensor], *, keep_float: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The packed tensors of an int8 task file and its metadata entries (the scheme and the layout).

    Every 2-d floating-point tensor not in ``keep_float`` (the head, recorded as the file's ``head`` entry) becomes
    int8 + scales; every other floating-point tensor becomes float16. Tensors that are not floating point keep
    their own entries.
    """
    out: dict[str, torch.Tensor] = {}
    codes, scales, floats = [], [], []
    layout: dict[str, dict[str, list[int]]] = {}
    for name in sorted(tensors):  # names sharing a module are contiguous in sorted order: the layout groups them
        t = tensors[name].detach()
        if not t.is_floating_point():
            out[name] = t
            continue
        module, _, param = name.rpartition(".")
        layout.setdefault(module, {})[param] = list(t.shape)
        if _is_int8(name, t.shape, keep_float):
            q, s = quantize(t)
            codes.append(q.reshape(-1))
            scales.append(s)
        else:
            floats.append(t.to(torch.float16).reshape(-1))
    for key, parts in ((CODES, codes), (SCALES, scales), (FLOATS, floats)):
        if parts:
            out[key] = torch.cat(parts).contiguous()
    return out, {META_KEY: SCHEME, LAYOUT: json.dumps(layout, separators=(",", ":"))}


def layout_names(meta: dict[str, str]) -> list[str]:
    """The names of the tensors packed in an int8 file, in packed order (empty: not a packed file)."""
    return [name for name, _ in _layout(meta, "the file")]


def _layout(meta: dict[str, str], path: object) -> list[tuple[str, list[int]]]:
    if LAYOUT not in meta:
        return []
    try:
        entries = []
        for module, params in json.loads(meta[LAYOUT]).items():
            for param, shape in params.items():
                entries.append((f"{module}.{param}" if module else param, [int(n) for n in shape]))
        return entries
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: a damaged int8 task file (its {LAYOUT!r} entry does not parse); export it again"
        ) from e


def unpack(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: object) -> dict[str, torch.Tensor]:
    """A packed int8 file's tensors by name, as stored (int8 codes, float16 others) plus :data:`SCALES`.

    Files of the first layout (one entry per tensor) are returned as they are.
    """
    entries = _layout(meta, path)
    if not entries:
        return tensors
    try:
        head = set(json.loads(meta.get("head", "[]")))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata entry 'head' is not valid JSON ({e.msg})") from e
    out = {k: v for k, v in tensors.items() if k not in (CODES, FLOATS)}
    offsets = {CODES: 0, FLOATS: 0}
    for name, shape in entries:
        key = CODES if _is_int8(name, shape, head) else FLOATS
        flat, start, n = tensors.get(key), offsets[key], math.prod(shape)
        if flat is None or start + n > flat.numel():
            raise CheckpointError(
                f"{path}: a damaged int8 task file ({name} runs past its packed tensor); export it again"
            )
        out[name] = flat[start : start + n].reshape(shape)
        offsets[key] = start + n
    for key, used in offsets.items():
        if key in tensors and used != tensors[key].numel():
            raise CheckpointError(
                f"{path}: a damaged int8 task file ({key} holds more than its layout); export it again"
            )
    return out


def scale_rows(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each int8 weight's float16 row scales, by name, cut from the one :data:`SCALES` tensor (empty: no int8).

    ``tensors`` as stored and unpacked (:func:`unpack`): int8 codes by name.
    """
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
    tensors = unpack(tensors, meta, path)
    try:
        scales = scale_rows(tensors)
    except ValueError as e:
        raise CheckpointError(f"{path}: a damaged int8 task file (its scales do not fit: {e}); export it again") from e
    out = {k: v for k, v in tensors.items() if k != SCALES}
    for name, s in scales.items():
        out[name] = dequantize(tensors[name], s)
    return out
