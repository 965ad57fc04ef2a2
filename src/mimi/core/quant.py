"""Quantised task files: weight matrices as int8 (or int4) codes with float16 scales, symmetric.

A weight ``W`` is stored as codes ``q = round(W / s)`` (``|q| <= 127``, int4: ``|q| <= 7``) and one float16 scale per
channel, ``s = max |channel| / 127`` (int4: ``/ 7``) rounded up to float16, so nothing is clipped and the error of
every entry is at most half a step, ``s / 2``. Reading dequantises once, to float32.

Two layouts, both read (the ``int8`` metadata entry names the scheme):

* **v2** (:data:`SCHEME_INT8`, :data:`SCHEME_INT4`; written by ``mimi export --dtype int8``): every 2-d tensor is
  quantised, the classifier head's weight too (int8 even in an int4 file, one scale per class, i.e. per row). Any
  other weight has one scale per row or per column, whichever are fewer: an adapter's down-projection ``(h, d)``
  one per row, its up-projection ``(d, h)`` one per column, so each hidden neuron has its own scale and a pruned
  adapter of ``h`` neurons pays ``2 h`` scales, not ``h + d`` (at 1-4 neurons, per-row scales of the
  up-projection cost more bytes than its codes). In int4 files the adapters' codes are two a byte (low nibble
  first, each tensor starting on a whole byte). Biases and other 1-d tensors stay float16. Two tensors hold it
  all, :data:`PACKED_CODES` (int8: every tensor's codes) and :data:`PACKED_FLOATS` (float16: for each tensor in
  turn, its scales or its values), in the sorted order of the trained tensors' names.
* **v1** (:data:`SCHEME`): per-row scales, the head and biases in float16, three tensors (:data:`CODES`,
  :data:`SCALES`, :data:`FLOATS`); and before it, one safetensors entry per tensor.

The :data:`LAYOUT` metadata entry (``{module: {param: shape}}`` in packed order) says what the packed tensors hold;
a v2 file stores it folded (see :mod:`mimi.core.taskfile`), readers see it expanded. :func:`stored_bytes` is what
each tensor costs on disk, scales included.
"""

from __future__ import annotations

import json
import math

import torch

from mimi.core.errors import CheckpointError

SCALES = "__int8_scales__"  # v1: every int8 weight's row scales, concatenated in the sorted order of their names
CODES = "__int8_codes__"  # v1: every int8 weight's codes, flattened and concatenated in the same order
FLOATS = "__float16__"  # v1: every other floating-point tensor (biases, the head), flattened, in sorted name order
PACKED_CODES = "__q"  # v2: every quantised tensor's codes (int4: two a byte), in sorted name order
PACKED_FLOATS = "__f"  # v2: each tensor's float16 scales (quantised) or values (others), in sorted name order
LAYOUT = "int8_layout"  # metadata: {module: {param: shape}} of the packed tensors, in the order they are packed
QMAX = 127
QMAX4 = 7
META_KEY = "int8"  # metadata entry of a quantised file: the scheme
SCHEME = "symmetric, one float16 scale per output channel"  # v1 (head and biases float16)
SCHEME_INT8 = "v2 int8: symmetric, float16 scales per head row and per row or column (the fewer) of other weights"
SCHEME_INT4 = "v2 int4: as v2 int8, other weights than the head's int4 (two codes a byte)"
SCHEMES = {SCHEME: "int8", SCHEME_INT8: "int8", SCHEME_INT4: "int4"}  # scheme -> stored_dtype


def channel_scales(weight: torch.Tensor, axis: int = 0, qmax: int = QMAX) -> torch.Tensor:
    """One float16 scale per row (``axis=0``) or column (``axis=1``) of a 2-d weight, ``max |channel| / qmax``
    rounded up to float16.

    Rounding up keeps ``|W / s| <= qmax`` for the float16 scale actually stored. An all-zero channel gets scale 1
    (its codes are 0). A channel whose scale would underflow float16 gets float16's smallest positive value.
    """
    amax = weight.detach().abs().amax(dim=1 - axis).to(torch.float32)  # (rows,) or (columns,)
    if not torch.isfinite(amax).all():
        raise CheckpointError("a weight holds inf or NaN; it cannot be stored quantised")
    exact = amax / qmax
    s = exact.to(torch.float16)
    below = s.to(torch.float32) < exact  # float16 rounded down: step to the next float16 value up
    s = torch.where(below, torch.nextafter(s, torch.full_like(s, torch.inf)), s)
    tiny = torch.finfo(torch.float16).smallest_normal * 2.0**-10  # smallest subnormal
    s = torch.where((s == 0) & (amax > 0), torch.full_like(s, tiny), s)
    s = torch.where(amax == 0, torch.ones_like(s), s)
    if torch.isinf(s).any():
        raise CheckpointError(f"a weight exceeds {qmax} * 65504 in magnitude; it cannot be stored quantised")
    return s


