"""`mimi info` (what a task file, PEFT folder or run holds) and `mimi export` (a run as a task file, fp32 to int8; a PEFT
LoRA folder; ONNX; a model card)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mimi.cli.command import Command
from mimi.core.errors import ConfigError
from mimi.core.modules import is_transformers


def _info_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="a run folder, a task file (.safetensors) or a PEFT LoRA folder")
    p.add_argument("--budget", type=int, metavar="N", help="a run folder's task kept at budget N (several budgets)")


def _stored(tensors: dict, per: dict[str, int], names: list[str]) -> tuple[int, int]:
    """Parameters and bytes on disk of the named tensors (a quantised weight's bytes include its float16 scales)."""
    return sum(tensors[k].numel() for k in names), sum(per.get(k, 0) for k in names)


def _info_peft(path: Path) -> int:
    from mimi.deploy.peft_folder import read_peft_folder

    f = read_peft_folder(path)
    print(f"{path}: PEFT LoRA folder, {f.file_bytes:,} bytes on disk (adapter_config.json + adapter_model.safetensors)")
    if f.model:
        size = f" at {f.img_size} px" if f.img_size else ""
        print(
            f"trained: {f.method} on backbone {f.model}{size}"
            + (f", weights {f.weights_source}" if f.weights_source else "")
        )
    print(f"{'LoRA layer':<40} {'rank':>6} {'scale':>8} {'params':>9} {'bytes':>9}")
    for layer, spec in f.lora.items():
        ts = list(f.lora_tensors[layer].values())
        n, b = sum(t.numel() for t in ts), sum(t.numel() * t.element_size() for t in ts)
        print(f"{layer:<40} {spec['rank']:>6} {spec['alpha'] / spec['rank']:>8.4g} {n:>9,} {b:>9,}")
    ranks = sum(int(s["rank"]) for s in f.lora.values())
    print(f"LoRA: {len(f.lora)} layers, {ranks} ranks, {f.adapter_params:,} parameters ({f.stored_dtype})")
    source = "labels.json" if (path / "labels.json").is_file() else "the file" if f.classes else None
    names = f", names from {source}" if source else ", no class names (ids)"
    print(f"head: {f.head_params:,} parameters, {f.num_classes} classes{names}")
    return 0


def _natural(name: str) -> list[int | str]:
    """Sort key that puts ``blocks.2`` before ``blocks.10``."""
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def cmd_info(args: argparse.Namespace) -> int:
    from mimi.core.taskfile import byte_breakdown, load_tensors, read_metadata, tensor_bytes, unit_sizes
    from mimi.deploy.peft_folder import is_peft_folder

    if is_peft_folder(args.path):
        return _info_peft(args.path)
    if args.budget is not None:
        from mimi.trainer import budget_weights

        path = args.path / budget_weights(args.path, args.budget)
    else:
        path = args.path / "adapters.safetensors" if args.path.is_dir() else args.path
    meta = read_metadata(path)
    tensors = load_tensors(path, dequantize=False)  # as stored: int8 (int4) codes, scales apart
    per = tensor_bytes(path, meta)  # bytes on disk of each trained tensor, its scales included
    sizes = unit_sizes(json.loads(meta["sizes"]), json.loads(meta.get("lora", "{}")))  # LoRA: a rank per layer
    head = set(json.loads(meta.get("head", "[]")))
    stored = f", {meta['stored_dtype']}" if meta.get("stored_dtype") else ""
    print(f"{path}: {path.stat().st_size:,} bytes on disk{stored}")
    if meta.get("model"):  # what it was trained on: what `mimi predict` serves it with by default
        size = f" at {meta['img_size']} px" if meta.get("img_size") else ""
        source = f", weights {meta['weights_source']}" if meta.get("weights_source") else ""
        print(f"trained: {meta.get('method', '?')} on {meta.get('data', '?')}, backbone {meta['model']}{size}{source}")
    lora = "lora" in meta
    trained = [k for k in tensors if not k.startswith("__")]
    # what a method trains besides adapters, LoRA layers and the head (FacT's factors, VPT's prompts...), by module
    others: dict[str, list[str]] = {}
    for k in trained:
        if k not in head and not any(k.startswith(name + ".") for name in sizes):
            others.setdefault(k.rpartition(".")[0], []).append(k)
    by_adapter = bool(sizes) or not others  # adapters or LoRA layers, else what the method trains (prompts, ...)
    first = "LoRA layer" if lora else "adapter" if by_adapter else "trained module"
    print(f"{first:<40} {'rank' if lora else 'hidden':>6} {'params':>9} {'bytes':>9}")
    for name, h in sizes.items():
        n, b = _stored(tensors, per, [k for k in trained if k.startswith(name + ".")])
        print(f"{name:<40} {h:>6} {n:>9,} {b:>9,}")
    for module, names in sorted(others.items(), key=lambda item: _natural(item[0])):
        n, b = _stored(tensors, per, names)
        print(f"{module:<40} {'-':>6} {n:>9,} {b:>9,}")
    head_n, _ = _stored(tensors, per, [k for k in trained if k in head])
    total, total_b = _stored(tensors, per, trained)
    parts = byte_breakdown(path)
    other = f" + other {parts['other']:,}" if parts["other"] else ""
    kind = "LoRA" if lora else "adapters" if by_adapter else "trained"
    print(
        f"bytes: {kind} {parts['adapters']:,} + head {parts['head']:,} + header "
        f"{parts['header']:,} (JSON + 8-byte length){other} = {parts['total']:,}"
    )
    if by_adapter:
        print(f"adapters: {len(sizes)} alive, {sum(sizes.values())} hidden neurons, {total - head_n:,} parameters")
    else:
        print(f"trained besides the head: {len(others)} modules, {total - head_n:,} parameters")
    print(f"head: {head_n:,} parameters; total trained: {total:,} ({total_b:,} bytes)")
    return 0


def _export_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run folder written by `mimi train`")
    p.add_argument("--out", type=Path, help="destination task file (.safetensors): the adapters and head only")
    p.add_argument(
        "--peft",
        type=Path,
        metavar="DIR",
        help="a PEFT LoRA folder (lora, mimi-lora, peft-lora runs; float32, with a model card and labels.json)",
    )
    p.add_argument(
        "--onnx", type=Path, metavar="OUT.onnx", help="also (or only) write backbone + adapters + head as ONNX"
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16", "int8", "int4"],
        default="float16",
        help="storage dtype of the --out file (default: float16, half the bytes; int8: every weight matrix, the head "
        "included, as int8 codes with a float16 scale per row or column, whichever are fewer (per class for the "
        "head), biases float16; int4: adapter and LoRA weights as two 4-bit codes a byte, the head int8)",
    )
    p.add_argument("--card", action="store_true", help="write a model card (README.md) beside the --out file")
    p.add_argument("--weights", default="adapters.safetensors", help="file in the run folder to export")
    p.add_argument("--budget", type=int, metavar="N", help="export the task a run of several budgets kept at N")


def _check_export_args(args: argparse.Namespace) -> Path | None:
    """Every check that needs no model; returns where --card writes (None: no separate card)."""
    from mimi.deploy.peft_folder import is_peft_folder
    from mimi.reporting.card import is_mimi_card

    if args.out is None and args.onnx is None and args.peft is None:
        raise ConfigError("nothing to export: pass --out FILE.safetensors, --peft DIR and/or --onnx FILE.onnx")
    if args.onnx is not None and args.onnx.suffix != ".onnx":
        raise ConfigError(f"--onnx {args.onnx}: the file name must end in .onnx")
    if args.out is not None and args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder; give a file name ending in .safetensors")
    p = args.peft
    if p is not None and p.exists() and (not p.is_dir() or (any(p.iterdir()) and not is_peft_folder(p))):
        raise ConfigError(f"--peft {p}: exists and is not a PEFT folder; pick a new folder")
    if not args.card or args.out is None and args.onnx is None:
        return None  # a --peft folder always holds its card
    card = (args.out if args.out is not None else args.onnx).parent / "README.md"
    if card.exists() and not is_mimi_card(card):
        raise ConfigError(f"--card: {card} exists and is not a mimi model card; export into another folder")
    return card


def _trained_facts(model) -> tuple[dict[str, int], int, int]:
    """Per-layer sizes (LoRA ranks or adapter hidden sizes), adapter and head parameters of a mimi model."""
    from mimi.core.adapters import adapters
    from mimi.core.lora import lora_layout
    from mimi.core.taskfile import head_param_names, trained_state, unit_sizes

    state = trained_state(model)
    head = set(head_param_names(model))
    sizes = unit_sizes({n: a.hidden_dim for n, a in adapters(model)}, lora_layout(model))
    head_n = sum(t.numel() for k, t in state.items() if k in head)
    return sizes, sum(t.numel() for t in state.values()) - head_n, head_n


def _peft_task_meta(run) -> dict:
    from mimi.core.taskfile import backbone_fingerprint, model_architecture
    from mimi.training.run import task_metadata

    inner = run.model.base_model.model if hasattr(run.model, "peft_config") else run.model
    meta: dict = {k: v for k, v in task_metadata(run).items() if k != "classes"}
    meta.update(architecture=model_architecture(inner), backbone_fingerprint=backbone_fingerprint(inner))
    if run.task.classes:
        meta["classes"] = list(run.task.classes)
    return {k: v for k, v in meta.items() if v}


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from mimi.core.files import atomic_write_text
    from mimi.core.taskfile import save_adapters
    from mimi.deploy.peft_folder import for_transformers, lora_parts, write_peft_folder
    from mimi.reporting.card import base_model, facts_from_run, render_card
    from mimi.trainer import load_run
    from mimi.training.run import task_metadata

    card_path = _check_export_args(args)
    if args.budget is not None:
        from mimi.trainer import budget_weights

        args.weights = budget_weights(args.run_dir, args.budget)
    run = load_run(args.run_dir, weights=args.weights)
    classes = list(run.task.classes) if run.task.classes else None
    license = run.task.license
    parts, written = None, {}
    if args.peft is not None:  # refused before anything is written
        try:
            parts = lora_parts(run.model, method=f"method {run.cfg.method}")
            if is_transformers(run.cfg.model):
                parts = for_transformers(parts)
        except ConfigError as e:
            raise ConfigError(f"{args.run_dir}: {e}") from e
    if args.out is not None:
        dtype = "int4" if args.dtype == "int4" else getattr(torch, args.dtype)
        path = save_adapters(run.model, args.out, dtype=dtype, metadata=task_metadata(run))
        before = (args.run_dir / args.weights).stat().st_size
        print(f"{path}: {path.stat().st_size:,} bytes ({args.dtype}; {before:,} bytes as trained)")
        written[path.name] = path.stat().st_size
    if parts is not None:
        folder = args.peft
        ranks = {n: int(a.shape[0]) for n, (a, _, _) in parts.layers.items()}
        n_lora = sum(a.numel() + b.numel() for a, b, _ in parts.layers.values())
        n_head = sum(t.numel() for t in parts.head.values())

        def card(files: dict[str, int]) -> str:
            facts = facts_from_run(
                args.run_dir,
                name=folder.name,
                files=files,
                sizes=ranks,
                adapter_params=n_lora,
                head_params=n_head,
                load_path=folder.name,  # the card lives in the folder: name it as its users will have it
                dtype="float32",
                peft=True,
                classes=classes,
                license=license,
            )
            return render_card(facts)

        write_peft_folder(
            parts,
            folder,
            base_model=base_model(run.cfg.model),
            task=_peft_task_meta(run),
            classes=classes,
            card=card,
        )
        total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        print(
            f"{folder}/: PEFT LoRA folder, {len(ranks)} layers, {total:,} bytes (adapter_config.json, "
            "adapter_model.safetensors, README.md" + (", labels.json" if classes else "") + ")"
        )
    if args.onnx is not None:
        from mimi.deploy.onnx_export import export_onnx

        res = export_onnx(run.model, args.onnx, img_size=run.info["img_size"], opset=args.opset)
        print(
            f"{res['path']}: {res['bytes']:,} bytes, opset {res['opset']}, dynamic batch; "
            f"onnxruntime vs PyTorch max |diff| {res['max_abs_diff']:.2e}"
        )
        written[Path(res["path"]).name] = int(res["bytes"])
    if card_path is not None:
        sizes, n_adapter, n_head = _trained_facts(run.model)
        load = args.out.name if args.out is not None else None
        facts = facts_from_run(
            args.run_dir,
            name=(args.out or args.onnx).stem,
            files=written,
            sizes=sizes,
            adapter_params=n_adapter,
            head_params=n_head,
            load_path=load or str(args.run_dir / args.weights),
            dtype=args.dtype if args.out is not None else "float32",
            classes=classes,
            license=license,
        )
        atomic_write_text(card_path, render_card(facts))
        print(f"{card_path}: model card")
    return 0


COMMANDS = [
    Command("info", "per-adapter sizes, parameter counts and bytes of a run or checkpoint", _info_setup, cmd_info),
    Command(
        "export",
        "write a run as a task file (float16, int8...), a PEFT LoRA folder and/or ONNX, with a model card",
        _export_setup,
        cmd_export,
    ),
]
