"""Helpers shared by benchmarks/throughput.py, inference.py and memory.py (not part of the mimi package).

The contenders are built here once so that the three scripts measure exactly the same models:

* ``floor``: the frozen backbone, only the head trainable; the training step back-propagates to the input image,
  which is the least any adapter method pays (the gradient has to cross every block).
* ``mini``: sequential adapters inserted at r=96, then sliced to the sizes a real MiMi run ended with (uneven widths,
  some adapters removed), read from a committed MiniVTAB result.
* ``large``: the same r=96 adapters, unpruned.
* ``masked``: r=96 adapters computed in full, with the hidden activation multiplied by a 0/1 mask keeping as many
  neurons per adapter as ``mini`` (how the public MiMi code prunes).
* ``lora`` / ``peft-lora``: our LoRA and Hugging Face PEFT LoRA at ``mini``'s adapter parameter count.
* ``full``: full fine-tuning.
* ``bare``: the backbone alone (inference.py's reference).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimi.backbones import create_backbone
from mimi.core.adapters import AdapterConfig, adapter_sites, adapters, add_adapters, new_adapter
from mimi.core.lora import add_lora
from mimi.core.shrink import apply_plan
from mimi.methods.lora import lora_rank_for_budget
from mimi.methods.peft_methods import trainable_without_head
from mimi.training.engine import make_optimizer

RESULTS = Path(__file__).parent / "results"
SIZES_FROM = RESULTS / "minivtab" / "fashion_mnist__mimi__budgetdim3__s0.json"
LARGE = 96  # the hidden size the MiMi run inserted its adapters with
NUM_CLASSES = 10


# ---------------------------------------------------------------- command line, machine, output


def parser(doc: str) -> argparse.ArgumentParser:
    """The flags every script takes."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--img-size", type=int, default=56)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (>= 5; the median is reported)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast, CUDA only")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's); 1 on a CPU busy with other jobs avoids oversubscription",
    )
    p.add_argument("--quick", action="store_true", help="smoke run, about a minute: batch 16, 3 rounds")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: benchmarks/results/perf/...)")
    return p


def finish_args(args: argparse.Namespace, script: str) -> argparse.Namespace:
    """Apply ``--quick``, check the flags, resolve the device and the default output path."""
    if args.quick:
        args.repeats, args.batch_size = 3, 16
    elif args.repeats < 5:
        raise SystemExit("--repeats must be >= 5 (use --quick for a smoke run)")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision == "bf16" and args.device != "cuda":
        raise SystemExit("--precision bf16 needs a CUDA device")
    if args.out is None:
        args.out = RESULTS / "perf" / f"{script}{'_quick' if args.quick else ''}.json"
    return args


def machine() -> dict[str, Any]:
    """CPU model, torch threads, torch version and device: printed and recorded by every benchmark."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "device": dev}


def print_machine(info: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"{info['cpu']} | {info['threads']} threads | torch {info['torch']} | device {info['device']}")
    print(f"{args.model} (random weights) at {args.img_size}px, batch {args.batch_size}, {args.precision}")


def write_record(out: Path, args: argparse.Namespace, info: dict[str, Any], **results: Any) -> None:
    """One JSON per benchmark run: machine, date, host, flags, then the script's own results."""
    record = {
        "machine": info,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": platform.node(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("out", "child")},
        **results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten {out}")


def write_json(args: argparse.Namespace, info: dict[str, Any], **results: Any) -> None:
    write_record(args.out, args, info, **results)


# ---------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(args: argparse.Namespace) -> AbstractContextManager:
    if args.precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def interleaved(
    contenders: dict[str, Callable[[], object]], repeats: int, device: str, *, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each contender, timed round-robin (one call of each per round) after a warm-up."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeats):
        for k, fn in contenders.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------- contenders


def mimi_sizes() -> dict[str, int]:
    """Final hidden size of every adapter left by the committed MiMi run (removed adapters are absent)."""
    return json.loads(SIZES_FROM.read_text())["cycles"][-1]["sizes"]


def backbone(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone(args.model, weights="none", img_size=args.img_size, num_classes=NUM_CLASSES)[0]


class MaskedAct(nn.Module):
    """``act(h) * mask``: pruned neurons are still computed, then zeroed by a 0/1 buffer."""

    def __init__(self, act: nn.Module, mask: torch.Tensor) -> None:
        super().__init__()
        self.act = act
        self.register_buffer("mask", mask)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.act(h) * self.mask


def _adapted(args: argparse.Namespace) -> nn.Module:
    return add_adapters(backbone(args), AdapterConfig(hidden_dim=LARGE, init_seed=0))


def mini_budget(model: nn.Module) -> int:
    """Adapter parameters (head excluded) of the final MiMi model on this bare backbone: LoRA's budget.

    Counted from the adapter sites without inserting anything (a second backbone would pollute memory.py's RSS).
    """
    config = AdapterConfig(hidden_dim=LARGE)
    sites = {s.name: s for s in adapter_sites(model, config)}
    return sum(new_adapter(sites[name], config, h).num_params() for name, h in mimi_sizes().items())


def build(name: str, args: argparse.Namespace) -> nn.Module:
    """One contender (see the module docstring), in train mode, with its trainable parameters set."""
    if name in ("floor", "bare", "full"):
        model = backbone(args)
        model.requires_grad_(name == "full")
        model.get_classifier().requires_grad_(True)
    elif name in ("mini", "large", "masked"):
        model = _adapted(args)
        sizes = mimi_sizes()
        if name == "mini":
            apply_plan(model, {k: list(range(h)) for k, h in sizes.items()})
        elif name == "masked":
            for a_name, a in adapters(model):
                mask = (torch.arange(a.hidden_dim) < sizes.get(a_name, 0)).float()
                a.act = MaskedAct(a.act, mask)
    elif name in ("lora", "peft-lora"):
        model = backbone(args)
        rank = lora_rank_for_budget(model, mini_budget(model))
        if name == "lora":
            model = add_lora(model, rank=rank, seed=0)
        else:
            from mimi.config import TrainConfig
            from mimi.methods import get_method

            cfg = TrainConfig(model=args.model, data="x", method="peft-lora", method_kwargs={"rank": rank})
            model = get_method("peft-lora").prepare_from_config(model, cfg, total_steps=100)
    else:
        raise ValueError(f"unknown contender {name!r}")
    return model.to(args.device).train()


def trainable(model: nn.Module) -> dict[str, int]:
    """Trainable parameters, all and without the classifier head."""
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "without_head": trainable_without_head(model),
    }


def train_step_fn(name: str, model: nn.Module, args: argparse.Namespace) -> Callable[[], None]:
    """One training step (forward, backward, AdamW step) on a fixed random batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(args.device)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=g).to(args.device)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.05)

    def step() -> None:
        inp = x.detach().requires_grad_(True) if name == "floor" else x  # the floor: gradient down to the input
        with autocast(args):
            loss = nn.functional.cross_entropy(model(inp), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step
