"""Running one benchmark run and the things a sweep needs around it: its JSON record, the queue file, time estimates.

A run goes through the same engine as `mimi train` (:func:`mimi.trainer.train`); its JSON (config, git commit,
package versions, times, parameter counts, accuracies) is the only thing `mimi report` reads.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mimi.config import TrainConfig
from mimi.core.errors import ConfigError
from mimi.core.files import atomic_write_json

if TYPE_CHECKING:
    from mimi.bench.spec import BenchRun

logger = logging.getLogger(__name__)


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
        **({"budgets": kept} if (kept := _kept_budgets(out, summary, head)) else {}),
    }


def _kept_budgets(out: Path, summary: list[dict], head: int | None) -> list[dict[str, Any]]:
    """A run of several budgets: the task it kept at each, largest first, with what reaching it cost (epochs and
    seconds from the start of the run). One run, so one ``wall_seconds``; the report reads each as a point."""
    kept = []
    for k, e in enumerate(summary):
        if "budget" not in e:
            continue
        path = out / "budgets" / f"{e['budget']}.safetensors"
        kept.append(
            {
                "budget": e["budget"],
                "cycle": e["cycle"],
                "params": {
                    "trainable": e["trainable_params"],
                    "trainable_without_head": e["trainable_params"] - head if head is not None else None,
                    "adapter": e["adapter_params"],
                    "head": head,
                    "pct_of_backbone": e["pct_of_backbone"],
                },
                "checkpoint_bytes": path.stat().st_size if path.is_file() else None,
                "val_acc": e["val_acc"],
                "test_acc": e["test_acc"],
                "epochs": sum(c["epochs"] for c in summary[: k + 1]),
                "seconds": sum(c["seconds"] for c in summary[: k + 1]),
            }
        )
    return kept


def _record(run: BenchRun) -> dict[str, Any]:
    return {
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


def unmet(run: BenchRun, results: Path) -> str | None:
    """Why a run taught by another run of the spec (``teacher_from``) cannot start now; None when it can.

    A follower already started holds its teacher in its own folder and always can; a new one needs its lead
    finished and the lead's weights file still there.
    """
    if run.after is None or (Path(run.config["out"]) / "checkpoint.safetensors").is_file():
        return None
    if status(results / f"{run.after}.json") != "ok":
        return f"its teacher's run {run.after} has not finished"
    from mimi.training.distill import parse_teacher

    _, path = parse_teacher(run.config["teacher"])
    if not path.is_file():
        return (
            f"its teacher {path} is gone (run folders do not survive a move to another machine): delete "
            f"{results / (run.after + '.json')} to train the pair again"
        )
    return None


def record_failure(run: BenchRun, results: Path, error: str) -> dict[str, Any]:
    """Write (and return) the JSON of a run that could not start."""
    record = {**_record(run), "status": "failed", "error": error, "wall_seconds": 0.0}
    atomic_write_json(results / f"{run.id}.json", record)
    return record


def run_one(run: BenchRun, results: Path, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train one run (resuming its folder if a previous attempt was cut) and write its JSON."""
    from mimi import trainer

    record = _record(run)
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
    edited while the workers run), logged once per id in ``warned``.
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
            logger.warning(f"warning: {path}: {i!r} is not a run of this spec, skipped")
        if warned is not None:
            warned.add(i)
    return [i for i in ids if i in known]


def status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, json.JSONDecodeError):
        return None