def row_scales(weight: torch.Tensor) -> torch.Tensor:
    """One float16 scale per output channel (row) of a 2-d weight, ``max |row| / 127`` rounded up to float16."""
    return channel_scales(weight, 0, QMAX)


def quantize(weight: torch.Tensor, *, axis: int = 0, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)``: int8 codes ``(out, in)`` (``|q| <= 127``; ``bits=4``: ``<= 7``) and float16 scales, one
    per row (``axis=0``, ``(out,)``) or per column (``axis=1``, ``(in,)``), of a 2-d weight."""
    if weight.ndim != 2:
        raise ValueError(f"quantisation is per channel of a 2-d weight, got shape {tuple(weight.shape)}")
    qmax = QMAX if bits == 8 else QMAX4
    s = channel_scales(weight, axis, qmax).to(torch.float32)
    codes = torch.round(weight.detach().to(torch.float32) / (s[:, None] if axis == 0 else s[None, :]))
    return codes.clamp_(-qmax, qmax).to(torch.int8), s.to(torch.float16)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """float32 weights from int8 (or int4) codes and their float16 row (``axis=0``) or column scales."""
    s = scales.to(torch.float32)
    return codes.to(torch.float32) * (s[:, None] if axis == 0 else s[None, :])


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes in ``[-8, 7]`` -> ``ceil(n / 2)`` bytes (as int8), two a byte, the first in the low nibble."""
    flat = codes.reshape(-1).to(torch.int16)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nib = flat & 0xF
    return (nib[0::2] | (nib[1::2] << 4)).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` int4 codes of bytes written by :func:`pack_int4`, as int8 in ``[-8, 7]``."""
    b = packed.view(torch.uint8).to(torch.int16)
    nib = torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)[:n]
    return torch.where(nib >= 8, nib - 16, nib).to(torch.int8)


def _plan(scheme: str, shape: list[int] | tuple[int, ...], is_head: bool) -> tuple[str, int]:
    """How a floating-point tensor is stored under ``scheme``: ``("q8" | "q4" | "f16", scale axis)``."""
    if len(shape) != 2 or (scheme == SCHEME and is_head):
        return "f16", 0
    if scheme == SCHEME or is_head:
        return "q8", 0
    axis = 0 if shape[0] <= shape[1] else 1  # fewer scales: per row, unless there are fewer columns
    return ("q4" if scheme == SCHEME_INT4 else "q8"), axis


def _code_bytes(kind: str, n: int) -> int:
    return n if kind == "q8" else (n + 1) // 2 if kind == "q4" else 0


def stored_dtype_of(scheme: str) -> str:
    return SCHEMES.get(scheme, "int8")


def quantize_state(
    tensors: dict[str, torch.Tensor], *, head: set[str], bits: int = 8
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The packed tensors of a v2 quantised task file and its metadata entries (the scheme and the layout).

    Every 2-d floating-point tensor becomes codes + scales: the head's (the names in ``head``) int8 with a scale
    per row, the others int8 (``bits=4``: int4) with a scale per row or per column, whichever are fewer. Every other
    floating-point tensor becomes float16. Tensors that are not floating point keep their own entries.
    """
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    scheme = SCHEME_INT8 if bits == 8 else SCHEME_INT4
    out: dict[str, torch.Tensor] = {}
    codes, floats = [], []
    layout: dict[str, dict[str, list[int]]] = {}
    for name in sorted(tensors):  # names sharing a module are contiguous in sorted order: the layout groups them
        t = tensors[name].detach()
        if not t.is_floating_point():
            if name in (PACKED_CODES, PACKED_FLOATS):
                raise ValueError(f"a tensor is named {name!r}, the name of a packed tensor")
            out[name] = t
            continue
        module, _, param = name.rpartition(".")
        layout.setdefault(module, {})[param] = list(t.shape)
        kind, axis = _plan(scheme, list(t.shape), name in head)
        if kind == "f16":
            floats.append(t.to(torch.float16).reshape(-1))
            continue
        q, s = quantize(t, axis=axis, bits=8 if kind == "q8" else 4)
        codes.append(q.reshape(-1) if kind == "q8" else pack_int4(q))
        floats.append(s)
    for key, parts in ((PACKED_CODES, codes), (PACKED_FLOATS, floats)):
        if parts:
            out[key] = torch.cat(parts).contiguous()
    return out, {META_KEY: scheme, LAYOUT: json.dumps(layout, separators=(",", ":"))}


def layout_names(meta: dict[str, str]) -> list[str]:
    """The names of the tensors packed in a quantised file, in packed order (empty: not a packed file)."""
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


def _head(meta: dict[str, str], path: object) -> set[str]:
    try:
        return set(json.loads(meta.get("head", "[]")))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata entry 'head' is not valid JSON ({e.msg})") from e


def _damaged(path: object, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: a damaged int8 task file ({what}); export it again")


def unpack(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: object) -> dict[str, torch.Tensor]:
    """A packed file's tensors by name, as stored (int8 codes of the quantised ones, int4 codes unpacked to int8;
    float16 others), plus :data:`SCALES`: every quantised tensor's scales, concatenated in packed order.

    Files of the first layout (one entry per tensor) are returned as they are.
    """
    entries = _layout(meta, path)
    if not entries:
        if meta.get(META_KEY) in (SCHEME_INT8, SCHEME_INT4):
            raise _damaged(path, f"no {LAYOUT!r} entry")
        return tensors
    head = _head(meta, path)
    scheme = meta.get(META_KEY, SCHEME)
    v1 = scheme == SCHEME
    qkey, fkey = (CODES, FLOATS) if v1 else (PACKED_CODES, PACKED_FLOATS)
    out = {k: v for k, v in tensors.items() if k not in (CODES, FLOATS, PACKED_CODES, PACKED_FLOATS)}
    scales: list[torch.Tensor] = []
    offsets = {qkey: 0, fkey: 0}

    def take(key: str, n: int, name: str) -> torch.Tensor:
        flat, start = tensors.get(key), offsets[key]
        if flat is None or flat.ndim != 1 or start + n > flat.numel():
            raise _damaged(path, f"{name} runs past its packed tensor")
        offsets[key] = start + n
        return flat[start : start + n]

    for name, shape in entries:
        kind, axis = _plan(scheme, shape, name in head)
        n = math.prod(shape)
        if kind == "f16":
            out[name] = take(fkey, n, name).reshape(shape)
            continue
        raw = take(qkey, _code_bytes(kind, n), name)
        out[name] = (raw if kind == "q8" else unpack_int4(raw, n)).reshape(shape)
        if not v1:  # v1 keeps its scales in their own tensor
            scales.append(take(fkey, shape[axis], name))
    for key, used in offsets.items():
        if key in tensors and used != tensors[key].numel():
            raise _damaged(path, f"{key} holds more than its layout")
    if not v1:
        out[SCALES] = torch.cat(scales) if scales else torch.zeros(0, dtype=torch.float16)
    return out


def scale_rows(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each int8 weight's float16 row scales of a v1 file (or of the first layout), by name, cut from the one
    :data:`SCALES` tensor (empty: no int8). ``tensors`` as stored and unpacked (:func:`unpack`)."""
    names = sorted(k for k, t in tensors.items() if t.dtype == torch.int8)
    flat = tensors.get(SCALES, torch.zeros(0, dtype=torch.float16))
    rows = [tensors[n].shape[0] if tensors[n].ndim == 2 else -1 for n in names]
    if min(rows, default=0) < 0 or sum(rows) != flat.numel():
        raise ValueError(f"{flat.numel()} scales for int8 weights of {rows} rows")
    return dict(zip(names, flat.split(rows))) if names else {}


def split_scales(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], path: object = "the file"
) -> dict[str, tuple[torch.Tensor, int]]:
    """Each quantised tensor's ``(float16 scales, axis)`` by name (axis 0: per row, 1: per column), for files of
    every layout. ``tensors`` as :func:`unpack` returns them."""
    scheme = meta.get(META_KEY, SCHEME)
    if scheme == SCHEME:
        try:
            return {n: (s, 0) for n, s in scale_rows(tensors).items()}
        except ValueError as e:
            raise _damaged(path, f"its scales do not fit: {e}") from e
    head, out, start = _head(meta, path), {}, 0
    flat = tensors.get(SCALES, torch.zeros(0, dtype=torch.float16))
    for name, shape in _layout(meta, path):
        kind, axis = _plan(scheme, shape, name in head)
        if kind != "f16":
            out[name] = (flat[start : start + shape[axis]], axis)
            start += shape[axis]
    if start != flat.numel():
        raise _damaged(path, f"{flat.numel()} scales for {start}")
    return out


def dequantize_state(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: object) -> dict[str, torch.Tensor]:
    """The tensors of a file with its quantised ones dequantised to float32 and the scales dropped (others as
    stored)."""
    if META_KEY not in meta:
        return tensors
    if meta[META_KEY] not in SCHEMES:
        raise CheckpointError(f"{path}: quantisation scheme {meta[META_KEY]!r} is unknown; a newer mimi wrote it?")
    tensors = unpack(tensors, meta, path)
    scales = split_scales(tensors, meta, path)
    out = {k: v for k, v in tensors.items() if k != SCALES}
    for name, (s, axis) in scales.items():
        out[name] = dequantize(tensors[name], s, axis)
    return out


def stored_bytes(meta: dict[str, str], path: object = "the file") -> dict[str, int]:
    """Bytes on disk of each tensor of a packed file (its codes, its scales, or its float16 values), by name, from
    the layout alone (empty: not a packed file)."""
    scheme = meta.get(META_KEY, SCHEME)
    head, out = _head(meta, path), {}
    for name, shape in _layout(meta, path):
        kind, axis = _plan(scheme, shape, name in head)
        n = math.prod(shape)
        out[name] = 2 * n if kind == "f16" else _code_bytes(kind, n) + 2 * shape[axis]
    return out
