"""The `mimi` command line. Flags of `mimi train` are generated from :class:`mimi.config.TrainConfig`.

Every subcommand turns a :class:`mimi.errors.MimiError` into one line on stderr and exit code 2 (3 when training
stopped on its own, e.g. a NaN loss: the run is resumable); `mimi --debug ...` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import ConfigError, MimiError, TrainingError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, setup: Callable[[argparse.ArgumentParser], None]):
    def deco(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, setup, fn)
        return fn

    return deco


# ------------------------------------------------------------------ flags from the dataclass


def _base_type(tp) -> type:
    """int | None -> int; dict -> json loader."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One `--flag-name` per field; defaults are SUPPRESSed so only flags given override a --config file."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif tp is dict:
            parser.add_argument(flag, type=_json_dict, default=argparse.SUPPRESS, metavar="JSON", help=help_text)
        else:
            parser.add_argument(flag, type=tp, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def _train_setup(p: argparse.ArgumentParser) -> None:
    from .config import TrainConfig

    p.add_argument("--config", type=Path, help="YAML file of options; flags given on the command line override it")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run from its folder")
    add_dataclass_flags(p, TrainConfig)


def config_from_args(args: argparse.Namespace, cls, *, skip: Sequence[str] = ()):
    from .config import load_yaml

    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names and k not in skip})
    return cls.from_dict(values)


@command("train", "train a method (default: MiMi) on a dataset; writes a run folder", _train_setup)
def cmd_train(args: argparse.Namespace) -> int:
    from . import trainer
    from .config import TrainConfig
    from .report import cycle_table

    if args.resume is not None:
        given = sorted(k for k in vars(args) if k not in ("resume", "config", "command", "func", "debug", "lr"))
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
    print(f"run folder: {run_dir}  (report: {Path(run_dir) / 'report.md'})")
    return 0


def _eval_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run folder written by `mimi train`")
    p.add_argument("--split", choices=["val", "test", "train"], default="test", help="which split (default: test)")
    p.add_argument(
        "--weights", default="adapters.safetensors", help="file in the run folder (e.g. cycles/cycle_2.safetensors)"
    )
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="write the result as JSON to FILE, or alone: print only JSON on stdout",
    )
    p.add_argument("--per-class", action="store_true", help="print per-class accuracy")


@command("eval", "evaluate a run's saved adapters on its val or test split", _eval_setup)
def cmd_eval(args: argparse.Namespace) -> int:
    from .io_utils import atomic_write_json
    from .trainer import evaluate_run

    res = evaluate_run(args.run_dir, split=args.split, weights=args.weights)
    if args.json == "-":
        print(json.dumps(res))
        return 0
    print(f"{args.split} accuracy {100 * res['acc']:.2f}% ({res['n']} images, loss {res['loss']:.4f})")
    if args.per_class:
        for i, a in enumerate(res["per_class_acc"]):
            print(f"  class {i}: {100 * a:.2f}%")
    if args.json:
        atomic_write_json(args.json, res)
    return 0


def _info_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="a run folder or an adapters .safetensors file")


@command("info", "per-adapter sizes, parameter counts and bytes of a run or checkpoint", _info_setup)
def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import load_tensors, read_metadata

    path = args.path / "adapters.safetensors" if args.path.is_dir() else args.path
    meta = read_metadata(path)
    tensors = load_tensors(path)
    sizes = json.loads(meta["sizes"])
    if "lora" in meta:  # our LoRA: one rank per adapted layer
        sizes = {name: int(spec["rank"]) for name, spec in json.loads(meta["lora"]).items()}
    head = set(json.loads(meta.get("head", "[]")))
    print(f"{path}: {path.stat().st_size:,} bytes on disk")
    if meta.get("model"):  # what it was trained on: what `mimi predict` serves it with by default
        size = f" at {meta['img_size']} px" if meta.get("img_size") else ""
        source = f", weights {meta['weights_source']}" if meta.get("weights_source") else ""
        print(f"trained: {meta.get('method', '?')} on {meta.get('data', '?')}, backbone {meta['model']}{size}{source}")
    print(
        f"{'adapter' if 'lora' not in meta else 'LoRA layer':<40} {'hidden' if 'lora' not in meta else 'rank':>6} {'params':>9} {'bytes':>9}"
    )
    for name, h in sizes.items():
        ts = [t for k, t in tensors.items() if k.startswith(name + ".")]
        n = sum(t.numel() for t in ts)
        print(f"{name:<40} {h:>6} {n:>9,} {sum(t.numel() * t.element_size() for t in ts):>9,}")
    trained = {k: t for k, t in tensors.items() if not k.startswith("__")}
    head_n = sum(t.numel() for k, t in trained.items() if k in head)
    total = sum(t.numel() for t in trained.values())
    print(f"adapters: {len(sizes)} alive, {sum(sizes.values())} hidden neurons, {total - head_n:,} parameters")
    print(
        f"head: {head_n:,} parameters; total trained: {total:,} ({sum(t.numel() * t.element_size() for t in trained.values()):,} bytes)"
    )
    return 0


