"""Serving many tasks on one backbone: memory, mixed-batch throughput, add time, ONNX latency, bytes per task.

Task files carry the adapter sizes a real MiMi run ended with (read from the committed MiniVTAB results: uneven
widths, removed adapters) and random trained weights: memory and compute depend on the sizes, not on the values.
Contenders are measured side by side in one run (interleaved, median of the repeats after a warm-up); memory is
measured in a fresh process per configuration.

    python benchmarks/bank.py            # the full table (about 10 minutes on 2 cores)
    python benchmarks/bank.py --quick    # a smoke run, under a minute
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import torch
from _common import machine

import mimi
from mimi.backbones import create_backbone
from mimi.core.adapters import AdapterConfig, add_adapters
from mimi.core.shrink import apply_plan

RESULTS = Path(__file__).parent / "results"
SIZES_FROM = sorted((RESULTS / "minivtab").glob("*__mimi__budgetdim3__s0.json"))


def rss_mb() -> float:
    gc.collect()
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def backbone(args) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone(args.model, weights=args.weights, img_size=args.img_size)[0].eval()


def mimi_sizes() -> list[dict[str, int]]:
    """Final per-adapter sizes of the committed MiniVTAB MiMi runs at r=3 (one per task)."""
    if not SIZES_FROM:
        raise SystemExit("no committed MiniVTAB MiMi results under benchmarks/results/minivtab")
    return [json.loads(p.read_text())["cycles"][-1]["sizes"] for p in SIZES_FROM]


def write_tasks(args, folder: Path, n: int) -> list[Path]:
    """``n`` MiMi task files (cycling through the real runs' sizes), 10 classes each, float32 and float16."""
    bare = backbone(args)
    sizes = mimi_sizes()
    paths = []
    for i in range(n):
        model = copy.deepcopy(bare)
        model.reset_classifier(10)
        add_adapters(model, AdapterConfig(hidden_dim=96, init_seed=i))
        apply_plan(model, {k: list(range(h)) for k, h in sizes[i % len(sizes)].items()})
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        paths.append(mimi.save_adapters(model, folder / f"task{i}.safetensors"))
        if i == 0:
            mimi.save_adapters(model, folder / "task0_fp16.safetensors", dtype=torch.float16)
            full = {k: v.contiguous() for k, v in model.state_dict().items()}
            from safetensors.torch import save_file

            save_file(full, str(folder / "full_finetune.safetensors"))  # what a full fine-tune stores per task
    return paths


# ---------------------------------------------------------------- memory (one fresh process per configuration)


def memory_child(args, mode: str, n: int, folder: Path) -> dict:
    base = rss_mb()  # torch, timm and mimi imported, nothing built
    bare = backbone(args)
    after_backbone = rss_mb()
    files = [folder / f"task{i}.safetensors" for i in range(n)]
    if mode == "bank":
        bank = mimi.AdapterBank(bare, device="cpu")
        for i, f in enumerate(files):
            bank.add(f"t{i}", f)
        held = bank
    elif mode == "separate":  # N adapted models, each with its own copy of the backbone
        held = [mimi.load_adapters(copy.deepcopy(bare), f).eval() for f in files]
        del bare
    else:
        held = bare
    end = rss_mb()
    del held
    return {"mode": mode, "n": n, "rss_imports_mb": base, "rss_backbone_mb": after_backbone, "rss_mb": end}


def memory(args, folder: Path, ns: list[int]) -> list[dict]:
    rows = []
    configs = [("bare", 0)] + [(m, n) for n in ns for m in ("bank", "separate")]
    for mode, n in configs:
        cmd = [sys.executable, __file__, "--child", mode, str(n), str(folder), "--model", args.model]
        cmd += ["--weights", args.weights, "--img-size", str(args.img_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    return rows


# ---------------------------------------------------------------- speed


def interleaved(contenders: dict, repeats: int) -> dict[str, float]:
    """Median ms of each contender, measured round-robin (one call of each per round) after a warm-up."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {k: 1000 * v for k, v in _common.interleaved(contenders, repeats, device).items()}


def throughput(args, paths: list[Path]) -> dict:
    bank = mimi.AdapterBank(backbone(args), device="cpu")
    tasks = [f"t{i}" for i in range(8)]
    for t, p in zip(tasks, paths):
        bank.add(t, p)
    b = args.batch
    x = torch.randn(b, 3, args.img_size, args.img_size)
    mixed = [tasks[i % 8] for i in range(b)]
    per = b // 8
    contenders = {
        "single-task batch": lambda: bank.logits(x, "t0"),
        "mixed batch, 8 tasks": lambda: bank.logits(x, mixed),
        "8 sub-batches in turn": lambda: [bank.logits(x[i * per : (i + 1) * per], t) for i, t in enumerate(tasks)],
    }
    bare_model = backbone(args)  # the floor: the same backbone with no task at all
    bare_model.reset_classifier(0)
    with torch.inference_mode():
        ms = interleaved({**contenders, "bare backbone": lambda: bare_model(x)}, args.repeats)
    return {"batch": b, "ms": ms}


def add_time(args, paths: list[Path]) -> dict:
    bank = mimi.AdapterBank(backbone(args), device="cpu")

    def add_remove():
        bank.add("x", paths[0])
        bank.remove("x")

    fp16 = paths[0].parent / "task0_fp16.safetensors"

    def add_remove16():
        bank.add("x", fp16)
        bank.remove("x")

    return interleaved({"add fp32 file": add_remove, "add fp16 file": add_remove16}, max(5, args.repeats * 2))


def onnx_latency(args, path: Path, folder: Path) -> dict:
    import onnxruntime as ort

    from mimi.deploy.onnx_export import export_onnx

    model = mimi.load_adapters(backbone(args), path).eval()
    onnx_path = folder / "task0.onnx"
    res = export_onnx(model, onnx_path, img_size=args.img_size)
    opts = ort.SessionOptions()
    # ORT's worker threads spin after each call by default, stealing the cores PyTorch is timed on next
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    out = {"max_abs_diff": res["max_abs_diff"], "onnx_bytes": res["bytes"]}
    for b in (1, args.batch):
        x = torch.randn(b, 3, args.img_size, args.img_size)
        xn = x.numpy()
        with torch.inference_mode():
            ms = interleaved(
                {"pytorch": lambda x=x: model(x), "onnxruntime": lambda xn=xn: session.run(None, {"images": xn})},
                args.repeats * (4 if b == 1 else 1),
            )
        out[f"batch{b}"] = ms
    return out


# ---------------------------------------------------------------- report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--weights", default="imgfocus", help="backbone weights (values do not change speed or memory)")
    p.add_argument("--img-size", type=int, default=56)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="smoke run: fewer tasks and repeats")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: benchmarks/results/bank[_quick].json)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, n, folder = args.child
        print(json.dumps(memory_child(args, mode, int(n), Path(folder))))
        return
    if args.quick:
        args.repeats, args.batch = 3, 16
    ns = [1, 10] if args.quick else [1, 10, 100]
    info = machine()
    print(f"{info['cpu']} | {info['threads']} threads | torch {info['torch']} | {info['device']}")
    print(f"{args.model} ({args.weights}) at {args.img_size}px; MiMi r=3 task sizes from {len(SIZES_FROM)} runs")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = write_tasks(args, folder, max(ns))
        files = {
            "task fp32": paths[0].stat().st_size,
            "task fp16": (folder / "task0_fp16.safetensors").stat().st_size,
            "full fine-tune": (folder / "full_finetune.safetensors").stat().st_size,
        }
        mem = memory(args, folder, ns)
        speed = throughput(args, paths)
        adds = add_time(args, paths)
        onnx = onnx_latency(args, paths[0], folder)
    report(args, info, files, mem, speed, adds, onnx)


def report(args, info, files, mem, speed, adds, onnx) -> None:
    bare = next(r for r in mem if r["mode"] == "bare")
    bare_inc = bare["rss_mb"] - bare["rss_imports_mb"]
    print("\n## Bytes per task")
    for k, v in files.items():
        print(f"{k:<16} {v:>12,} bytes  {v / files['full fine-tune']:.4%} of a full fine-tune")
    print(f"\n## Memory (RSS, fresh process each): bare backbone process {bare['rss_mb']:.0f} MB, of which the model")
    print(f"## {bare_inc:.0f} MB above the imports")
    print(f"{'tasks':>5} {'layout':<10} {'RSS MB':>8} {'x bare process':>15} {'x bare model (above imports)':>29}")
    for r in mem:
        if r["mode"] == "bare":
            continue
        inc = r["rss_mb"] - r["rss_imports_mb"]
        print(
            f"{r['n']:>5} {r['mode']:<10} {r['rss_mb']:>8.0f} {r['rss_mb'] / bare['rss_mb']:>15.3f} {inc / bare_inc:>29.3f}"
        )
    ms = speed["ms"]
    b = speed["batch"]
    print(f"\n## Throughput, batch {b} (median of {args.repeats} interleaved rounds)")
    for k, v in ms.items():
        print(f"{k:<24} {v:8.1f} ms  {1000 * b / v:8.1f} img/s  x{ms['single-task batch'] / v:.3f} of single-task")
    print("\n## Adding a task from disk (add + remove, median)")
    for k, v in adds.items():
        print(f"{k:<16} {v:8.2f} ms")
    print(f"\n## ONNX Runtime vs PyTorch (one task's model; max |diff| {onnx['max_abs_diff']:.2e})")
    for bb in (1, b):
        o = onnx[f"batch{bb}"]
        print(
            f"batch {bb:>3}: pytorch {o['pytorch']:8.2f} ms, onnxruntime {o['onnxruntime']:8.2f} ms "
            f"(x{o['onnxruntime'] / o['pytorch']:.2f})"
        )
    out = args.out or RESULTS / ("bank_quick.json" if args.quick else "bank.json")
    record = {
        "machine": info,
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
        "bytes": files,
        "memory": mem,
        "throughput": speed,
        "add_ms": adds,
        "onnx": onnx,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
