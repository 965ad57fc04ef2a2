"""`mimi bench SPEC` runs a benchmark grid (see :mod:`mimi.bench.spec`); `mimi report` renders its JSONs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from mimi.cli.command import Command
from mimi.core.errors import ConfigError


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


def cmd_bench(args: argparse.Namespace) -> int:
    # Imported here, not at the top: mimi.bench.spec loads every method, and `mimi --help` imports this module.
    from mimi.bench import runner
    from mimi.bench.claims import claim, release
    from mimi.bench.runner import read_queue, status
    from mimi.bench.spec import BenchSpec

    spec = BenchSpec.load(args.spec)
    every_run = spec.expand()
    every = {r.id for r in every_run}  # a queued id of another shard, or outside --only, is skipped, not an error
    # a job is a run, or a lead and the runs it teaches (teacher_from): sharded, claimed and run as one
    jobs = BenchSpec.jobs(every_run)
    job_of = {r.id: key for key, members in jobs.items() for r in members}
    i, n = args.shard
    keys = [
        key
        for k, (key, members) in enumerate(jobs.items())
        if k % n == i and (not args.only or any(re.search(args.only, r.id) for r in members))
    ]
    selected = set(keys)

    def queued(strict: bool, warned: set[str] | None = None) -> list[str]:
        order = [job_of[q] for q in read_queue(args.queue, every, strict=strict, warned=warned)]
        return list(dict.fromkeys(k for k in order if k in selected))

    if args.queue:
        keys = queued(strict=True)
    runs = [r for key in keys for r in jobs[key]]
    results = Path(spec.results)
    results.mkdir(parents=True, exist_ok=True)
    done = {r.id for r in runs if status(results / f"{r.id}.json") == "ok"}
    print(f"{spec.name}: {len(runs)} runs in shard {i}/{n}, {len(done)} already done")
    if args.dry_run:
        _dry_run([r for r in runs if r.id not in done], results, job_of)
        return 0
    failed, tried, started, warned = 0, set(), 0, set()
    while True:
        if args.queue:  # re-read: the order may have changed since the last run
            try:
                keys = queued(strict=False, warned=warned)
            except ConfigError as e:  # moved or being replaced: keep the last order
                print(f"warning: {e}")
        key = next((k for k in keys if k not in tried), None)
        if key is None:
            break
        tried.add(key)
        members = jobs[key]
        if all(status(results / f"{r.id}.json") == "ok" for r in members):
            continue  # done since this sweep started, by another worker sharing the results folder
        if not claim(results, key):
            continue  # another worker is running it
        try:
            for run in members:
                if status(results / f"{run.id}.json") == "ok":
                    continue  # finished by another worker between our check and our claim, or in an earlier sweep
                started += 1
                print(f"[{started}/{len(runs) - len(done)}] {run.id}")
                why = runner.unmet(run, results)
                if why is not None:
                    rec = runner.record_failure(run, results, why)
                else:
                    rec = runner.run_one(run, results, log=(lambda s: None) if args.quiet else None)
                failed += rec["status"] != "ok"
                acc = f"test {100 * rec['test_acc']:.2f}%" if rec["status"] == "ok" else rec["error"]
                print(f"    {rec['status']}: {acc} ({rec['wall_seconds']:.0f}s)")
        finally:
            release(results, key)
    if args.report:
        from mimi.reporting.bench_report import load_results, write_report

        if load_results(results):  # nothing yet when other workers hold every run
            write_report(results)
    return 1 if failed else 0


def _dry_run(todo: list, results: Path, job_of: dict[str, str]) -> None:
    from mimi.bench.claims import claimed
    from mimi.bench.runner import estimate_seconds

    guess = estimate_seconds(todo, results)
    left = dict(guess)  # seconds still to go: a running run has spent some of its guess
    running, holders = 0, set()
    for run in todo:
        eta = f"~{guess[run.id] / 60:.0f} min" if run.id in guess else "? min"
        held = claimed(results, job_of.get(run.id, run.id))  # a job's runs are held under its lead's claim
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
    p.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="FOLDER[:LABEL,...]",
        help="also draw these runs of another results folder in grey on the plots, for scale, and list them in a "
        "table of their own (repeatable; never paired), e.g. benchmarks/results/minivtab:linear,mimi,adapter",
    )


def cmd_report(args: argparse.Namespace) -> int:
    from mimi.reporting.bench_report import write_report

    path = write_report(args.results, out=args.out, against=args.against, context=args.context)
    print(f"report: {path}")
    return 0


COMMANDS = [
    Command(
        "bench", "run a benchmark grid (tasks x methods x budgets x seeds); skips runs already done", _setup, cmd_bench
    ),
    Command(
        "report", "render tables (Markdown, HTML) and plots from a folder of bench JSONs", _report_setup, cmd_report
    ),
]
