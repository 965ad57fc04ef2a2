"""int8 task files against float32 and float16: bytes per task, and test accuracy of each file served by the bank.

For each MiniVTAB task, the grid's r=3 MiMi run (configs/bench/minivtab.yaml, label ``mimi``, ``budget_dim: 3``,
seed 0) is retrained with the grid's exact settings into its own folder (``runs/int8/<run id>``, resumable; a
finished run there is reused; the grid's own JSON under benchmarks/results/minivtab is not touched), then exported
as float32, float16 and int8 task files. Each file is loaded into an AdapterBank on the backbone it records and
scored on the task's test split; the JSON records bytes, accuracies, the int8 - float32 gap in points, the targets
(< 100,000 bytes, within 0.2 points) and the grid's recorded accuracy of the same run for reference.

    python benchmarks/int8_tasks.py                      # 3 tasks (~15 min of training each on 2 CPU cores)
    python benchmarks/int8_tasks.py --tasks digits elpv_type fmnist_count fashion_mnist
    python benchmarks/int8_tasks.py --spec configs/bench/minivtab_distill.yaml --label mimi-distill  # reuse those runs
    python benchmarks/int8_tasks.py --quick              # a smoke run on a generated toy task (JSON in /tmp)
    python benchmarks/int8_tasks.py --bytes-only         # bytes alone, no training (below; about a minute)

``--bytes-only`` measures what needs no trained values: the bytes of each format for task files of the exact sizes
the seven committed r=3 runs ended with (MiMi: ``*__mimi__budgetdim3__s0.json``; mimi-lora for the PEFT folder:
``*__mimi-lora__budgetdim3__s0.json``), random trained weights, the metadata ``mimi export`` writes (as
benchmarks/bank.py does for fp32 / fp16), and the int8 bytes at every seed's sizes (``__s*``); JSON:
benchmarks/results/perf/task_bytes.json.

Needs the MiniVTAB data (``make minivtab``) and the offline backbone (``imgfocus``) except with ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import mimi
from mimi.backbones import create_backbone
from mimi.bench.runner import _git_commit, _versions
from mimi.bench.spec import BenchSpec
from mimi.config import TrainConfig
from mimi.core.taskfile import save_adapters
from mimi.trainer import load_run, resume, train
from mimi.training.run import task_metadata

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "configs" / "bench" / "minivtab.yaml"
OUT = ROOT / "benchmarks" / "results" / "perf" / "int8_tasks.json"
DTYPES = {"fp32": None, "fp16": torch.float16, "int8": torch.int8}
TARGET_BYTES = 100_000
TARGET_POINTS = 0.2


def grid_config(task: str, spec_path: Path, label: str = "mimi") -> tuple[str, dict, dict | None]:
    """The run id and config of the grid's r=3 MiMi run of ``task`` (seed 0), and the grid's JSON of it if any."""
    spec = BenchSpec.load(spec_path)
    wanted = f"{task}__{label}__budgetdim3__s0"
    run = next((r for r in spec.expand() if r.id == wanted), None)
    if run is None:
        raise SystemExit(f"{spec_path} has no run {wanted}; tasks: {sorted({r.task for r in spec.expand()})}")
    record = Path(spec.results) if Path(spec.results).is_absolute() else ROOT / spec.results
    record = record / f"{wanted}.json"
    cfg = dict(run.config)
    for key in ("data_root", "out"):  # relative to the checkout, wherever the script is started from
        if cfg.get(key) and not Path(cfg[key]).is_absolute():
            cfg[key] = str(ROOT / cfg[key])
    return wanted, cfg, json.loads(record.read_text()) if record.is_file() else None


def quick_config(base: Path) -> tuple[str, dict, None]:
    """A toy task (3 colours, 48/24/30 images of 24 px) and a tiny MiMi run on the test ViT."""
    task = base / "data" / "toy"
    rng = np.random.default_rng(0)
    colours = [(220, 40, 40), (40, 200, 40), (40, 60, 220)]
    for split, n in {"train800": 48, "val200": 24, "test": 30}.items():
        lines = []
        for i in range(n):
            img = rng.integers(0, 60, size=(24, 24, 3)) + np.array(colours[i % 3]) // 2
            rel = f"images/{split}_{i:03d}.png"
            (task / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(task / rel)
            lines.append(f"{rel} {i % 3}")
        (task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    cfg = dict(
        model="test_vit", weights="none", img_size=32, data="vtab1k:toy", data_root=str(base / "data"),
        method="mimi", adapter_dim=8, budget_dim=2, rho=0.5, first_epochs=1, epochs=1, batch_size=16,
        progress=False, save_cycles=False, seed=0, device="cpu",
    )  # fmt: skip
    return "toy__mimi__quick__s0", cfg, None


def record_header(script: str, args: argparse.Namespace) -> dict:
    """The fields every record of these scripts starts with: what ran, when, where, on which versions and grid."""
    spec = None if args.quick else str(args.spec.relative_to(ROOT) if args.spec.is_relative_to(ROOT) else args.spec)
    return {
        "script": script,
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": platform.node(),
        "git_commit": _git_commit(),
        "versions": _versions(),
        "torch_threads": torch.get_num_threads(),
        "spec": spec,
    }


def write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"-> {path}")


def _finished(folder: Path) -> bool:
    return (folder / "adapters.safetensors").is_file() and (folder / "summary.json").is_file()


def trained_run(cfg: dict, out: Path) -> tuple[Path, float | None]:
    """A finished folder of the run (the grid's own if it is at hand, else ``out``, trained or resumed there);
    the seconds spent training (None: reused)."""
    for folder in (Path(cfg["out"]) if cfg.get("out") else None, out):
        if folder is not None and _finished(folder):
            return folder, None
    start = time.perf_counter()
    if (out / "config.yaml").is_file():
        resume(out, log=print)
    else:
        train(TrainConfig.from_dict({**cfg, "out": str(out)}), log=print)
    return out, time.perf_counter() - start


def backbone(cfg: TrainConfig) -> torch.nn.Module:
    """The run's frozen backbone, built as training built it (same seed before creation: random-init weights agree)."""
    torch.manual_seed(cfg.seed)
    return create_backbone(cfg.model, weights=cfg.weights, img_size=cfg.img_size, model_kwargs=cfg.model_kwargs)[0]


@torch.inference_mode()
def bank_accuracy(path: Path, run, *, device: str, batch_size: int) -> float:
    """Test accuracy of one task file served by a bank on the run's backbone (the bank checks its fingerprint)."""
    bank = mimi.AdapterBank(backbone(run.cfg), device=device)
    bank.add("t", path)
    loader = torch.utils.data.DataLoader(run.task.test, batch_size=batch_size)
    correct = total = 0
    for x, y in loader:
        pred = bank.logits(x, "t").argmax(-1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return correct / total


def measure(rid: str, cfg: dict, grid: dict | None, *, runs: Path, files: Path, device: str) -> dict:
    run_dir, seconds = trained_run(cfg, runs / rid)
    run = load_run(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    out = {
        "run_dir": str(run_dir),
        "train_seconds": seconds,
        "run_test_acc": summary[-1]["test_acc"],
        "grid_test_acc": grid.get("test_acc") if grid else None,
        "adapter_params": summary[-1]["adapter_params"],
        "files": {},
    }
    for label, dtype in DTYPES.items():
        path = save_adapters(run.model, files / f"{rid}.{label}.safetensors", dtype=dtype, metadata=task_metadata(run))
        acc = bank_accuracy(path, run, device=device, batch_size=cfg.get("eval_batch_size", 256))
        out["files"][label] = {"bytes": path.stat().st_size, "test_acc": acc}
        print(f"{rid} {label}: {path.stat().st_size:,} bytes, test accuracy {100 * acc:.2f}%")
    f = out["files"]
    out["int8_minus_fp32_points"] = 100 * (f["int8"]["test_acc"] - f["fp32"]["test_acc"])
    out["int8_under_target_bytes"] = f["int8"]["bytes"] < TARGET_BYTES
    out["int8_within_target_points"] = abs(out["int8_minus_fp32_points"]) <= TARGET_POINTS
    return out


def sized_model(record: dict, *, lora: bool) -> torch.nn.Module:
    """ViT-S/14 at 56 px holding adapters (or mimi-lora's linear adapters) of a committed run's final sizes."""
    from mimi.core.adapters import AdapterConfig, add_adapters
    from mimi.core.lora import DEFAULT_TARGETS
    from mimi.core.shrink import apply_plan

    cfg = record["config"]
    model = create_backbone(cfg["model"], weights="none", img_size=cfg["img_size"])[0]
    model.reset_classifier(record["data"]["num_classes"])
    if lora:  # mimi-lora: rank 16 at insertion, scale alpha / 16 = 1
        add_adapters(
            model,
            AdapterConfig(hidden_dim=16, placement="parallel", act="identity", bias=False, targets=DEFAULT_TARGETS),
        )
    else:
        add_adapters(model, AdapterConfig(hidden_dim=cfg["adapter_dim"]))
    sizes = record["cycles"][-1]["sizes"]
    apply_plan(model, {n: list(range(h)) for n, h in sizes.items()})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def task_bytes(out: Path) -> None:
    """Bytes of every format for task files of the committed r=3 runs' sizes (no training)."""
    from mimi.deploy.peft_folder import lora_parts, write_peft_folder
    from mimi.reporting.card import base_model

    results = ROOT / "benchmarks" / "results" / "minivtab"
    tmp = Path(tempfile.mkdtemp(prefix="mimi-bytes-"))
    tasks = {}
    for path in sorted(results.glob("*__mimi__budgetdim3__s0.json")):
        record = json.loads(path.read_text())
        cfg, task = record["config"], record["task"]
        meta = {"method": "mimi", "model": cfg["model"], "weights_source": cfg["weights"]}
        meta.update(img_size=str(cfg["img_size"]), data=task)
        model = sized_model(record, lora=False)
        row = {"adapter_params": record["cycles"][-1]["adapter_params"], "classes": record["data"]["num_classes"]}
        for label, dtype in DTYPES.items():
            f = save_adapters(model, tmp / f"{path.stem}.{label}.safetensors", dtype=dtype, metadata=meta)
            row[f"mimi_{label}"] = f.stat().st_size
        lora_record = results / path.name.replace("__mimi__", "__mimi-lora__")
        if lora_record.is_file():
            record = json.loads(lora_record.read_text())
            model = sized_model(record, lora=True)
            meta["method"] = "mimi-lora"
            row["mimi_lora_adapter_params"] = record["cycles"][-1]["adapter_params"]
            for label, dtype in DTYPES.items():
                f = save_adapters(model, tmp / f"{lora_record.stem}.{label}.safetensors", dtype=dtype, metadata=meta)
                row[f"mimi_lora_{label}"] = f.stat().st_size
            folder = tmp / f"{lora_record.stem}.peft"
            write_peft_folder(lora_parts(model), folder, base_model=base_model(cfg["model"]), task=meta)
            row["mimi_lora_peft_folder"] = sum(f.stat().st_size for f in folder.iterdir())
        tasks[task] = row
        print(task, row)
    every = {}  # the int8 bytes at the final sizes of every seed's r=3 MiMi run: how close the largest comes
    for path in sorted(results.glob("*__mimi__budgetdim3__s*.json")):
        record = json.loads(path.read_text())
        cfg = record["config"]
        meta = {"method": "mimi", "model": cfg["model"], "weights_source": cfg["weights"]}
        meta.update(img_size=str(cfg["img_size"]), data=record["task"])
        f = save_adapters(sized_model(record, lora=False), tmp / "every.safetensors", dtype=torch.int8, metadata=meta)
        every[path.stem] = f.stat().st_size
    print(f"int8, every seed: {min(every.values()):,}-{max(every.values()):,} bytes over {len(every)} runs")
    record = {
        "script": "benchmarks/int8_tasks.py --bytes-only",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": platform.node(),
        "git_commit": _git_commit(),
        "versions": _versions(),
        "note": "random trained weights of the committed runs' final sizes; bytes depend on shapes and metadata only",
        "tasks": tasks,
        "mimi_int8_every_seed": every,
        "mimi_int8_every_seed_max": max(every.values()),
        "mimi_int8_every_seed_under_100000": sum(b < TARGET_BYTES for b in every.values()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"-> {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["digits", "elpv_type", "fmnist_count"], help="MiniVTAB tasks")
    p.add_argument("--spec", type=Path, default=SPEC, help="the grid whose r=3 MiMi runs are retrained")
    p.add_argument(
        "--label",
        default="mimi",
        help="the spec's r=3 MiMi label (e.g. mimi-distill with --spec configs/bench/minivtab_distill.yaml: "
        "its finished run folders are reused, not retrained)",
    )
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "int8", help="run folders (resumable, reused)")
    p.add_argument("--out", type=Path, default=OUT, help="the JSON written")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="a toy task and a tiny run (checks the script)")
    p.add_argument("--bytes-only", action="store_true", help="bytes of each format at the committed r=3 sizes")
    args = p.parse_args()
    if args.bytes_only:
        return task_bytes(OUT.with_name("task_bytes.json") if args.out == OUT else args.out)
    tmp = Path(tempfile.mkdtemp(prefix="mimi-int8-"))
    if args.quick:
        jobs = [quick_config(tmp)]
        args.runs = tmp / "runs"
        args.out = args.out if args.out != OUT else tmp / "int8_tasks_quick.json"  # toy numbers: not a result
    else:
        jobs = [grid_config(t, args.spec, args.label) for t in args.tasks]
    files = tmp / "files"
    results = {}
    start = time.perf_counter()
    for rid, cfg, grid in jobs:
        results[rid] = measure(rid, cfg, grid, runs=args.runs, files=files, device=args.device)
    record = {
        **record_header("benchmarks/int8_tasks.py", args),
        "configs": {rid: cfg for rid, cfg, _ in jobs},
        "targets": {"int8_bytes_below": TARGET_BYTES, "int8_within_points_of_fp32": TARGET_POINTS},
        "tasks": results,
        "wall_seconds": time.perf_counter() - start,
    }
    write_record(args.out, record)


if __name__ == "__main__":
    main()