def _export_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run folder written by `mimi train`")
    p.add_argument("--out", type=Path, help="destination task file (.safetensors): the adapters and head only")
    p.add_argument(
        "--onnx", type=Path, metavar="OUT.onnx", help="also (or only) write backbone + adapters + head as ONNX"
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float16",
        help="storage dtype of the trained tensors (default: float16, half the bytes)",
    )
    p.add_argument("--weights", default="adapters.safetensors", help="file in the run folder to export")


@command("export", "write a run's task file (e.g. float16) and/or the whole model as ONNX", _export_setup)
def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import save_adapters
    from .trainer import load_run, task_metadata

    if args.out is None and args.onnx is None:
        raise ConfigError("nothing to export: pass --out FILE.safetensors and/or --onnx FILE.onnx")
    if args.onnx is not None and args.onnx.suffix != ".onnx":
        raise ConfigError(f"--onnx {args.onnx}: the file name must end in .onnx")
    run = load_run(args.run_dir, weights=args.weights)
    if args.out is not None:
        path = save_adapters(run.model, args.out, dtype=getattr(torch, args.dtype), metadata=task_metadata(run))
        before = (args.run_dir / args.weights).stat().st_size
        print(f"{path}: {path.stat().st_size:,} bytes ({args.dtype}; {before:,} bytes as trained)")
    if args.onnx is not None:
        from .deploy.onnx_export import export_onnx

        res = export_onnx(run.model, args.onnx, img_size=run.info["img_size"], opset=args.opset)
        print(
            f"{res['path']}: {res['bytes']:,} bytes, opset {res['opset']}, dynamic batch; "
            f"onnxruntime vs PyTorch max |diff| {res['max_abs_diff']:.2e}"
        )
    return 0


@command("methods", "list the training methods", lambda p: None)
def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import METHODS

    for name, cls in sorted(METHODS.items()):
        print(f"{name:<14} {cls.description}")
    return 0


def _data_setup(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True)
    m = sub.add_parser("minivtab", help="write the MiniVTAB suite (7 real-data tasks) in the VTAB-1k layout")
    m.add_argument("--root", type=Path, required=True, help="output folder")
    m.add_argument("--tasks", nargs="*", help="subset of tasks (default: all seven)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--test-size", type=int, default=2000, help="largest test split per task")
    m.add_argument("--fmnist-dir", type=Path, help="folder with the Fashion-MNIST idx files")
    sub.add_parser("list", help="list dataset sources")


@command("data", "build or list datasets", _data_setup)
def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "list":
        from .data import list_datasets

        for line in list_datasets():
            print(line)
        return 0
    from .data.minivtab import build_minivtab

    info = build_minivtab(
        args.root, tasks=args.tasks or None, seed=args.seed, test_size=args.test_size, fmnist_dir=args.fmnist_dir
    )
    for task, i in info.items():
        counts = i.get("counts", {})
        print(f"{task:<20} " + " ".join(f"{k}={v}" for k, v in counts.items()))
    print(f"MiniVTAB written under {args.root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="mimi", description="Finetune frozen ViTs with mini adapters (MiMi).")
    parser.add_argument("--version", action="version", version=f"mimi {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, setup, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        setup(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _register_extra_commands()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MimiError as e:
        if args.debug:
            raise
        print(f"mimi {args.command}: error: {e}", file=sys.stderr)
        return 3 if isinstance(e, TrainingError) else 2
    except KeyboardInterrupt:
        print(f"mimi {args.command}: interrupted", file=sys.stderr)
        return 130


def _register_extra_commands() -> None:
    """Commands living in their own modules (demo, bench, report) register themselves on import."""
    import importlib

    for module in ("mimi.demo", "mimi.bench", "mimi.deploy.predict", "mimi.deploy.serve"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


if __name__ == "__main__":
    sys.exit(main())
