"""`mimi bench SPEC`: tasks x methods x budgets x seeds through the same engine, one JSON per run.

A SPEC (YAML)::

    name: minivtab
    results: benchmarks/results/minivtab     # one JSON per run (the report reads only these)
    runs: runs/bench/minivtab                # run folders (checkpoints, plots); resumable
    defaults: {model: vit_small_patch14_dinov2, weights: imgfocus, img_size: 56, data_root: data/minivtab}
    groups: {natural: [vtab1k:fashion_mnist, vtab1k:digits], ...}   # tasks, by VTAB group
    seeds: [0]
    methods:
      - {label: linear, method: linear}
      - {label: adapter, method: adapter, adapter_dim: [96, 8]}     # a list: one run per value
      - {label: mimi, method: mimi, adapter_dim: 96, budget_dim: [8]}
      - {label: mimi-lora, method: mimi-lora, budget_dim: [12, 48], seeds: [0]}  # a method's own seeds

Runs whose JSON says ``ok`` are skipped; failures are recorded (status ``failed``) and retried next time.
``--queue FILE`` runs the listed run ids in the file's order, re-reading it before every run, so the order
can be changed while workers run.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .cli import command
from .config import TrainConfig, load_yaml
from .errors import ConfigError
from .io_utils import atomic_write_json
from .methods import get_method
from .scores import SCORES


@dataclass
class BenchRun:
    id: str
    task: str
    group: str
    label: str
    seed: int
    grid: dict[str, Any]  # the swept values of this run (e.g. {"budget_dim": 8})
    config: dict[str, Any]


@dataclass
class BenchSpec:
    name: str
    groups: dict[str, list[str]]
    methods: list[dict[str, Any]]
    seeds: list[int] = field(default_factory=lambda: [0])
    defaults: dict[str, Any] = field(default_factory=dict)
    results: str = "benchmarks/results"
    runs: str = "runs/bench"
    data_roots: dict[str, str] = field(default_factory=dict)  # dataset prefix -> data_root (e.g. cifar10: DIR)

    @classmethod
    def load(cls, path: str | Path) -> BenchSpec:
        d = load_yaml(path)
        missing = [k for k in ("name", "groups", "methods") if k not in d]
        if missing:
            raise ConfigError(f"{path}: bench spec lacks {missing}")
        if "tasks" in d:  # a flat task list is one group
            d.setdefault("groups", {}).setdefault("all", []).extend(d.pop("tasks"))
        unknown = set(d) - {"name", "groups", "methods", "seeds", "defaults", "results", "runs", "data_roots"}
        if unknown:
            raise ConfigError(f"{path}: unknown bench spec keys {sorted(unknown)}")
        return cls(**d)

    def expand(self) -> list[BenchRun]:
        """Every (task, method, swept values, seed) run; list-valued method fields are swept."""
        runs = []
        for group, tasks in self.groups.items():
            for task in tasks:
                for entry in self.methods:
                    entry = dict(entry)
                    label = entry.pop("label", entry.get("method", "?"))
                    seeds = entry.pop("seeds", self.seeds)
                    if not isinstance(seeds, list) or not all(isinstance(x, int) for x in seeds):
                        raise ConfigError(f"method {label!r}: seeds must be a list of integers, got {seeds!r}")
                    swept = {k: v for k, v in entry.items() if isinstance(v, list) and k not in ("method_kwargs",)}
                    for values in itertools.product(*swept.values()) if swept else [()]:
                        grid = dict(zip(swept, values))
                        for seed in seeds:
                            cfg = {**self.defaults, **entry, **grid, "data": task, "seed": seed}
                            if task.split(":")[0] in self.data_roots:
                                cfg["data_root"] = self.data_roots[task.split(":")[0]]
                            rid = _run_id(task, label, grid, seed)
                            cfg["out"] = str(Path(self.runs) / rid)
                            checked = TrainConfig.from_dict(cfg)  # validate early: a typo fails before hours of runs
                            get_method(checked.method)
                            if checked.score not in SCORES:
                                raise ConfigError(f"unknown score {checked.score!r}; choose one of {sorted(SCORES)}")
                            runs.append(BenchRun(rid, task, group, label, seed, grid, cfg))
        return runs


def _run_id(task: str, label: str, grid: dict[str, Any], seed: int) -> str:
    parts = [task.split(":")[-1], label] + [f"{k.replace('_', '')}{v}" for k, v in grid.items()] + [f"s{seed}"]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", "__".join(parts))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "timm", "peft", "mimi-adapters"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _result(run: BenchRun, summary: list[dict], seconds: float) -> dict[str, Any]:
    out = Path(run.config["out"])
    info = json.loads((out / "run.json").read_text())
    final = summary[-1]
    ckpt = out / "adapters.safetensors"
    head = info["head_params"] if "head_params" in info else None
    return {
        "status": "ok",
        "params": {
            "trainable": final["trainable_params"],
            "trainable_without_head": final["trainable_params"] - head if head is not None else None,
            "adapter": final["adapter_params"],
            "head": head,
            "pct_of_backbone": final["pct_of_backbone"],
        },
        "budget": info.get("budget"),
        "checkpoint_bytes": ckpt.stat().st_size if ckpt.is_file() else None,
        "val_acc": final["val_acc"],
        "test_acc": final["test_acc"],
        "cycles": summary,
        "layout": info.get("layout", []),
        "backbone": {k: info.get(k) for k in ("model", "weights_source", "img_size", "backbone_params", "device")},
        "data": {k: info.get(k) for k in ("data", "n_train", "n_val", "n_test", "num_classes")},
        "wall_seconds": seconds,
    }


def run_one(run: BenchRun, results: Path, *, log=print) -> dict[str, Any]:
    """Train one run (resuming its folder if a previous attempt was cut) and write its JSON."""
    from . import trainer

    record: dict[str, Any] = {
        "id": run.id,
        "task": run.task,
        "group": run.group,
        "method": run.config.get("method"),
        "label": run.label,
        "grid": run.grid,
        "seed": run.seed,
        "config": run.config,
        "git_commit": _git_commit(),
        "versions": _versions(),
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    t0 = time.perf_counter()
    out = Path(run.config["out"])
    try:
        if (out / "checkpoint.safetensors").is_file():
            summary = trainer.resume(out, log=log)
        else:
            if out.exists():
                import shutil

                shutil.rmtree(out)  # an attempt that died before its first checkpoint
            summary = trainer.train(TrainConfig.from_dict(run.config), log=log)
        record.update(_result(run, summary, time.perf_counter() - t0))
    except Exception as e:  # a failed run is recorded as such, never dropped; the sweep goes on
        record.update(
            status="failed",
            error=f"{type(e).__name__}: {e}",
            traceback=traceback.format_exc()[-4000:],
            wall_seconds=time.perf_counter() - t0,
        )
    atomic_write_json(results / f"{run.id}.json", record)
    return record


_held: dict[str, int] = {}  # run id -> the open, flock-ed descriptor of its claim file, while this process runs it


def claim(results: Path, run_id: str) -> bool:
    """Take ``run_id`` for this process; False if another live worker has it.

    The claim is a file naming ``host pid`` on which this process holds an exclusive ``flock`` until
    :func:`release`, so two workers taking over the same stale claim at once cannot both win (the kernel drops
    a dead worker's lock). A claim left by a dead process of this host is taken over; one from another host is
    respected (delete ``RESULTS/.claims`` by hand after a crash there).
    """
    folder = results / ".claims"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run_id}.claim"
    me = f"{platform.node()} {os.getpid()}"
    for _ in range(3):
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False  # a live worker holds it
        try:
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                os.close(fd)  # released (unlinked) between our open and our lock: look again
                continue
        except FileNotFoundError:
            os.close(fd)
            continue
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
        if holder and holder != me and not _stale_holder(holder):
            os.close(fd)
            return False  # another host's claim, or a live worker of an older version that takes no lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        os.utime(fd)  # "N min so far" counts from now
        _held[run_id] = fd
        return True
    return False


def _stale_holder(holder: str) -> bool:
    """True when ``holder`` ("host pid") names a process of this host that no longer runs."""
    try:
        host, pid = holder.split()
    except ValueError:
        return False
    if host != platform.node():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def _stale(path: Path) -> bool:
    try:
        holder = path.read_text().strip()
    except OSError:
        return False
    return bool(holder) and _stale_holder(holder)


def claimed(results: Path, run_id: str) -> tuple[str, float] | None:
    """Who holds ``run_id`` now and for how many seconds: ``("host pid", seconds)``, or None when nobody does
    (no claim, or one left by a dead process of this host)."""
    path = results / ".claims" / f"{run_id}.claim"
    try:
        holder, since = path.read_text().strip(), path.stat().st_mtime
    except OSError:
        return None
    if not holder or _stale(path):
        return None
    return holder, max(0.0, time.time() - since)


def release(results: Path, run_id: str) -> None:
    """Drop this process's claim on ``run_id``: the file goes first, then the lock (a worker that opened the old
    file meanwhile sees it unlinked and looks again)."""
    fd = _held.pop(run_id, None)
    if fd is None:
        return  # never ours: leave another worker's claim alone
    (results / ".claims" / f"{run_id}.claim").unlink(missing_ok=True)
    os.close(fd)


def _shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"--shard must be i/n with 0 <= i < n, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", type=Path, help="bench spec (YAML)")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N", help="run every N-th run from the I-th")
    p.add_argument("--only", default=None, help="regex: only runs whose id matches")
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether they are done")
    p.add_argument(
        "--queue",
        type=Path,
        default=None,
        metavar="FILE",
        help="run only the run ids listed in FILE, in its order (re-read before every run)",
    )
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True, help="render the report at the end")


def estimate_seconds(runs: list[BenchRun], results: Path) -> dict[str, float]:
    """A guess of each run's wall time: the median of the finished runs with its label and swept values (any task,
    any seed), else of those with its label; runs of a kind never finished are left out."""
    walls: dict[tuple, list[float]] = {}
    for p in results.glob("*.json"):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(rec, dict) or rec.get("status") != "ok" or not rec.get("wall_seconds"):
            continue
        grid = json.dumps(rec.get("grid", {}), sort_keys=True)
        walls.setdefault((rec.get("label"), grid), []).append(rec["wall_seconds"])
        walls.setdefault((rec.get("label"),), []).append(rec["wall_seconds"])
    out = {}
    for run in runs:
        for key in ((run.label, json.dumps(run.grid, sort_keys=True)), (run.label,)):
            if key in walls:
                out[run.id] = statistics.median(walls[key])
                break
    return out


def read_queue(path: Path, known: set[str], strict: bool, warned: set[str] | None = None) -> list[str]:
    """The run ids listed in a queue file (one per line; blank lines and ``#`` comments skipped), in order.

    An id that is not a run of the spec is an error when ``strict`` (at start), else a warning (the file was
    edited while the workers run), printed once per id in ``warned``.
    """
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError(
            f"cannot read the queue {path}: {e.strerror or e}; give a file of run ids, one per line"
        ) from None
    ids = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    unknown = [i for i in ids if i not in known]
    if unknown and strict:
        raise ConfigError(
            f"{path}: {len(unknown)} id(s) are not runs of this spec, first {unknown[0]!r}; "
            "list them with `mimi bench SPEC --dry-run`"
        )
    for i in unknown:
        if warned is None or i not in warned:
            print(f"warning: {path}: {i!r} is not a run of this spec, skipped")
        if warned is not None:
            warned.add(i)
    return [i for i in ids if i in known]


@command("bench", "run a benchmark grid (tasks x methods x budgets x seeds); skips runs already done", _setup)
def cmd_bench(args: argparse.Namespace) -> int:
    spec = BenchSpec.load(args.spec)
    runs = spec.expand()
    every = {r.id for r in runs}  # a queued id of another shard, or outside --only, is skipped, not an error
    i, n = args.shard
    runs = [r for k, r in enumerate(runs) if k % n == i and (not args.only or re.search(args.only, r.id))]
    by_id = {r.id: r for r in runs}
    if args.queue:
        runs = [by_id[q] for q in read_queue(args.queue, every, strict=True) if q in by_id]
    results = Path(spec.results)
    results.mkdir(parents=True, exist_ok=True)
    done = {r.id for r in runs if _status(results / f"{r.id}.json") == "ok"}
    print(f"{spec.name}: {len(runs)} runs in shard {i}/{n}, {len(done)} already done")
    if args.dry_run:
        todo = [r for r in runs if r.id not in done]
        guess = estimate_seconds(todo, results)
        left = dict(guess)  # seconds still to go: a running run has spent some of its guess
        running, holders = 0, set()
        for run in todo:
            eta = f"~{guess[run.id] / 60:.0f} min" if run.id in guess else "? min"
            held = claimed(results, run.id)
            if held is None:
                print(f"  todo {run.id}  ({eta})")
                continue
            running += 1
            holders.add(held[0])
            if run.id in left:
                left[run.id] = max(0.0, left[run.id] - held[1])
            print(f"  running {run.id}  ({held[0]}, {held[1] / 60:.0f} min so far of {eta})")
        if todo:
            known = sum(left.values()) / 3600
            what = f"{len(todo)} to do ({running} running)" if running else f"{len(todo)} to do"
            print(f"{what}: ~{known:.1f} h of one worker by the median wall time of finished runs of the same kind")
            if len(holders) > 1:
                print(f"  ~{known / len(holders):.1f} h of wall if the {len(holders)} workers holding runs now go on")
            if len(guess) < len(todo):
                print(f"  ({len(todo) - len(guess)} with no finished run of their kind to go by)")
        return 0
    failed, tried, warned = 0, set(done), set()
    while True:
        if args.queue:  # re-read: the order may have changed since the last run
            try:
                runs = [by_id[q] for q in read_queue(args.queue, every, strict=False, warned=warned) if q in by_id]
            except ConfigError as e:  # moved or being replaced: keep the last order
                print(f"warning: {e}")
        run = next((r for r in runs if r.id not in tried), None)
        if run is None:
            break
        tried.add(run.id)
        if _status(results / f"{run.id}.json") == "ok":
            continue  # done since this sweep started, by another worker sharing the results folder
        if not claim(results, run.id):
            continue  # another worker is running it
        try:
            if _status(results / f"{run.id}.json") == "ok":
                continue  # finished by another worker between our check and our claim
            print(f"[{len(tried - done)}/{len(runs) - len(done)}] {run.id}")
            rec = run_one(run, results, log=(lambda s: None) if args.quiet else print)
        finally:
            release(results, run.id)
        failed += rec["status"] != "ok"
        acc = f"test {100 * rec['test_acc']:.2f}%" if rec["status"] == "ok" else rec["error"]
        print(f"    {rec['status']}: {acc} ({rec['wall_seconds']:.0f}s)")
    if args.report:
        from .bench_report import load_results, write_report

        if load_results(results):  # nothing yet when other workers hold every run
            write_report(results)
    return 1 if failed else 0


def _status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, json.JSONDecodeError):
        return None


def _report_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "results", type=Path, nargs="+", help="folder(s) of run JSONs written by `mimi bench` (several are merged)"
    )
    p.add_argument("--out", type=Path, default=None, help="report folder (default: the first RESULTS/report)")
    p.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="LABEL",
        help="also pair every method with this method label at the same budget (repeatable; MiMi always)",
    )


@command("report", "render tables (Markdown, HTML) and plots from a folder of bench JSONs", _report_setup)
def cmd_report(args: argparse.Namespace) -> int:
    from .bench_report import write_report

    path = write_report(args.results, out=args.out, against=args.against)
    print(f"report: {path}")
    return 0
