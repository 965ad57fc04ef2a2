"""`mimi train` (start or resume a run) and `mimi eval` (a run's saved adapters on a split)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from mimi.cli.command import Command
from mimi.cli.flags import add_dataclass_flags, config_from_args
from mimi.cli.serving import add_backbone_dtype_arg
from mimi.core.errors import ConfigError


def _train_setup(p: argparse.ArgumentParser) -> None:
    from mimi.config import TrainConfig

    p.add_argument("--config", type=Path, help="YAML file of options; flags given on the command line override it")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run from its folder")
    add_dataclass_flags(p, TrainConfig)


def cmd_train(args: argparse.Namespace) -> int:
    from mimi import trainer
    from mimi.config import TrainConfig
    from mimi.reporting.run_report import budget_table, cycle_table

    if args.resume is not None:
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        given = sorted(k for k in vars(args) if k in fields and k != "lr")
        if given or args.config:
            raise ConfigError(
                f"--resume takes the run's own config (only --lr may change); "
                f"drop {['--' + g.replace('_', '-') for g in given] or ['--config']}"
            )
        summary = trainer.resume(args.resume, lr=getattr(args, "lr", None))
        run_dir = args.resume
    else:
        cfg = config_from_args(args, TrainConfig)
        summary = trainer.train(cfg)
        run_dir = Path(cfg.out)
    layout = json.loads((Path(run_dir) / "run.json").read_text()).get("layout", [])
    print(cycle_table(summary, layout))
    kept = budget_table(summary)
    if kept is not None:
        print(f"tasks kept at each budget (mimi export {run_dir} --budget N):\n{kept}")
    print(f"run folder: {run_dir}  (report: {Path(run_dir) / 'report.md'})")
    return 0


def _eval_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run folder written by `mimi train`")
    p.add_argument("--split", choices=["val", "test", "train"], default="test", help="which split (default: test)")
    p.add_argument(
        "--weights", default="adapters.safetensors", help="file in the run folder (e.g. cycles/cycle_2.safetensors)"
    )
    p.add_argument("--budget", type=int, metavar="N", help="the task a run of several budgets kept at N parameters")
    add_backbone_dtype_arg(p)
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="write the result as JSON to FILE, or alone: print only JSON on stdout",
    )
    p.add_argument("--per-class", action="store_true", help="print per-class accuracy")


def cmd_eval(args: argparse.Namespace) -> int:
    from mimi.core.files import atomic_write_json
    from mimi.trainer import evaluate_run

    kw = {"split": args.split, "weights": args.weights, "budget": args.budget, "backbone_dtype": args.backbone_dtype}
    res = evaluate_run(args.run_dir, **kw)
    if args.json == "-":
        print(json.dumps(res))
        return 0
    on = "" if args.backbone_dtype == "float32" else f", {args.backbone_dtype} backbone"
    print(f"{args.split} accuracy {100 * res['acc']:.2f}% ({res['n']} images{on}, loss {res['loss']:.4f})")
    if args.per_class:
        for i, a in enumerate(res["per_class_acc"]):
            print(f"  class {i}: {100 * a:.2f}%")
    if args.json:
        atomic_write_json(args.json, res)
    return 0


COMMANDS = [
    Command("train", "train a method (default: MiMi) on a dataset; writes a run folder", _train_setup, cmd_train),
    Command("eval", "evaluate a run's saved adapters on its val or test split", _eval_setup, cmd_eval),
]
