"""Where a MiMi training step and an evaluation pass spend their time: torch.profiler's top operators.

python benchmarks/profile_step.py            # ViT-S/14 at 56 px, MiMi's final adapter sizes, batch 32
python benchmarks/profile_step.py --quick    # fewer steps
"""

from __future__ import annotations

import torch
from _common import NUM_CLASSES, build, finish_args, machine, parser, print_machine, train_step_fn, write_json
from torch.profiler import ProfilerActivity, profile

from mimi.training.engine import evaluate


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=10, help="training steps profiled")
    p.add_argument("--top", type=int, default=12, help="operators listed")
    args = finish_args(p.parse_args(), "profile_step")
    steps = 3 if args.quick else args.steps
    info = machine()
    print_machine(info, args)
    model = build("mini", args)
    step = train_step_fn("mini", model, args)  # forward, loss, backward, AdamW step, as throughput.py times it
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    data = torch.utils.data.TensorDataset(x, torch.randint(0, NUM_CLASSES, (args.batch_size,)))
    step()  # warm-up
    tables = {}
    for name, work in (
        ("training step", lambda: [step() for _ in range(steps)]),
        ("evaluation", lambda: evaluate(model, data, num_classes=NUM_CLASSES, device=torch.device("cpu"))),
    ):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            work()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
        print(f"\n## {name}: top {args.top} operators by self CPU time\n{table}")
        tables[name] = table
    write_json(args, info, tables=tables)


if __name__ == "__main__":
    main()
