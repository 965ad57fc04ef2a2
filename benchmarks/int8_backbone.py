"""The int8 backbone's accuracy, per task: the grid's r=3 MiMi task served by a float32 and an int8 bank.

For each MiniVTAB task, the grid's r=3 MiMi run (configs/bench/minivtab.yaml, label ``mimi``, ``budget_dim: 3``,
seed 0) is taken from ``runs/int8/<run id>`` where benchmarks/int8_tasks.py trained it (retrained there with the
grid's exact settings when missing; resumable), exported as a float32 task file and scored on the task's full test
split by three banks on the same backbone: float32, int8 with each engine of :mod:`mimi.core.int8_backbone`
(``quantize_dynamic``, the default, and ``torchao``). The JSON records each accuracy, the int8 - float32 gap in
points (target: within 0.5 on every task), and the share of test images whose top-1 class the int8 bank keeps.

    python benchmarks/int8_backbone.py                         # 3 tasks (trained runs reused: a few minutes)
    python benchmarks/int8_backbone.py --tasks digits elpv_type fmnist_count fashion_mnist
    python benchmarks/int8_backbone.py --quick                 # a toy task and a tiny run (JSON in /tmp)

Needs the MiniVTAB data (``make minivtab``), the offline backbone (``imgfocus``) and the ``int8`` extra, except
with ``--quick``. Speed is measured elsewhere: benchmarks/int8_backbone_engines.py (engines), benchmarks/bank.py
``--backbone-dtypes`` (the bank) and benchmarks/serve.py ``--backbone-dtypes`` (the server).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from int8_tasks import ROOT, SPEC, backbone, grid_config, quick_config, record_header, trained_run, write_record

import mimi
from mimi.core.int8_backbone import ENGINES
from mimi.core.taskfile import save_adapters
from mimi.trainer import load_run
from mimi.training.run import task_metadata

OUT = ROOT / "benchmarks" / "results" / "perf" / "int8_backbone_accuracy.json"
TARGET_POINTS = 0.5


@torch.inference_mode()
def test_predictions(bank: mimi.AdapterBank, run, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 class of every test image, and the labels, in the split's order."""
    preds, labels = [], []
    for x, y in torch.utils.data.DataLoader(run.task.test, batch_size=batch_size):
        preds.append(bank.logits(x, "t").argmax(-1).cpu())
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def measure(rid: str, cfg: dict, grid: dict | None, *, runs: Path, files: Path) -> dict:
    run_dir, seconds = trained_run(cfg, runs / rid)
    run = load_run(run_dir, device="cpu")
    path = save_adapters(run.model, files / f"{rid}.safetensors", metadata=task_metadata(run))
    batch = cfg.get("eval_batch_size", 256)
    out = {"run_dir": str(run_dir), "train_seconds": seconds, "eval_batch_size": batch, "banks": {}}
    out["grid_test_acc"] = grid.get("test_acc") if grid else None
    reference = None
    for dtype, engine in [("float32", None)] + [("int8", e) for e in ENGINES]:
        label = dtype if engine is None else f"int8-{engine}"
        start = time.perf_counter()
        bank = mimi.AdapterBank(backbone(run.cfg), device="cpu", backbone_dtype=dtype, int8_engine=engine)
        bank.add("t", path)
        preds, labels = test_predictions(bank, run, batch)
        acc = float((preds == labels).float().mean())
        row = {"test_acc": acc, "seconds": time.perf_counter() - start, "backbone": bank.quantized.describe()}
        if reference is None:
            reference = (preds, acc)
        else:
            row["minus_float32_points"] = 100 * (acc - reference[1])
            row["top1_agreement"] = float((preds == reference[0]).float().mean())
            row["within_target"] = abs(row["minus_float32_points"]) <= TARGET_POINTS
        out["banks"][label] = row
        extra = f" ({row['minus_float32_points']:+.2f} points)" if "minus_float32_points" in row else ""
        print(f"{rid} {label}: test accuracy {100 * acc:.2f}%{extra}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["digits", "elpv_type", "fmnist_count"], help="MiniVTAB tasks")
    p.add_argument("--spec", type=Path, default=SPEC, help="the grid whose r=3 MiMi runs are used")
    p.add_argument("--label", default="mimi", help="the spec's r=3 MiMi label")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "int8", help="run folders (reused, or trained there)")
    p.add_argument("--out", type=Path, default=OUT, help="the JSON written")
    p.add_argument("--quick", action="store_true", help="a toy task and a tiny run (checks the script)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mimi-int8-backbone-"))
    if args.quick:
        jobs = [quick_config(tmp)]
        args.runs = tmp / "runs"
        args.out = args.out if args.out != OUT else tmp / "int8_backbone_accuracy_quick.json"  # toy numbers
    else:
        jobs = [grid_config(t, args.spec, args.label) for t in args.tasks]
    start = time.perf_counter()
    results = {rid: measure(rid, cfg, grid, runs=args.runs, files=tmp / "files") for rid, cfg, grid in jobs}
    record = {
        **record_header("benchmarks/int8_backbone.py", args),
        "quantized_engine": torch.backends.quantized.engine,
        "target_points": TARGET_POINTS,
        "tasks": results,
        "wall_seconds": time.perf_counter() - start,
    }
    write_record(args.out, record)


if __name__ == "__main__":
    main()
