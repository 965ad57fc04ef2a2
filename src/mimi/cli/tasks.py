"""`mimi info` (what a task file or run holds) and `mimi export` (a run's task file, or ONNX)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mimi.cli.command import Command
from mimi.core.errors import ConfigError


def _info_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="a run folder or an adapters .safetensors file")


def cmd_info(args: argparse.Namespace) -> int:
    from mimi.core.taskfile import load_tensors, read_metadata, unit_sizes

    path = args.path / "adapters.safetensors" if args.path.is_dir() else args.path
    meta = read_metadata(path)
    tensors = load_tensors(path)
    sizes = unit_sizes(json.loads(meta["sizes"]), json.loads(meta.get("lora", "{}")))  # LoRA: a rank per layer
    head = set(json.loads(meta.get("head", "[]")))
    print(f"{path}: {path.stat().st_size:,} bytes on disk")
    if meta.get("model"):  # what it was trained on: what `mimi predict` serves it with by default
        size = f" at {meta['img_size']} px" if meta.get("img_size") else ""
        source = f", weights {meta['weights_source']}" if meta.get("weights_source") else ""
        print(f"trained: {meta.get('method', '?')} on {meta.get('data', '?')}, backbone {meta['model']}{size}{source}")
    print(
        f"{'adapter' if 'lora' not in meta else 'LoRA layer':<40} {'hidden' if 'lora' not in meta else 'rank':>6} {'params':>9} {'bytes':>9}"
    )
    for name, h in sizes.items():
        ts = [t for k, t in tensors.items() if k.startswith(name + ".")]
        n = sum(t.numel() for t in ts)
        print(f"{name:<40} {h:>6} {n:>9,} {sum(t.numel() * t.element_size() for t in ts):>9,}")
    trained = {k: t for k, t in tensors.items() if not k.startswith("__")}
    head_n = sum(t.numel() for k, t in trained.items() if k in head)
    total = sum(t.numel() for t in trained.values())
    print(f"adapters: {len(sizes)} alive, {sum(sizes.values())} hidden neurons, {total - head_n:,} parameters")
    print(
        f"head: {head_n:,} parameters; total trained: {total:,} ({sum(t.numel() * t.element_size() for t in trained.values()):,} bytes)"
    )
    return 0


def _export_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run folder written by `mimi train`")
    p.add_argument("--out", type=Path, help="destination task file (.safetensors): the adapters and head only")
    p.add_argument(
        "--onnx", type=Path, metavar="OUT.onnx", help="also (or only) write backbone + adapters + head as ONNX"
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float16",
        help="storage dtype of the trained tensors (default: float16, half the bytes)",
    )
    p.add_argument("--weights", default="adapters.safetensors", help="file in the run folder to export")


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from mimi.core.taskfile import save_adapters
    from mimi.trainer import load_run
    from mimi.training.run import task_metadata

    if args.out is None and args.onnx is None:
        raise ConfigError("nothing to export: pass --out FILE.safetensors and/or --onnx FILE.onnx")
    if args.onnx is not None and args.onnx.suffix != ".onnx":
        raise ConfigError(f"--onnx {args.onnx}: the file name must end in .onnx")
    run = load_run(args.run_dir, weights=args.weights)
    if args.out is not None:
        path = save_adapters(run.model, args.out, dtype=getattr(torch, args.dtype), metadata=task_metadata(run))
        before = (args.run_dir / args.weights).stat().st_size
        print(f"{path}: {path.stat().st_size:,} bytes ({args.dtype}; {before:,} bytes as trained)")
    if args.onnx is not None:
        from mimi.deploy.onnx_export import export_onnx

        res = export_onnx(run.model, args.onnx, img_size=run.info["img_size"], opset=args.opset)
        print(
            f"{res['path']}: {res['bytes']:,} bytes, opset {res['opset']}, dynamic batch; "
            f"onnxruntime vs PyTorch max |diff| {res['max_abs_diff']:.2e}"
        )
    return 0


COMMANDS = [
    Command("info", "per-adapter sizes, parameter counts and bytes of a run or checkpoint", _info_setup, cmd_info),
    Command(
        "export", "write a run's task file (e.g. float16) and/or the whole model as ONNX", _export_setup, cmd_export
    ),
]
