"""Kilobyte task files on trained runs: bytes by part and test accuracy of fp32, fp16, int8 and int4 at each budget.

For every finished MiMi run of several budgets in ``--runs`` (default: the kilobyte grid's run folders,
``runs/bench/minivtab_kb/*__mimi-kb__s0``, configs/bench/minivtab_kb.yaml), the task kept at each budget
(``budgets/B.safetensors``) is loaded through its run, written as fp32, fp16, int8 and int4 task files, and each file
is loaded into an AdapterBank on the backbone it records and scored on the task's full test split. The JSON records
each file's bytes by part (adapters, head, header; :func:`mimi.core.taskfile.byte_breakdown`), its test accuracy, the
gap to fp32 in points, and the issue's targets at 8,000 parameters (int8 under 16,000 bytes, within 0.3 points).

    python benchmarks/kb_int8_tasks.py                     # from the repository root; every finished mimi-kb run folder (~1 min a budget)
    python benchmarks/kb_int8_tasks.py --budgets 8000      # the 8k tasks only
    python benchmarks/kb_int8_tasks.py --peers fact-tt adapter-spread   # the 8k peers' runs (seed 0) instead
    python benchmarks/kb_int8_tasks.py --peers fact-tt --peer-budget 4000   # the 4k FacT-TT runs

With ``--peers``, the runs are the grid's single-budget runs of those labels at 8,000 parameters, seed 0 (their
final task; JSON ``benchmarks/results/perf/kb_int8_peers.json``, or ``kb_int8_peers_<N>.json`` at another
``--peer-budget``): the same bytes and accuracies, so the peers a user would pick at that size are measured as files
too; the size and accuracy targets are then checked at that budget. Methods a bank cannot serve (VPT) are scored by
loading each file back into the run's model instead.

Needs the MiniVTAB data (``make minivtab``), the offline backbone, and the runs (``mimi bench
configs/bench/minivtab_kb.yaml``).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import machine, write_record
from int8_tasks import bank_accuracy

from mimi.core.taskfile import byte_breakdown, load_adapters, save_adapters
from mimi.methods import method_traits
from mimi.trainer import load_run
from mimi.training.run import task_metadata

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "perf" / "kb_int8_tasks.json"
PEERS_OUT = OUT.with_name("kb_int8_peers.json")
DTYPES = {"fp32": None, "fp16": torch.float16, "int8": torch.int8, "int4": "int4"}
TARGET_BUDGET, TARGET_BYTES, TARGET_POINTS = 8000, 16_000, 0.3


def model_accuracy(path: Path, run, *, device: str, batch_size: int) -> float:
    """Test accuracy of one task file loaded back into (a copy of) the run's model: for methods no bank serves."""
    model = load_adapters(copy.deepcopy(run.model), path).to(device).eval()
    loader = torch.utils.data.DataLoader(run.task.test, batch_size=batch_size)
    correct = total = 0
    with torch.inference_mode():
        for x, y in loader:
            correct += int((model(x.to(device)).argmax(-1).cpu() == y).sum())
            total += len(y)
    return correct / total


def measure(run_dir: Path, budget: int | None, files: Path, *, device: str) -> dict:
    """Every storage form of the task ``run_dir`` kept at ``budget`` (None: the run's final task): bytes by part
    and test accuracy, served by a bank where the method is servable."""
    run = load_run(run_dir, budget=budget) if budget is not None else load_run(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    entry = summary[-1] if budget is None else next(e for e in summary if e.get("budget") == budget)
    score = bank_accuracy if method_traits(run.cfg.method).servable else model_accuracy
    out = {"adapter_params": entry["adapter_params"], "run_test_acc": entry["test_acc"], "files": {}}
    out["method"], out["scored_by"] = run.cfg.method, "bank" if score is bank_accuracy else "model"
    for label, dtype in DTYPES.items():
        path = files / f"{run_dir.name}.{budget}.{label}.safetensors"
        save_adapters(run.model, path, dtype=dtype, metadata=task_metadata(run))
        acc = score(path, run, device=device, batch_size=run.cfg.eval_batch_size)
        out["files"][label] = {"bytes": byte_breakdown(path), "test_acc": acc}
        parts = out["files"][label]["bytes"]
        print(
            f"{run_dir.name} @ {budget or 'final'} {label}: {parts['total']:,} bytes (adapters {parts['adapters']:,}, head "
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
    p.add_argument(
        "--peers", nargs="+", metavar="LABEL", help="measure these labels' single-budget runs (seed 0) instead"
    )
    p.add_argument("--peer-budget", type=int, default=TARGET_BUDGET, help="the peers' budget (default 8,000)")
    p.add_argument("--out", type=Path, default=None, help="the JSON written (default: by what is measured)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    grid = ROOT / "runs" / "bench" / "minivtab_kb"
    if args.peers:
        pattern = f"__budgetparams{args.peer_budget}__s0"
        runs = args.runs or [r for label in args.peers for r in sorted(grid.glob(f"*__{label}{pattern}"))]
    else:
        runs = args.runs or sorted(grid.glob("*__mimi-kb__s0"))
    runs = [r for r in runs if (r / "adapters.safetensors").is_file()]  # finished runs only
    if not runs:
        raise SystemExit("no finished run to measure: run `mimi bench configs/bench/minivtab_kb.yaml` first")
    target_budget = args.peer_budget if args.peers else TARGET_BUDGET
    if args.out is None:
        suffix = "" if target_budget == TARGET_BUDGET else f"_{target_budget}"
        args.out = PEERS_OUT.with_name(f"{PEERS_OUT.stem}{suffix}.json") if args.peers else OUT
    start, results = time.perf_counter(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for run_dir in runs:
            kept = json.loads((run_dir / "run.json").read_text()).get("budgets") or [None]
            for b in [b for b in kept if b is None or args.budgets is None or b in args.budgets]:
                key = str(b if b is not None else target_budget)
                results.setdefault(run_dir.name, {})[key] = measure(run_dir, b, Path(tmp), device=args.device)
    at_target = [r[str(target_budget)] for r in results.values() if str(target_budget) in r]
    targets = {
        "budget": target_budget,
        "tasks": len(at_target),
        "int8_bytes_max": max((r["files"]["int8"]["bytes"]["total"] for r in at_target), default=None),
        "int8_gap_points_max_abs": max((abs(r["int8_minus_fp32_points"]) for r in at_target), default=None),
    }
    targets["met"] = bool(at_target) and len(at_target) >= 3
    targets["met"] = targets["met"] and targets["int8_bytes_max"] < TARGET_BYTES
    targets["met"] = targets["met"] and targets["int8_gap_points_max_abs"] <= TARGET_POINTS
    print(f"at {target_budget:,}: {json.dumps(targets)}")
    args.runs = [str(r) for r in args.runs] if args.runs else None  # as given, for the record
    info = machine()
    write_record(args.out, args, info, runs=results, targets=targets, seconds=time.perf_counter() - start)


if __name__ == "__main__":
    main()
