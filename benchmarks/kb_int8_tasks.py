"""Kilobyte task files on trained runs: bytes by part and test accuracy of fp32, fp16, int8 and int4 at each budget.

For every finished MiMi run of several budgets in ``--runs`` (default: the kilobyte grid's run folders,
``runs/bench/minivtab_kb/*__mimi-kb__s0``, configs/bench/minivtab_kb.yaml), the task kept at each budget
(``budgets/B.safetensors``) is loaded through its run, written as fp32, fp16, int8 and int4 task files, and each file
is loaded into an AdapterBank on the backbone it records and scored on the task's full test split. The JSON records
each file's bytes by part (adapters, head, header; :func:`mimi.core.taskfile.byte_breakdown`), its test accuracy, the
gap to fp32 in points, and the issue's targets at 8,000 parameters (int8 under 16,000 bytes, within 0.3 points).

    python benchmarks/kb_int8_tasks.py                     # from the repository root; every finished mimi-kb run folder (~1 min a budget)
    python benchmarks/kb_int8_tasks.py --budgets 8000      # the 8k tasks only

Needs the MiniVTAB data (``make minivtab``), the offline backbone, and the runs (``mimi bench
configs/bench/minivtab_kb.yaml``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import machine, write_record
from int8_tasks import bank_accuracy

from mimi.core.taskfile import byte_breakdown, save_adapters
from mimi.trainer import load_run
from mimi.training.run import task_metadata

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "perf" / "kb_int8_tasks.json"
DTYPES = {"fp32": None, "fp16": torch.float16, "int8": torch.int8, "int4": "int4"}
TARGET_BUDGET, TARGET_BYTES, TARGET_POINTS = 8000, 16_000, 0.3


def measure(run_dir: Path, budget: int, files: Path, *, device: str) -> dict:
    """Every storage form of the task ``run_dir`` kept at ``budget``: bytes by part and bank test accuracy."""
    run = load_run(run_dir, budget=budget)
    entry = next(e for e in json.loads((run_dir / "summary.json").read_text()) if e.get("budget") == budget)
    out = {"adapter_params": entry["adapter_params"], "run_test_acc": entry["test_acc"], "files": {}}
    for label, dtype in DTYPES.items():
        path = files / f"{run_dir.name}.{budget}.{label}.safetensors"
        save_adapters(run.model, path, dtype=dtype, metadata=task_metadata(run))
        acc = bank_accuracy(path, run, device=device, batch_size=run.cfg.eval_batch_size)
        out["files"][label] = {"bytes": byte_breakdown(path), "test_acc": acc}
        parts = out["files"][label]["bytes"]
        print(
            f"{run_dir.name} @ {budget:,} {label}: {parts['total']:,} bytes (adapters {parts['adapters']:,}, head "
            f"{parts['head']:,}, header {parts['header']:,}), test {100 * acc:.2f}%"
        )
    fp32 = out["files"]["fp32"]["test_acc"]
    for label in ("fp16", "int8", "int4"):
        out[f"{label}_minus_fp32_points"] = 100 * (out["files"][label]["test_acc"] - fp32)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", type=Path, help="run folders (default: the kilobyte grid's mimi-kb seed 0)")
    p.add_argument("--budgets", nargs="+", type=int, help="budgets to measure (default: every one a run kept)")
    p.add_argument("--out", type=Path, default=OUT, help="the JSON written")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    runs = args.runs or sorted((ROOT / "runs" / "bench" / "minivtab_kb").glob("*__mimi-kb__s0"))
    runs = [r for r in runs if (r / "adapters.safetensors").is_file()]  # finished runs only
    if not runs:
        raise SystemExit("no finished run of several budgets: run `mimi bench configs/bench/minivtab_kb.yaml` first")
    start, results = time.perf_counter(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for run_dir in runs:
            kept = json.loads((run_dir / "run.json").read_text()).get("budgets", [])
            for b in [b for b in kept if args.budgets is None or b in args.budgets]:
                results.setdefault(run_dir.name, {})[str(b)] = measure(run_dir, b, Path(tmp), device=args.device)
    at_target = [r[str(TARGET_BUDGET)] for r in results.values() if str(TARGET_BUDGET) in r]
    targets = {
        "budget": TARGET_BUDGET,
        "tasks": len(at_target),
        "int8_bytes_max": max((r["files"]["int8"]["bytes"]["total"] for r in at_target), default=None),
        "int8_gap_points_max_abs": max((abs(r["int8_minus_fp32_points"]) for r in at_target), default=None),
    }
    targets["met"] = bool(at_target) and len(at_target) >= 3
    targets["met"] = targets["met"] and targets["int8_bytes_max"] < TARGET_BYTES
    targets["met"] = targets["met"] and targets["int8_gap_points_max_abs"] <= TARGET_POINTS
    print(f"at {TARGET_BUDGET:,}: {json.dumps(targets)}")
    info = machine()
    write_record(args.out, args, info, runs=results, targets=targets, seconds=time.perf_counter() - start)


if __name__ == "__main__":
    main()
