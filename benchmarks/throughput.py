"""Training step time of MiMi's final adapters vs the frozen-backbone floor, LoRA, masked adapters and full fine-tuning.

    python benchmarks/throughput.py            # batch 64, 7 interleaved rounds
    python benchmarks/throughput.py --quick    # a smoke run, about a minute

A step is forward + backward + AdamW step on a fixed random batch. The contenders (see benchmarks/_common.py) and a
large fp32 matmul (the machine's attainable GFLOP/s) are timed round-robin in one run; medians after a warm-up.
"""

from __future__ import annotations

import torch
from _common import (
    build,
    finish_args,
    interleaved,
    machine,
    parser,
    print_machine,
    train_step_fn,
    trainable,
    write_json,
)
from torch.utils.flop_counter import FlopCounterMode

LABELS = {
    "floor": "(a) floor: frozen, grad to input",
    "mini": "(b) MiMi final adapters",
    "large": "(b') adapters r=96 unpruned",
    "peft-lora": "(c) PEFT LoRA, same budget",
    "lora": "(c) our LoRA, same budget",
    "masked": "(d) masked r=96 adapters",
    "full": "(e) full fine-tuning",
}
MATMUL_N = 2048


def floor_flops(step) -> tuple[int, dict[str, int]]:
    """FLOPs of one floor training step, as torch's FlopCounterMode counts them (total and by op)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops(), {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}


def main() -> None:
    args = finish_args(parser(__doc__).parse_args(), "throughput")
    info = machine()
    print_machine(info, args)
    models = {name: build(name, args) for name in LABELS}
    steps = {name: train_step_fn(name, m, args) for name, m in models.items()}
    flops, by_op = floor_flops(steps["floor"])
    a, b = (torch.randn(MATMUL_N, MATMUL_N, device=args.device) for _ in range(2))
    secs = interleaved({**steps, "matmul": lambda: a @ b}, args.repeats, args.device)

    matmul_gflops = 2 * MATMUL_N**3 / secs.pop("matmul") / 1e9
    floor_gflops = flops / secs["floor"] / 1e9
    floor = secs["floor"]
    counts = {name: trainable(m) for name, m in models.items()}
    print(f"\n## Training step, median of {args.repeats} interleaved rounds after a warm-up")
    print(f"{'contender':<34} {'ms/step':>9} {'img/s':>8} {'x floor':>8} {'trainable':>11} {'w/o head':>10}")
    for name, s in secs.items():
        c = counts[name]
        print(
            f"{LABELS[name]:<34} {1000 * s:9.1f} {args.batch_size / s:8.1f} {s / floor:8.3f} "
            f"{c['trainable']:>11,} {c['without_head']:>10,}"
        )
    print(f"\n## Compute: fp32 {MATMUL_N}^3 matmul {matmul_gflops:.1f} GFLOP/s; floor step {flops / 1e9:.2f} GFLOP")
    print(f"floor achieves {floor_gflops:.1f} GFLOP/s = {floor_gflops / matmul_gflops:.1%} of the matmul")
    print(f"(FLOPs counted in: {', '.join(by_op)})")

    targets = {
        "(b) <= 1.05x the floor": secs["mini"] <= 1.05 * floor,
        "(b) faster than PEFT LoRA": secs["mini"] < secs["peft-lora"],
        "(b) faster than masked adapters (d)": secs["mini"] < secs["masked"],
        "floor GFLOP/s >= 60% of the matmul's": floor_gflops >= 0.6 * matmul_gflops,
    }
    print("\n## Targets")
    for k, ok in targets.items():
        print(f"{'met    ' if ok else 'MISSED '} {k}")
    write_json(
        args,
        info,
        seconds_per_step=secs,
        images_per_s={k: args.batch_size / s for k, s in secs.items()},
        ratio_to_floor={k: s / floor for k, s in secs.items()},
        params=counts,
        floor_flops=flops,
        floor_flops_by_op=by_op,
        floor_gflops=floor_gflops,
        matmul_gflops=matmul_gflops,
        targets=targets,
    )


if __name__ == "__main__":
    main()
