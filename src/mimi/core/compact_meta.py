"""The compact metadata of quantised task files (format ``mimi-adapters/2``): short keys, JSON without spaces, the
architecture left out where the model name gives it, and the packed layout and adapter sizes folded (a module
name's numbers taken out, ``blocks.{}.ls{}.adapter``, then ``[3, 1, ...]`` per module; each distinct
``{param: shape}`` written once). :func:`expand_metadata` gives every reader the long entries back."""

from __future__ import annotations

import json
import re
from typing import Any

from mimi.core.errors import CheckpointError
from mimi.core.modules import architecture_of
from mimi.core.quant import LAYOUT, META_KEY, SCHEME_INT4, SCHEME_INT8, SCHEMES

FORMAT = "mimi-adapters/1"
FORMAT_COMPACT = "mimi-adapters/2"  # quantised files: short keys, folded layout and sizes (expanded when read)
SHORT = {
    "adapter_config": "ac",
    "architecture": "ar",
    "backbone_fingerprint": "fp",
    "classes": "cl",
    "data": "da",
    "distill": "di",
    "head": "hd",
    "img_size": "is",
    "license": "li",
    "lora": "lo",
    "method": "me",
    "model": "mo",
    "num_classes": "nc",
    "weights_source": "ws",
}
LONG = {v: k for k, v in SHORT.items()}
_JSON_KEYS = {"adapter_config", "classes", "distill", "head", "lora"}  # written again without spaces
_BITS = {SCHEME_INT8: "8", SCHEME_INT4: "4"}  # the "q" entry of a compact file: the adapters' bits
_RESERVED = set(LONG) | {"format", "q", "ly", "sz"}  # a metadata key of the caller's among these is escaped: "=key"


def _pattern(name: str) -> tuple[str, list[int]]:
    """``blocks.3.ls1.adapter`` -> ``("blocks.{}.ls{}.adapter", [3, 1])`` (a str.format pattern, braces escaped;
    a number written with a leading zero stays in the pattern)."""
    parts = re.split(r"(\d+)", name)
    pattern, nums = [], []
    for i, part in enumerate(parts):
        if i % 2 and str(int(part)) == part:
            pattern.append("{}")
            nums.append(int(part))
        else:
            pattern.append(part.replace("{", "{{").replace("}", "}}"))
    return "".join(pattern), nums


def fold_names(values: dict[str, Any]) -> dict[str, list[list]]:
    """``{name: value}`` -> ``{pattern: [[*numbers, value], ...]}``: each pattern of names written once."""
    out: dict[str, list[list]] = {}
    for name, value in values.items():
        pattern, nums = _pattern(name)
        out.setdefault(pattern, []).append([*nums, value])
    return out


def unfold_names(folded: dict[str, list[list]]) -> dict[str, Any]:
    """The inverse of :func:`fold_names`, in the order of the names' numbers (block by block), then of the
    patterns (so a model's own order where its names number its blocks first)."""
    rows = []
    for g, (pattern, entries) in enumerate(folded.items()):
        for i, row in enumerate(entries):
            nums = [int(n) for n in row[:-1]]
            rows.append((nums, g, i, pattern.format(*nums), row[-1]))
    return {name: value for *_, name, value in sorted(rows, key=lambda r: r[:3])}


def _fold_layout(layout: str, owners: list[str]) -> str:
    """The packed layout ``{module: {param: shape}}`` as ``{"s": [each distinct {param: shape}], "m": folded
    {owner: index into s}}``, where a tensor's owner is the adapter or LoRA layer (``owners``) its name starts
    with, else its module: an adapter's down and up projections are one entry."""
    groups: dict[str, dict[str, list[int]]] = {}
    by_length = sorted(owners, key=len, reverse=True)
    for module, params in json.loads(layout).items():
        for param, shape in params.items():
            name = f"{module}.{param}" if module else param
            owner = next((o for o in by_length if name.startswith(o + ".")), module)
            groups.setdefault(owner, {})[name[len(owner) + 1 :] if owner else name] = shape
    sigs: list[dict] = []
    index: dict[str, int] = {}
    folded = {}
    for owner, params in groups.items():
        key = json.dumps(params, sort_keys=True)
        if key not in index:
            index[key] = len(sigs)
            sigs.append(params)
        folded[owner] = index[key]
    return _dumps({"s": sigs, "m": fold_names(folded)})


def _unfold_layout(folded: str) -> str:
    """The packed layout of a compact file, in packed order (sorted tensor names), as :func:`_fold_layout` read it."""
    d = json.loads(folded)
    sigs = d["s"]
    names = sorted(
        (f"{owner}.{param}" if owner else param, [int(n) for n in shape])
        for owner, i in unfold_names(d["m"]).items()
        for param, shape in sigs[i].items()
    )
    layout: dict[str, dict[str, list[int]]] = {}
    for name, shape in names:
        module, _, param = name.rpartition(".")
        layout.setdefault(module, {})[param] = shape
    return _dumps(layout)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def compact_metadata(meta: dict[str, str]) -> dict[str, str]:
    """The metadata of a quantised file as written: short keys, folded layout and sizes (see the module doc)."""
    out = {"format": FORMAT_COMPACT}
    for key, value in meta.items():
        if key in ("format", "stored_dtype"):  # the format is the compact one; the scheme gives the dtype
            continue
        if key == META_KEY:
            out["q"] = _BITS[value]
        elif key == LAYOUT:
            owners = list(json.loads(meta.get("sizes", "{}"))) + list(json.loads(meta.get("lora", "{}")))
            out["ly"] = _fold_layout(value, owners)
        elif key == "sizes":
            out["sz"] = _dumps(fold_names(json.loads(value)))
        elif key == "architecture" and value == architecture_of(meta.get("model")):
            continue  # readers take it from the model name
        elif key in SHORT:
            if key in _JSON_KEYS:
                try:
                    value = _dumps(json.loads(value))
                except json.JSONDecodeError:
                    pass  # not JSON: kept as given
            out[SHORT[key]] = value
        else:
            out["=" + key if key in _RESERVED or key.startswith("=") else key] = value
    return out


def expand_metadata(raw: dict[str, str], path: object = "the file") -> dict[str, str]:
    """The metadata as every reader sees it: a compact file's entries under their long names, its layout and sizes
    unfolded (any other file's as they are)."""
    if raw.get("format") != FORMAT_COMPACT:
        return raw
    meta = {"format": FORMAT}
    try:
        for key, value in raw.items():
            if key == "format":
                continue
            if key.startswith("="):
                meta[key[1:]] = value
            elif key == "q":
                scheme = next((s for s, b in _BITS.items() if b == value), f"compact q={value}")
                meta[META_KEY] = scheme
                meta["stored_dtype"] = SCHEMES.get(scheme, f"q{value}")
            elif key == "ly":
                meta[LAYOUT] = _unfold_layout(value)
            elif key == "sz":
                meta["sizes"] = _dumps(unfold_names(json.loads(value)))
            else:
                meta[LONG.get(key, key)] = value
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError, KeyError, IndexError) as e:
        raise CheckpointError(
            f"{path}: a damaged int8 task file (its compact metadata does not parse: {type(e).__name__}); "
            "export it again"
        ) from e
    return meta
