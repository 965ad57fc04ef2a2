"""Training step time of adapter methods vs the frozen-backbone floor and PEFT LoRA, measured side by side.

Interleaves the methods round-robin (this machine is noisy) and prints medians and ratios to the floor.
    python benchmarks/step_time.py --img-size 56 --batch-size 64 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mimi.backbones import create_backbone
from mimi.config import TrainConfig
from mimi.methods import get_method
from mimi.training.engine import make_optimizer

VARIANTS = {
    "frozen (floor)": dict(method="linear"),
    "adapter r=8": dict(method="adapter", adapter_dim=8),
    "adapter r=96": dict(method="adapter", adapter_dim=96),
    "peft-lora r=2": dict(method="peft-lora", method_kwargs={"rank": 2}),
}


def build(name: str, args) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model, _ = create_backbone(args.model, weights="none", img_size=args.img_size, num_classes=10)
    cfg = TrainConfig(model=args.model, data="x", **VARIANTS[name])
    model = get_method(cfg.method).prepare_from_config(model, cfg, total_steps=100)
    return model.train(), make_optimizer(model, lr=1e-3, weight_decay=0.05)


def step(model, opt, x, y, floor: bool) -> float:
    t = time.perf_counter()
    if floor:  # the floor: backward through the frozen backbone, as any adapter method must do
        x = x.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--img-size", type=int, default=56)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(args.batch_size, 3, args.img_size, args.img_size), torch.randint(0, 10, (args.batch_size,))
    built = {n: build(n, args) for n in VARIANTS}
    times: dict[str, list[float]] = {n: [] for n in built}
    for n, (m, o) in built.items():  # warm-up
        step(m, o, x.clone(), y, n.startswith("frozen"))
    for _ in range(args.rounds):
        for n, (m, o) in built.items():
            times[n].append(step(m, o, x.clone(), y, n.startswith("frozen")))
    floor = statistics.median(times["frozen (floor)"])
    print(f"{args.model} {args.img_size}px batch {args.batch_size}, median of {args.rounds} interleaved rounds")
    for n, ts in times.items():
        trainable = sum(p.numel() for p in built[n][0].parameters() if p.requires_grad)
        print(
            f"{n:<18} {1000 * statistics.median(ts):8.1f} ms  x{statistics.median(ts) / floor:5.2f}  {trainable:>10,} trainable"
        )


if __name__ == "__main__":
    main()
