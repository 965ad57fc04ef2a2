"""Where an int8 backbone loses accuracy: one run's test accuracy with subsets of its linear layers quantised.

PyTorch's ``quantize_dynamic`` (per-channel weights, one activation scale per call) applied to all of the
backbone's linear layers, to all but ``fc2``, to ``qkv`` and ``proj`` only, and to ``fc2`` only; then to all of
them after SmoothQuant's rescaling of the ``qkv`` and ``fc1`` inputs (each input channel divided by
``s = max|x|^alpha / max|w|^(1 - alpha)`` in the LayerNorm before it and multiplied back into the layer's weight
columns: the float model is unchanged, the activations' outlier channels shrink), calibrated on 64 random or 64
training images. Prints one accuracy per line and writes them as JSON.

    python benchmarks/int8_backbone_layers.py runs/int8/fmnist_count__mimi__budgetdim3__s0

The run folder is one that benchmarks/int8_tasks.py (or ``mimi train``) wrote; MiniVTAB data must be at hand.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from mimi.core.adapters import find_blocks
from mimi.core.int8_backbone import backbone_linears
from mimi.trainer import load_run

SUBSETS = {
    "all": lambda n: True,
    "all but fc2": lambda n: not n.endswith("fc2"),
    "qkv and proj": lambda n: ".attn." in n,
    "fc2 only": lambda n: n.endswith("fc2"),
}


@torch.inference_mode()
def accuracy(model: nn.Module, data, batch_size: int) -> float:
    correct = total = 0
    for x, y in torch.utils.data.DataLoader(data, batch_size=batch_size):
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return 100 * correct / total


def quantize(model: nn.Module, keep) -> nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    names = [n for n, _ in backbone_linears(model) if keep(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in names}, inplace=True)


@torch.no_grad()
def smooth(model: nn.Module, images: torch.Tensor, alpha: float) -> None:
    """SmoothQuant's rescaling of each block's (norm1, qkv) and (norm2, fc1) pair, in place (timm block names)."""
    pairs = [(b.norm1, b.attn.qkv) for _, b in find_blocks(model)] + [
        (b.norm2, b.mlp.fc1) for _, b in find_blocks(model)
    ]
    pairs = [(norm, getattr(lin, "base", lin)) for norm, lin in pairs]
    peak: dict[int, torch.Tensor] = {}

    def hook(i: int):
        def record(_m, inputs, _out):
            a = inputs[0].abs().flatten(0, -2).amax(0)
            peak[i] = a if i not in peak else torch.maximum(peak[i], a)

        return record

    handles = [lin.register_forward_hook(hook(i)) for i, (_, lin) in enumerate(pairs)]
    model(images)
    for h in handles:
        h.remove()
    for i, (norm, lin) in enumerate(pairs):
        s = peak[i].clamp(min=1e-5).pow(alpha) / lin.weight.abs().amax(0).clamp(min=1e-5).pow(1 - alpha)
        s = s.clamp(min=1e-5)
        norm.weight.div_(s)
        norm.bias.div_(s)
        lin.weight.mul_(s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant's migration strength (default: 0.5)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--out", type=Path, default=None, help="JSON (default: benchmarks/results/perf/int8_layers_<run>.json)"
    )
    args = p.parse_args()
    run = load_run(args.run_dir, device="cpu")
    model = run.model.eval()
    test = run.task.test
    results = {"float32": accuracy(model, test, args.batch_size)}
    print(f"float32: {results['float32']:.2f}", flush=True)
    for label, keep in SUBSETS.items():
        results[f"int8: {label}"] = accuracy(quantize(copy.deepcopy(model), keep), test, args.batch_size)
        print(f"int8: {label}: {results[f'int8: {label}']:.2f}", flush=True)
    calibration = {
        "random": torch.randn(64, 3, run.cfg.img_size, run.cfg.img_size, generator=torch.Generator().manual_seed(0)),
        "train": torch.stack([run.task.train[i][0] for i in range(min(64, len(run.task.train)))]),
    }
    for label, images in calibration.items():
        m = copy.deepcopy(model)
        smooth(m, images, args.alpha)
        key = f"int8: all, smoothed (alpha {args.alpha}, {label} images)"
        results[key] = accuracy(quantize(m, SUBSETS["all"]), test, args.batch_size)
        print(f"{key}: {results[key]:.2f}", flush=True)
    out = args.out or Path(__file__).parent / "results" / "perf" / f"int8_layers_{args.run_dir.name}.json"
    record = {"script": "benchmarks/int8_backbone_layers.py", "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out.write_text(json.dumps({**record, "run": str(args.run_dir), "test_acc": results}, indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
