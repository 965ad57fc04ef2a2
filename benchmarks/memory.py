"""Peak training memory of MiMi's final adapters vs the frozen-backbone floor, large adapters, LoRA and full fine-tuning.

    python benchmarks/memory.py            # batch 64, 3 training steps, 5 fresh processes per configuration
    python benchmarks/memory.py --quick    # a smoke run, about a minute (batch 16, 2 steps, one process each)

Every configuration (see benchmarks/_common.py) runs in a FRESH process (this script re-invoked with ``--child``),
so that peaks do not mix; the processes are started round-robin over the configurations. A child imports torch,
timm, mimi (and PEFT if it needs it), reads its RSS, builds its model (then hands freed heap back to the OS), runs a few training
steps and prints one JSON line: its peak RSS (VmHWM) minus the RSS after the imports, and on CUDA
torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
from typing import Any

import torch
from _common import build, finish_args, machine, parser, print_machine, train_step_fn, trainable, write_json

LABELS = {
    "floor": "floor: frozen, grad to input",
    "mini": "MiMi final adapters",
    "large": "adapters r=96 unpruned",
    "lora": "our LoRA, same budget",
    "peft-lora": "PEFT LoRA, same budget",
    "full": "full fine-tuning",
}


def status_mb(key: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MB."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def release_freed() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), so RSS shows live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one configuration in this (fresh) process."""
    if name == "peft-lora":
        import peft  # noqa: F401  imported before the baseline: only the model and its training count

    release_freed()
    base = status_mb("VmRSS")
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build(name, args)
    release_freed()  # e.g. MiMi's r=96 adapters, sliced away by apply_plan
    built = status_mb("VmRSS")
    step = train_step_fn(name, model, args)
    for _ in range(args.steps):
        step()
    out = {
        "name": name,
        "rss_imports_mb": base,
        "rss_model_mb": built - base,
        "peak_rss_mb": status_mb("VmHWM") - base,
        **trainable(model),
    }
    if args.device == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", name, "--model", args.model, "--img-size", str(args.img_size)]
    cmd += ["--batch-size", str(args.batch_size), "--precision", args.precision, "--steps", str(args.steps)]
    cmd += ["--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__)
    p.set_defaults(repeats=5)
    p.add_argument("--steps", type=int, default=3, help="training steps per process")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.steps = 2
    if args.child:
        finish_args(args, "memory")
        print(json.dumps(child(args.child, args)))
        return
    finish_args(args, "memory")
    rounds = 1 if args.quick else args.repeats
    info = machine()
    print_machine(info, args)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in LABELS}
    for _ in range(rounds):
        for name in LABELS:
            runs[name].append(run_child(name, args))

    keys = ["rss_model_mb", "peak_rss_mb"] + (["peak_cuda_mb"] if args.device == "cuda" else [])
    med = {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in runs.items()}
    ratio = {n: {k: m[k] / med["floor"][k] for k in keys} for n, m in med.items()}
    print(f"\n## Peak memory of {args.steps} training steps above the imports (median of {rounds} fresh processes)")
    head = f"{'configuration':<30} {'model MB':>9} {'peak RSS MB':>12} {'x floor':>8}"
    print(head + (f" {'peak CUDA MB':>13} {'x floor':>8}" if args.device == "cuda" else "") + f" {'trainable':>11}")
    for name, label in LABELS.items():
        m, r = med[name], ratio[name]
        row = f"{label:<30} {m['rss_model_mb']:9.0f} {m['peak_rss_mb']:12.0f} {r['peak_rss_mb']:8.3f}"
        if args.device == "cuda":
            row += f" {m['peak_cuda_mb']:13.0f} {r['peak_cuda_mb']:8.3f}"
        print(row + f" {runs[name][0]['trainable']:>11,}")
    base = {n: statistics.median(r["rss_imports_mb"] for r in rs) for n, rs in runs.items()}
    print(f"(RSS after the imports: {base['floor']:.0f} MB; {base['peft-lora']:.0f} MB with PEFT)")
    write_json(args, info, runs=runs, median_mb=med, ratio_to_floor=ratio)


if __name__ == "__main__":
    main()
