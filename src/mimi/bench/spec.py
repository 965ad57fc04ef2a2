"""A benchmark grid: tasks x methods x budgets x seeds through the same engine, one JSON per run.

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
      # a pair: the distilled MiMi run, then the small adapter taught by that run's cycle-0 model
      - {label: mimi-distill, method: mimi, adapter_dim: 96, budget_dim: 3, distill: true, save_cycles: true}
      - {label: adapter-distill, method: adapter, adapter_dim: 3, teacher_from: "mimi-distill__budgetdim3:cycles/cycle_0.safetensors"}

``teacher_from: LEAD[:WEIGHTS]`` makes a run learn (``--teacher``) from the run of the same task and seed whose id is
``<task>__LEAD__s<seed>``, and ties the two into one job: a worker trains the lead, then its followers, so that the
teacher's files (run folders do not survive a move to another machine) are there when a follower starts.

Runs whose JSON says ``ok`` are skipped; failures are recorded (status ``failed``) and retried next time.
``--queue FILE`` runs the listed run ids in the file's order, re-reading it before every run, so the order
can be changed while workers run.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mimi.config import TrainConfig, load_yaml
from mimi.core.errors import ConfigError
from mimi.core.scores import check_score
from mimi.methods import get_method


@dataclass
class BenchRun:
    id: str
    task: str
    group: str
    label: str
    seed: int
    grid: dict[str, Any]  # the swept values of this run (e.g. {"budget_dim": 8})
    config: dict[str, Any]
    after: str | None = None  # the id of the run whose model teaches this one (``teacher_from``): the same job


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
                    teacher_from = entry.pop("teacher_from", None)
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
                            lead = None
                            if teacher_from is not None:
                                lead, weights = _lead(teacher_from, task, seed, label)
                                cfg.update(distill=True, teacher=f"{Path(self.runs) / lead}:{weights}")
                            checked = TrainConfig.from_dict(cfg)  # validate early: a typo fails before hours of runs
                            get_method(checked.method)
                            check_score(checked.score)
                            runs.append(BenchRun(rid, task, group, label, seed, grid, cfg, after=lead))
        _check_leads(runs)
        return runs

    @staticmethod
    def jobs(runs: list[BenchRun]) -> dict[str, list[BenchRun]]:
        """Lead id -> the runs one worker does in a row: the lead, then the runs it teaches (``teacher_from``); a run
        that teaches none and learns from none is a job of its own. In the order of the leads."""
        jobs: dict[str, list[BenchRun]] = {}
        for r in runs:
            if r.after is None:
                jobs[r.id] = [r]
        for r in runs:
            if r.after is not None:
                jobs[r.after].append(r)
        return jobs


def _lead(teacher_from: Any, task: str, seed: int, label: str) -> tuple[str, str]:
    """``LEAD[:WEIGHTS]`` -> (the lead's run id for this task and seed, its weights file)."""
    if not isinstance(teacher_from, str) or not teacher_from.strip():
        raise ConfigError(f"method {label!r}: teacher_from must be LEAD[:WEIGHTS] (a run id without task and seed)")
    lead, _, weights = teacher_from.partition(":")
    return _run_id(task, lead, {}, seed), weights or "adapters.safetensors"


def _check_leads(runs: list[BenchRun]) -> None:
    by_id = {r.id: r for r in runs}
    for r in runs:
        if r.after is None:
            continue
        lead = by_id.get(r.after)
        if lead is None:
            raise ConfigError(f"{r.id}: teacher_from names {r.after!r}, which is no run of this spec")
        if lead.after is not None:
            raise ConfigError(f"{r.id}: its teacher {lead.id} learns from another run itself; chains are not jobs")
        weights = r.config["teacher"].rpartition(":")[2]
        if weights.startswith("cycles/") and not lead.config.get("save_cycles", True):
            raise ConfigError(
                f"{r.id}: its teacher is {weights} of {lead.id}, which does not keep cycles/ files; "
                "give that method save_cycles: true"
            )


def _run_id(task: str, label: str, grid: dict[str, Any], seed: int) -> str:
    parts = [task.split(":")[-1], label] + [f"{k.replace('_', '')}{v}" for k, v in grid.items()] + [f"s{seed}"]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", "__".join(parts))
