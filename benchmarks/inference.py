"""Inference latency per image of MiMi's final model vs the bare backbone, masked adapters and merged LoRA.

    python benchmarks/inference.py            # batch 1 and batch 64, 7 interleaved rounds
    python benchmarks/inference.py --quick    # a smoke run, about a minute (batch 1 and 16)

Eval mode under torch.inference_mode; the contenders (see benchmarks/_common.py) are timed round-robin in one run,
medians after a warm-up. At batch 1 a timed sample is several calls in a row (timer and scheduler noise).
Target: the final MiMi model costs <= 3% more than the bare backbone.
"""

from __future__ import annotations

import torch
from _common import autocast, build, finish_args, interleaved, machine, parser, print_machine, write_json

from mimi.core.lora import merge_lora

LABELS = {
    "bare": "bare backbone",
    "mini": "MiMi final adapters",
    "masked": "masked r=96 adapters",
    "lora": "our LoRA, merged",
}


def main() -> None:
    args = finish_args(parser(__doc__).parse_args(), "inference")
    info = machine()
    print_machine(info, args)
    models = {name: build(name, args).eval() for name in LABELS}
    merge_lora(models["lora"])

    per_image: dict[str, dict[str, float]] = {}
    for batch in (1, args.batch_size):
        x = torch.randn(batch, 3, args.img_size, args.img_size, device=args.device)
        calls = max(1, args.batch_size // batch)

        def run(model: torch.nn.Module, x: torch.Tensor = x, calls: int = calls) -> None:
            with torch.inference_mode(), autocast(args):
                for _ in range(calls):
                    model(x)

        secs = interleaved({n: lambda m=m: run(m) for n, m in models.items()}, args.repeats, args.device)
        per_image[f"batch{batch}"] = {n: s / calls / batch for n, s in secs.items()}

    print(f"\n## Latency per image (ms), median of {args.repeats} interleaved rounds after a warm-up")
    batches = list(per_image)
    print(f"{'contender':<24}" + "".join(f"{b + ' ms':>13} {'x bare':>7}" for b in batches))
    for name, label in LABELS.items():
        row = "".join(
            f"{1000 * per_image[b][name]:13.3f} {per_image[b][name] / per_image[b]['bare']:7.3f}" for b in batches
        )
        print(f"{label:<24}{row}")
    ratios = {b: {n: v / per_image[b]["bare"] for n, v in per_image[b].items()} for b in batches}
    targets = {f"MiMi <= 1.03x bare at {b}": ratios[b]["mini"] <= 1.03 for b in batches}
    print("\n## Targets")
    for k, ok in targets.items():
        print(f"{'met    ' if ok else 'MISSED '} {k}")
    write_json(args, info, seconds_per_image=per_image, ratio_to_bare=ratios, targets=targets)


if __name__ == "__main__":
    main()
