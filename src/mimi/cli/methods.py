"""`mimi methods`: the training methods, or one of them in detail (traits and options); `mimi plan`: what each
method trains at a parameter budget, and the bytes of its task file, before any training."""

from __future__ import annotations

import argparse
import dataclasses
import json

from mimi.cli.command import Command


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="a method to describe: its traits and options (default: list them all)")


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]  # the registry refuses fields without any default


def _type(f: dataclasses.Field) -> str:
    # Annotations are strings under `from __future__ import annotations`: they read as written.
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _rows(fields: list[dataclasses.Field], labels: list[str]) -> list[str]:
    """Per field ``label: type = default``, its help on the next line."""
    lines = []
    for label, f in zip(labels, fields):
        lines.append(f"  {label}: {_type(f)} = {_default(f)!r}")
        if f.metadata.get("help"):
            lines.append(f"      {f.metadata['help']}")
    return lines


def describe(name: str) -> str:
    """`mimi methods NAME`: description, traits and options of one method."""
    from mimi.methods import method_class
    from mimi.methods.base import RUN_FLAGS, is_run_flag

    cls = method_class(name)
    t = cls.traits
    yes = {True: "yes", False: "no"}
    lines = [
        f"{name}: {cls.description}",
        "",
        "traits:",
        f"  prunes       {yes[t.prunes]}",
        f"  one-shot     {yes[t.one_shot]}",
        f"  servable     {yes[t.servable]}",
        f"  size unit    {t.size_unit}",
        f"  budget sets  {t.budget_sets or ('the pruning target' if t.prunes else '-')}",
    ]
    fields = dataclasses.fields(cls.Options)
    options = [f for f in fields if not is_run_flag(f)]
    flags = [f for f in fields if is_run_flag(f)]
    lines += ["", "options (--method-kwargs JSON):"]
    lines += _rows(options, [f.name for f in options]) if options else ["  none"]
    if flags:
        lines += ["", "read from run flags:"]
        lines += _rows(flags, [RUN_FLAGS[f.name] for f in flags])
    return "\n".join(lines)


def cmd_methods(args: argparse.Namespace) -> int:
    from mimi.methods import METHODS, method_names

    if args.name is not None:
        print(describe(args.name))  # an unknown name: ConfigError, one line and exit code 2
        return 0
    for name in method_names():
        print(f"{name:<14} {METHODS[name].description}")
    return 0


def _plan_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget-params", type=int, required=True, help="adapter parameters (no head), e.g. 8000")
    p.add_argument(
        "--model", default="vit_small_patch14_dinov2", help="any timm model name (random weights: only sizes)"
    )
    p.add_argument("--img-size", type=int, default=None, help="input resolution (VPT and sizes do not depend on it)")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the head in the task files' bytes")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout: one object per candidate")


def _thousands(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def cmd_plan(args: argparse.Namespace) -> int:
    from mimi.training.plan import plan_budget

    rows = plan_budget(args.budget_params, model=args.model, img_size=args.img_size, num_classes=args.num_classes)
    if args.json:
        print(json.dumps([{**dataclasses.asdict(r), "flags": r.candidate.flags()} for r in rows], indent=1))
        return 0
    print(
        f"at {args.budget_params:,} adapter parameters on {args.model}, task files as int8 with a head of "
        f"{args.num_classes} classes:"
    )
    table = [("method", "params (no head)", "fits", "int8 file bytes", "bank", "chosen / why not")]
    for r in rows:
        fits = "yes" if r.fits else "no" if r.params is not None else "-"
        params = f"<= {r.params:,}" if r.int8_bytes is None and r.params is not None else _thousands(r.params)
        table.append((r.candidate.label, params, fits, _thousands(r.int8_bytes), "yes" if r.servable else "no", r.note))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[5])
    print("\ntrain one: mimi train --budget-params", args.budget_params, "<method flags>, e.g.")
    for r in rows:
        if r.fits:
            print(f"  {r.candidate.flags()}")
    return 0


COMMANDS = [
    Command("methods", "list the training methods, or describe one (mimi methods NAME)", _setup, cmd_methods),
    Command(
        "plan",
        "what each small method trains at a parameter budget, and its int8 task file's bytes (no training)",
        _plan_setup,
        cmd_plan,
    ),
]
