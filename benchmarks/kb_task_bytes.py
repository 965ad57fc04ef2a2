"""Bytes of a MiMi task file at small budgets, by part (adapters, head, header), for fp16, int8 and int4.

Target (issue 29, "Task files that size"): a 10-class MiMi task of about 8,000 adapter parameters on ViT-S/14 under
16,000 bytes, head included. Bytes depend on shapes and metadata only, so no training: task files are written
through ``mimi.save_adapters`` (what ``mimi export`` calls) from ViT-S/14 at 56 px holding adapters of the right
sizes and random values, with the metadata ``mimi export`` writes (method, model, weights source, image size, data,
10 class names, licence; the architecture and backbone fingerprint are added by the writer).

Sizes at each budget (adapter parameters, head excluded: an alive adapter costs its 384-value up-bias, and each
hidden neuron 769 values):

* ``spread``: the final sizes of the seven committed r=3 MiMi runs (``*__mimi__budgetdim3__s0.json``, 63.8k-64.2k
  parameters, 12-20 adapters alive of 24), pruned further one neuron at a time, neurons drawn uniformly at random
  (seed 0), until the budget holds. An adapter whose last neuron goes is removed. Min / median / max over the seven.
* ``most-alive``: as many adapters as the budget allows at one neuron each, the rest of the budget in neurons on
  them: the most up-biases a budget can carry (the worst bytes per parameter).
* ``brief``: 8 adapters alive, 10 neurons (10,762 parameters), the example of the issue (over an 8,000 budget:
  the up-biases count in the budget).

``int8-v1`` is the layout ``mimi export --dtype int8`` wrote before (per-row scales, head float16, long metadata),
written by hand here for comparison.

    python benchmarks/kb_task_bytes.py       # about a minute on 2 cores; JSON: benchmarks/results/perf/kb_task_bytes.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import mimi
from mimi.backbones import create_backbone
from mimi.bench.runner import _git_commit, _versions
from mimi.core.adapters import AdapterConfig, adapters, add_adapters
from mimi.core.quant import CODES, FLOATS, SCALES, SCHEME, quantize
from mimi.core.shrink import apply_plan
from mimi.core.taskfile import byte_breakdown, read_metadata

ROOT = Path(__file__).resolve().parent.parent
RUNS = sorted((ROOT / "benchmarks" / "results" / "minivtab").glob("*__mimi__budgetdim3__s0.json"))
OUT = ROOT / "benchmarks" / "results" / "perf" / "kb_task_bytes.json"
BUDGETS = (32_000, 16_000, 8_000, 4_000)
DTYPES = {"fp16": torch.float16, "int8": torch.int8, "int4": "int4"}
WIDTH, SITES, CLASSES = 384, 24, 10
TARGET = (8_000, 16_000)  # about 8,000 adapter parameters: under 16,000 bytes


def params(sizes: dict[str, int]) -> int:
    """Adapter parameters of sequential ViT-S adapters of these hidden sizes (down, its bias, up, its bias)."""
    return sum(h * (2 * WIDTH + 1) + WIDTH for h in sizes.values() if h > 0)


def prune_to(sizes: dict[str, int], budget: int, seed: int = 0) -> dict[str, int]:
    """``sizes`` with neurons drawn uniformly at random removed until the budget holds (empty adapters removed)."""
    sizes = dict(sizes)
    rng = random.Random(seed)
    while params(sizes) > budget:
        neurons = [name for name, h in sizes.items() for _ in range(h)]
        name = rng.choice(neurons)
        sizes[name] -= 1
        if sizes[name] == 0:
            del sizes[name]
    return sizes


def most_alive(names: list[str], budget: int) -> dict[str, int]:
    """As many one-neuron adapters as fit, spread over the blocks, then the rest of the budget in neurons on them."""
    k = min(len(names), budget // (2 * WIDTH + 1 + WIDTH))
    picked = [names[round(i * len(names) / k)] for i in range(k)] if k else []
    sizes = dict.fromkeys(picked, 1)
    i = 0
    while k and params(sizes) + 2 * WIDTH + 1 <= budget:
        sizes[picked[i % k]] += 1
        i += 1
    return sizes


def v1_int8(f32: Path, out: Path) -> None:
    """The int8 file of the previous layout: per-row scales, head and biases float16, three tensors, long keys."""
    from safetensors.torch import load_file

    meta, exact = dict(read_metadata(f32)), load_file(str(f32))
    head = set(json.loads(meta["head"]))
    codes, scales, floats, layout = [], [], [], {}
    for name in sorted(exact):
        t = exact[name]
        module, _, param = name.rpartition(".")
        layout.setdefault(module, {})[param] = list(t.shape)
        if t.ndim == 2 and name not in head:
            q, s = quantize(t)
            codes.append(q.reshape(-1))
            scales.append(s)
        else:
            floats.append(t.to(torch.float16).reshape(-1))
    meta.update({"int8": SCHEME, "stored_dtype": "int8", "int8_layout": json.dumps(layout, separators=(",", ":"))})
    del meta["trainable"]
    tensors = {FLOATS: torch.cat(floats)}
    if codes:
        tensors.update({CODES: torch.cat(codes), SCALES: torch.cat(scales)})
    save_file(tensors, str(out), metadata=meta)


def measure(base: torch.nn.Module, sizes: dict[str, int], tmp: Path, meta: dict[str, str]) -> dict:
    model = copy.deepcopy(base)
    add_adapters(model, AdapterConfig(hidden_dim=max(sizes.values(), default=1), init_seed=0))
    apply_plan(model, {n: list(range(sizes.get(n, 0))) for n, _ in adapters(model)})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    n = sum(a.num_params() for _, a in adapters(model))
    assert n == params(sizes), (n, params(sizes))
    row: dict = {"adapter_params": n, "alive": len(sizes), "neurons": sum(sizes.values()), "sizes": sizes}
    f32 = mimi.save_adapters(model, tmp / "f32.safetensors", metadata=meta)
    row["fp32"] = byte_breakdown(f32)
    for label, dtype in DTYPES.items():
        row[label] = byte_breakdown(mimi.save_adapters(model, tmp / f"{label}.safetensors", dtype=dtype, metadata=meta))
    v1_int8(f32, tmp / "v1.safetensors")
    row["int8-v1"] = byte_breakdown(tmp / "v1.safetensors")
    return row


FORMS = ("fp16", "int8-v1", "int8", "int4")


def line(budget: object, case: str, row: dict, form: str) -> str:
    p = row[form]
    return (
        f"{budget!s:>7} {case:<22} {row['adapter_params']:>7,} {row['alive']:>3}/{row['neurons']:<4} {form:<8}"
        f"{p['adapters']:>9,} {p['head']:>7,} {p['header']:>7,} {p['total']:>8,}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    t0 = time.time()
    base = create_backbone("vit_small_patch14_dinov2", weights="none", img_size=56)[0]
    base.reset_classifier(CLASSES)
    names = [n for n, _ in adapters(add_adapters(copy.deepcopy(base), AdapterConfig(hidden_dim=1)))]
    assert len(names) == SITES
    meta = {
        "method": "mimi",
        "model": "vit_small_patch14_dinov2",
        "weights_source": "imgfocus",
        "img_size": "56",
        "data": "vtab1k:digits",
        "classes": json.dumps([str(i) for i in range(CLASSES)]),
        "license": "CC-BY-4.0",
    }
    tmp = Path(tempfile.mkdtemp(prefix="mimi-kb-bytes-"))
    starts = {r.name.split("__")[0]: json.loads(r.read_text())["cycles"][-1]["sizes"] for r in RUNS}
    header = f"{'budget':>7} {'case':<22} {'params':>7} {'alive/n':<8} {'form':<8}{'adapters':>9} {'head':>7} "
    header += f"{'header':>7} {'total':>8}"
    print(header)
    cases = []
    for budget in BUDGETS:
        spread = {task: measure(base, prune_to(s, budget), tmp, meta) for task, s in starts.items()}
        worst = measure(base, most_alive(names, budget), tmp, meta)
        summary = {}
        for form in ("fp32", *FORMS):
            totals = [r[form]["total"] for r in spread.values()]
            summary[form] = {"min": min(totals), "median": statistics.median(totals), "max": max(totals)}
        median_task = sorted(spread, key=lambda t: spread[t]["int8"]["total"])[len(spread) // 2]
        for form in FORMS:
            print(line(budget, f"spread ({median_task})", spread[median_task], form))
        print(
            f"{'':>7} {'spread, 7 tasks':<22} int8 {summary['int8']['min']:,}-{summary['int8']['max']:,}, "
            f"int4 {summary['int4']['min']:,}-{summary['int4']['max']:,}, fp16 {summary['fp16']['min']:,}-"
            f"{summary['fp16']['max']:,} bytes"
        )
        for form in FORMS:
            print(line(budget, "most-alive", worst, form))
        cases.append({"budget": budget, "spread": spread, "spread_totals": summary, "most_alive": worst})
    sizes = {names[i]: h for i, h in zip((0, 3, 6, 9, 12, 15, 18, 21), (2, 1, 1, 1, 2, 1, 1, 1))}
    brief = measure(base, sizes, tmp, meta)
    for form in FORMS:
        print(line("-", "brief (8 alive, 10 n)", brief, form))
    at_target = [c for c in cases if c["budget"] == TARGET[0]][0]
    worst_int8 = max(at_target["spread_totals"]["int8"]["max"], at_target["most_alive"]["int8"]["total"])
    record = {
        "script": "benchmarks/kb_task_bytes.py",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": platform.node(),
        "git_commit": _git_commit(),
        "versions": _versions(),
        "seconds": round(time.time() - t0, 1),
        "note": "ViT-S/14 at 56 px, 10 classes, random values of the right shapes; bytes depend on shapes and "
        "metadata only. Parts: adapters (codes, scales, float16 biases), head, header (JSON + 8-byte length).",
        "metadata": meta,
        "budgets": cases,
        "brief_example": brief,
        "target": {
            "adapter_params": TARGET[0],
            "bytes_under": TARGET[1],
            "int8_worst_at_8000": worst_int8,
            "int8_met": worst_int8 < TARGET[1],
            "int4_worst_at_8000": max(
                at_target["spread_totals"]["int4"]["max"], at_target["most_alive"]["int4"]["total"]
            ),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"8,000 adapter parameters, worst case: int8 {worst_int8:,} bytes (target < {TARGET[1]:,}); -> {args.out}")


if __name__ == "__main__":
    main()
