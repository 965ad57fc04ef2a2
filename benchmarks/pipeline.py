"""Data-wait share of a training step: time spent waiting for the next batch vs the step's compute.

Each configuration (MiniVTAB task x image size) is a ViT-S/14 with the adapter sizes a real MiMi run ended with
(r=96 -> budget r=3, fashion_mnist), trained by the real ``mimi.training.engine.train_epoch`` on the real
``mimi.training.engine.loader`` (batch 32, shuffled, single process, exactly as the trainer builds it). The loader is
wrapped in a timer: per step, (i) the wait for the next batch and (ii) everything the step does until it asks for
the next batch (forward, cross-entropy, backward, AdamW and scheduler step, bookkeeping). Configurations take
their epochs round-robin (this machine is noisy) after a few unmeasured warm-up steps each.

    python benchmarks/pipeline.py            # fashion_mnist + elpv_defect at 56 and 112 px, 5 epochs each (~15 min)
    python benchmarks/pipeline.py --quick    # fashion_mnist at 56 px, 5 steps, under a minute
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from _common import machine, write_record

from mimi.backbones import create_backbone, preprocessing
from mimi.core.adapters import AdapterConfig, add_adapters
from mimi.core.device import resolve_device
from mimi.core.shrink import apply_plan
from mimi.data import build_task
from mimi.training.engine import StepContext, loader, make_optimizer, train_epoch, warmup_cosine

RESULTS = Path(__file__).parent / "results"
SIZES_FROM = RESULTS / "minivtab" / "fashion_mnist__mimi__budgetdim3__s0.json"
TARGET = 0.05  # data-wait share a step may have


def timed(data: Iterable, waits: list[float], computes: list[float], max_steps: int | None = None) -> Iterator:
    """Yield ``data``'s batches (at most ``max_steps``); append each step's wait for its batch and the compute
    that followed it."""
    it = iter(data)
    while max_steps is None or len(waits) < max_steps:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        t1 = time.perf_counter()
        waits.append(t1 - t0)
        yield batch
        computes.append(time.perf_counter() - t1)  # the consumer is back for the next batch: its step is done


class Config:
    """One task at one image size: the data, the adapted model, its optimizer and the per-epoch timings."""

    def __init__(self, args: argparse.Namespace, task: str, img_size: int, sizes: dict[str, int]) -> None:
        self.name = f"{task} @ {img_size}px"
        torch.manual_seed(0)
        model, _ = create_backbone(args.model, weights=args.weights, img_size=img_size)
        mean, std = preprocessing(model)
        t = time.perf_counter()
        self.task = build_task(f"vtab1k:{task}", root=args.data_root, img_size=img_size, mean=mean, std=std)
        self.decode_s = time.perf_counter() - t  # one-off: every split decoded to uint8 once
        model.reset_classifier(self.task.num_classes)
        add_adapters(model, AdapterConfig(hidden_dim=96))
        apply_plan(model, {k: list(range(h)) for k, h in sizes.items()})
        device = resolve_device("auto")  # train_epoch's loss.item() syncs every step, so CUDA times are honest too
        self.model = model.to(device)
        opt = make_optimizer(model, lr=args.lr, weight_decay=0.05)
        total = (args.epochs + 1) * -(-len(self.task.train) // args.batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, 0.1))
        self.ctx = StepContext(optimizer=opt, scheduler=sched, device=device)
        self.epochs: list[dict] = []

    def epoch(self, seed: int, batch_size: int, max_steps: int | None = None) -> dict:
        waits: list[float] = []
        computes: list[float] = []
        data = loader(self.task.train, batch_size=batch_size, shuffle=True, seed=seed)
        train_epoch(self.model, timed(data, waits, computes, max_steps), self.ctx)
        wait, compute = sum(waits), sum(computes)
        return {"steps": len(waits), "wait_s": wait, "compute_s": compute, "waits": waits, "computes": computes}


def summarise(epochs: list[dict]) -> dict:
    """Median over the measured epochs of the epoch's share, and median per-step times over all their steps."""
    waits = [w for e in epochs for w in e["waits"]]
    computes = [c for e in epochs for c in e["computes"]]
    shares = [e["wait_s"] / (e["wait_s"] + e["compute_s"]) for e in epochs]
    return {
        "epochs": len(epochs),
        "steps": len(waits),
        "share_median": statistics.median(shares),
        "share_max": max(shares),
        "step_share_median": statistics.median(w / (w + c) for w, c in zip(waits, computes)),
        "wait_ms_median": 1000 * statistics.median(waits),
        "compute_ms_median": 1000 * statistics.median(computes),
        "epoch_s_median": statistics.median(e["wait_s"] + e["compute_s"] for e in epochs),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--weights", default="none", help="backbone weights (values do not change speed)")
    p.add_argument("--data-root", default="data/minivtab")
    p.add_argument("--tasks", nargs="+", default=["fashion_mnist", "elpv_defect"])
    p.add_argument("--img-sizes", nargs="+", type=int, default=[56, 112])
    p.add_argument("--epochs", type=int, default=5, help="measured epochs per configuration")
    p.add_argument("--max-steps", type=int, default=None, help="cut every measured epoch after this many steps")
    p.add_argument("--warmup-steps", type=int, default=5, help="steps of a first, unmeasured epoch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--quick", action="store_true", help="smoke run: fashion_mnist at 56 px, 5 steps")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON (default: benchmarks/results/perf/pipeline[_quick].json)"
    )
    args = p.parse_args()
    if args.quick:
        args.tasks, args.img_sizes, args.epochs, args.max_steps, args.warmup_steps = ["fashion_mnist"], [56], 1, 5, 2
    info = machine()
    print(f"{info['cpu']} | {info['threads']} threads | torch {info['torch']} | {info['device']}")
    sizes = json.loads(SIZES_FROM.read_text())["cycles"][-1]["sizes"]
    print(f"{args.model} ({args.weights}), MiMi r=3 adapter sizes ({sum(sizes.values())} neurons in {len(sizes)})")
    cut = f" of at most {args.max_steps} steps" if args.max_steps else ""
    print(
        f"batch {args.batch_size}; per configuration {args.warmup_steps} warm-up steps, then {args.epochs} measured "
        f"epoch(s){cut}, round-robin"
    )
    configs = [Config(args, t, s, sizes) for t in args.tasks for s in args.img_sizes]
    for c in configs:
        c.epoch(seed=0, batch_size=args.batch_size, max_steps=args.warmup_steps)
    for e in range(1, args.epochs + 1):
        for c in configs:
            c.epochs.append(c.epoch(seed=e, batch_size=args.batch_size, max_steps=args.max_steps))
    rows = {c.name: {"decode_s": c.decode_s, "n_train": len(c.task.train), **summarise(c.epochs)} for c in configs}
    report(args, info, rows, {c.name: c.epochs for c in configs})


