"""The same weights in two libraries: the offline ViT-S/14 in timm and in ``transformers``, number for number.

1. Features: ``vit_small_patch14_dinov2 --weights imgfocus`` (timm) against ``transformers:facebook/dinov2-small
   --weights imgfocus`` (``transformers.Dinov2Model`` holding the same tensors, q/k/v split) on real MiniVTAB test
   images (random ones with ``--quick``), at 56 and 224 px: the largest absolute difference of the pooled feature
   (target: within 1e-4).
2. Runs: a seeded MiMi run of ``mimi demo``'s settings on each backbone (elpv_defect, 56 px, r=96 -> r=8 budget,
   rho 0.75, 6 + 2 + 2 epochs): each cycle's adapter sizes and the test accuracy of both (target: the same schedule,
   test accuracy within 1 point; bit-identity is not expected, the two libraries' kernels round differently).

    python benchmarks/transformers_vs_timm.py            # features, then both runs (about 8 minutes on 2 cores)
    python benchmarks/transformers_vs_timm.py --quick    # features at 56 px on random images, a 1-epoch run each

Needs the offline backbone (``imgfocus``), the ``hf`` extra and, without ``--quick``, MiniVTAB (``make minivtab``).
Writes benchmarks/results/perf/transformers_vs_timm[_quick].json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from mimi import trainer
from mimi.backbones import create_backbone
from mimi.cli.demo import DEFAULT
from mimi.config import TrainConfig
from mimi.data import build_task

ROOT = Path(__file__).resolve().parents[1]
TIMM = "vit_small_patch14_dinov2"
HF = "transformers:facebook/dinov2-small"


def images(args, size: int) -> torch.Tensor:
    if args.quick:
        return torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0))
    task = build_task("vtab1k:elpv_defect", root=args.data_root, img_size=size)
    return torch.stack([task.test[i][0] for i in range(min(64, len(task.test)))])


@torch.inference_mode()
def features(args) -> dict:
    out = {}
    for size in args.sizes:
        x = images(args, size)
        feats, classes = {}, {}
        for name in (TIMM, HF):
            model, _ = create_backbone(name, weights="imgfocus", img_size=size)
            feats[name] = model.eval()(x)
            inner = getattr(model, "model", None)  # the transformers model inside mimi's wrapper
            classes[name] = f"{type(model).__module__}.{type(model).__name__}" + (
                f" holding {type(inner).__module__}.{type(inner).__name__}" if inner is not None else ""
            )
        diff = (feats[TIMM] - feats[HF]).abs()
        out[str(size)] = {
            "images": len(x),
            "models": classes,
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "max_abs_feature": float(feats[TIMM].abs().max()),
            "within_1e-4": float(diff.max()) <= 1e-4,
        }
        print(f"{size} px: max |timm - transformers| = {diff.max():.2e} over {len(x)} images", flush=True)
    return out


def run(args, model: str, out: Path) -> dict:
    settings = {**DEFAULT, "model": model, "data_root": str(args.data_root), "out": str(out), "device": "cpu"}
    if args.quick:
        settings.update(first_epochs=1, epochs=1)
    t = time.perf_counter()
    cycles = trainer.train(TrainConfig.from_dict(settings), log=lambda _line: None)  # one entry per cycle
    return {
        "seconds": time.perf_counter() - t,
        "test_acc": cycles[-1]["test_acc"],
        "val_acc": cycles[-1]["val_acc"],
        "cycles": [{k: c[k] for k in ("cycle", "adapter_params", "val_acc", "test_acc")} for c in cycles],
        "final_sizes": cycles[-1]["sizes"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="random images at 56 px and 1-epoch runs (checks the script)")
    p.add_argument("--data-root", type=Path, default=ROOT / "data" / "minivtab")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default: 56 224; --quick: 56)")
    p.add_argument("--no-runs", action="store_true", help="features only")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    args.sizes = args.sizes or ([56] if args.quick else [56, 224])
    record = {
        "script": "benchmarks/transformers_vs_timm.py",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": platform.node(),
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
        "features": features(args),
    }
    if not args.no_runs:
        tmp = Path(tempfile.mkdtemp(prefix="mimi-two-libraries-"))
        runs = {name: run(args, name, tmp / name.replace(":", "_").replace("/", "_")) for name in (TIMM, HF)}
        a, b = (runs[n] for n in (TIMM, HF))
        record["runs"] = runs
        record["same_schedule"] = [c["adapter_params"] for c in a["cycles"]] == [
            c["adapter_params"] for c in b["cycles"]
        ]
        record["same_final_sizes_in_model_order"] = list(a["final_sizes"].values()) == list(b["final_sizes"].values())
        record["test_acc_gap_points"] = 100 * abs(a["test_acc"] - b["test_acc"])
        for name, r in runs.items():
            params = [c["adapter_params"] for c in r["cycles"]]
            print(f"{name}: test {100 * r['test_acc']:.2f}%, adapter params by cycle {params}, {r['seconds']:.0f} s")
        print(f"same schedule: {record['same_schedule']}; test gap {record['test_acc_gap_points']:.2f} points")
    out = args.out or ROOT / "benchmarks" / "results" / "perf" / (
        "transformers_vs_timm_quick.json" if args.quick else "transformers_vs_timm.json"
    )
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