def report(args: argparse.Namespace, info: dict, rows: dict[str, dict], raw: dict[str, list[dict]]) -> None:
    print(f"\n## Data-wait share of a training step (median over epochs; target < {TARGET:.0%})")
    head = f"{'configuration':<22} {'wait ms':>8} {'step ms':>8} {'timed s':>8} {'share':>7} {'max':>7} {'per-step':>9}"
    print(head + f" {'decode s':>9}  verdict")
    for name, r in rows.items():
        ok = "ok" if r["share_median"] < TARGET else "OVER"
        print(
            f"{name:<22} {r['wait_ms_median']:8.2f} {r['compute_ms_median']:8.1f} {r['epoch_s_median']:8.2f} "
            f"{r['share_median']:7.2%} {r['share_max']:7.2%} {r['step_share_median']:9.2%} {r['decode_s']:9.2f}  {ok}"
        )
    print("wait/step ms: median per step; timed s: wait + compute of a measured epoch; share: wait / (wait + compute)")
    print("of a measured epoch, median and max over epochs; per-step: median of the steps' own shares; decode s:")
    print("one-off decoding of every split to uint8 when the task is built (before training, not in the share)")
    out = args.out or RESULTS / "perf" / ("pipeline_quick.json" if args.quick else "pipeline.json")
    write_record(
        out,
        args,
        info,
        target_share=TARGET,
        results=rows,
        raw_epochs=raw,
    )


if __name__ == "__main__":
    main()
