"""The benchmark report, made from the run JSONs alone: tables per task and group, Pareto and size plots."""

from __future__ import annotations

import html
import json
import logging
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

log = logging.getLogger(__name__)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mimi.core.errors import ConfigError  # noqa: E402
from mimi.core.files import atomic_write, atomic_write_text  # noqa: E402
from mimi.reporting.run_report import _block_grid, human, save_size_grid, size_unit  # noqa: E402
from mimi.reporting.stats import MeanSE, PairedDiff, clustered_bootstrap_interval, mean_se, paired_difference  # noqa: E402

GROUP_ORDER = ("natural", "specialized", "structured")


def load_results(results: Path | Sequence[Path]) -> list[dict[str, Any]]:
    """The run records of one results folder, or of several merged (shards of a sweep run on other machines).

    A run found in two folders is reported once; if the two records disagree (status or test accuracy), the first
    folder's is kept and a warning names both.
    """
    folders = [Path(results)] if isinstance(results, str | Path) else [Path(r) for r in results]
    by_id: dict[str, tuple[dict[str, Any], Path]] = {}
    for folder in folders:
        for p in sorted(folder.glob("*.json")):
            try:
                rec = json.loads(p.read_text())
            except json.JSONDecodeError:
                continue
            if not (isinstance(rec, dict) and "id" in rec and "status" in rec):
                continue
            if rec["id"] in by_id:
                first, where = by_id[rec["id"]]
                if (first["status"], first.get("test_acc")) != (rec["status"], rec.get("test_acc")):
                    log.warning(
                        "warning: run %s differs between %s and %s; reporting the first", rec["id"], where, folder
                    )
                continue
            by_id[rec["id"]] = (rec, folder)
    return [point for rec, _ in by_id.values() for point in budget_points(rec)]


def budget_points(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """A run of several budgets as one record per budget it kept (largest first), each as a run to that budget
    would be recorded: its own id (``<run id>@<budget>``), ``budget_params`` in its config and grid, the parameters,
    accuracies and cycles up to that budget, and ``run_id`` naming the one run they share (its cost is counted
    once, see :func:`wall_seconds`). Any other record is returned as it is."""
    kept = rec.get("budgets")
    if rec.get("status") != "ok" or not kept:
        return [rec]
    points = []
    for k in kept:
        b = k["budget"]
        point = {key: v for key, v in rec.items() if key != "budgets"}
        point.update(
            id=f"{rec['id']}@{b}",
            run_id=rec["id"],
            grid={**rec.get("grid", {}), "budget_params": b},
            config={**rec.get("config", {}), "budget_params": b},
            budget=b,
            cycles=rec.get("cycles", [])[: k["cycle"] + 1],
            epochs=k["epochs"],
            **{key: k[key] for key in ("params", "checkpoint_bytes", "val_acc", "test_acc")},
        )
        points.append(point)
    return points


def wall_seconds(recs: list[dict]) -> float:
    """Total wall time of the runs behind ``recs``: the points of one run of several budgets count it once."""
    walls = {r.get("run_id", r["id"]): r.get("wall_seconds", 0) or 0 for r in recs}
    return sum(walls.values())


@dataclass(frozen=True)
class Context:
    """Runs of another results folder drawn on the Pareto plots for scale (the linear probe, the large adapters of
    a committed grid), in grey, and listed in their own table: never paired, never in the verdicts.
    ``labels`` empty: every label of the folder."""

    folder: Path
    labels: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str | Path) -> Context:
        """``FOLDER`` or ``FOLDER:LABEL,LABEL`` (the form ``mimi report --context`` takes)."""
        text = str(spec)
        folder, _, labels = text.rpartition(":")
        if not folder or "/" in labels or "\\" in labels:  # no labels given (or a drive letter's colon)
            folder, labels = text, ""
        return cls(Path(folder), tuple(x.strip() for x in labels.split(",") if x.strip()))

    @property
    def name(self) -> str:
        return self.folder.name

    def load(self, tasks: set[str]) -> list[dict[str, Any]]:
        """The finished runs of the chosen labels on ``tasks``, each with ``context`` set to the folder's name."""
        if not self.folder.is_dir():
            raise ConfigError(f"--context {self.folder}: no such folder; give a results folder of `mimi bench`")
        ok = [r for r in load_results(self.folder) if r["status"] == "ok"]
        have = sorted({r["label"] for r in ok})
        for label in self.labels:
            if label not in have:
                raise ConfigError(
                    f"--context {self.folder}:{label}: no finished run has that label there; its labels: "
                    + ", ".join(have)
                )
        chosen = [r for r in ok if r["task"] in tasks and (not self.labels or r["label"] in self.labels)]
        if not chosen:
            raise ConfigError(
                f"--context {self.folder}: none of its runs is on these results' tasks ({', '.join(sorted(tasks))})"
            )
        return [{**r, "context": self.name} for r in chosen]


def variant(rec: dict, skip: tuple[str, ...] = ()) -> str:
    """Method label plus its swept values (those not in ``skip``), e.g. 'mimi budgetdim=8'."""
    grid = " ".join(f"{k.replace('_', '')}={v}" for k, v in rec.get("grid", {}).items() if k not in skip)
    return f"{rec['label']} {grid}".strip()


SIZE_KEYS = ("adapter_dim", "budget_dim", "budget_params")


def line_key(rec: dict) -> str:
    """A plot line: the method label plus its swept values other than the size (one line per score, say); a
    context run's line also names its folder."""
    key = variant(rec, skip=SIZE_KEYS)
    return f"{key} [{rec['context']}]" if rec.get("context") else key


def size_r(rec: dict) -> int | None:
    """The budget a run was sized by, as a uniform-adapter hidden size r: its budget_dim, or a plain
    adapter's own hidden size. None for methods with no such knob (linear, BitFit, VPT, ...)."""
    cfg = rec.get("config", {})
    if cfg.get("budget_dim") is not None:
        return int(cfg["budget_dim"])
    if cfg.get("method") == "adapter" and cfg.get("adapter_dim") is not None:
        return int(cfg["adapter_dim"])
    return None


def _short(task: str) -> str:
    return task.split(":")[-1]


def _groups(recs: list[dict]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for r in recs:
        if r["task"] not in groups[r["group"]]:
            groups[r["group"]].append(r["task"])
    order = [g for g in GROUP_ORDER if g in groups] + sorted(g for g in groups if g not in GROUP_ORDER)
    return {g: groups[g] for g in order}


def aggregate(recs: list[dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """variant -> task -> {acc, se, std, params, n}: mean over seeds of the final test accuracy, its standard
    error (None with one seed), population std and the number of seeds."""
    cells: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        if r["status"] == "ok":
            cells[variant(r)][r["task"]].append(r)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for v, tasks in cells.items():
        out[v] = {}
        for t, rs in tasks.items():
            accs = [100 * r["test_acc"] for r in rs]
            params = [r["params"]["trainable_without_head"] or r["params"]["trainable"] for r in rs]
            stored = [r["checkpoint_bytes"] for r in rs if r.get("checkpoint_bytes")]
            out[v][t] = {
                "bytes": statistics.mean(stored) if len(stored) == len(rs) else None,
                "acc": statistics.mean(accs),
                "se": mean_se(accs).se,
                "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                "params": statistics.mean(params),
                "n": len(rs),
            }
    return out


def _means(cells: dict[str, dict], groups: dict[str, list[str]]) -> tuple[float | None, float | None]:
    """VTAB's two conventions: mean over tasks, and mean of the group means (None if a task is missing)."""
    tasks = [t for ts in groups.values() for t in ts]
    if not all(t in cells for t in tasks):
        return None, None
    task_mean = statistics.mean(cells[t]["acc"] for t in tasks)
    group_mean = statistics.mean(statistics.mean(cells[t]["acc"] for t in ts) for ts in groups.values())
    return task_mean, group_mean


def fmt_mean_se(s: MeanSE) -> str:
    """'85.10' for one seed, '85.10 ± 0.32 (3)' (mean ± standard error (seeds)) for more."""
    return f"{s.mean:.2f}" if s.se is None else f"{s.mean:.2f} ± {s.se:.2f} ({s.n})"


def _fmt(cell: dict | None) -> str:
    if cell is None:
        return "–"
    return fmt_mean_se(MeanSE(cell["acc"], cell["se"], cell["n"]))


def main_table(agg: dict, groups: dict[str, list[str]]) -> list[list[str]]:
    tasks = [t for ts in groups.values() for t in ts]
    header = ["method", "params (no head)"] + [_short(t) for t in tasks] + ["mean (tasks)", "mean (groups)"]
    rows = [header]

    def sort_key(v: str) -> tuple:
        ps = [c["params"] for c in agg[v].values()]
        return (v.split()[0], -statistics.mean(ps))

    for v in sorted(agg, key=sort_key):
        cells = agg[v]
        tm, gm = _means(cells, groups)
        params = statistics.mean(c["params"] for c in cells.values())
        rows.append(
            [v, human(params)]
            + [_fmt(cells.get(t)) for t in tasks]
            + [f"{tm:.2f}" if tm is not None else "–", f"{gm:.2f}" if gm is not None else "–"]
        )
    return rows


def context_table(context: Sequence[dict], groups: dict[str, list[str]]) -> list[list[str]]:
    """The per-task table of the context runs (see :class:`Context`) on these results' tasks, each row's method
    naming its folder; its means only where the row has every task."""
    agg: dict[str, dict[str, dict[str, Any]]] = {}
    for name in dict.fromkeys(r["context"] for r in context):
        for v, cells in aggregate([r for r in context if r["context"] == name]).items():
            agg[f"{v} [{name}]"] = cells
    return main_table(agg, groups)


def group_table(agg: dict, groups: dict[str, list[str]]) -> list[list[str]]:
    rows = [["method"] + list(groups)]
    for v in sorted(agg):
        row = [v]
        for ts in groups.values():
            accs = [agg[v][t]["acc"] for t in ts if t in agg[v]]
            row.append(f"{statistics.mean(accs):.2f}" if len(accs) == len(ts) else "–")
        rows.append(row)
    return rows


def _task_accs(recs: list[dict]) -> dict[str, float]:
    """task -> test accuracy (%), mean over seeds."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for r in recs:
        by_task[r["task"]].append(100 * r["test_acc"])
    return {t: statistics.mean(a) for t, a in by_task.items()}


def _compare_rows(named: dict[str, list[dict]], ref: str | None) -> list[list[str]]:
    """Rows ``name, params, tasks, mean, ref's mean, gap``: each entry against the reference on the tasks
    both ran (all of its tasks where there is no reference)."""
    accs = {n: _task_accs(rs) for n, rs in named.items()}
    rows = []
    for n, rs in named.items():
        params = statistics.mean(r["params"]["trainable_without_head"] or r["params"]["trainable"] for r in rs)
        tasks = sorted(set(accs[n]) & set(accs[ref])) if ref in accs else sorted(accs[n])
        mean = statistics.mean(accs[n][t] for t in tasks) if tasks else None
        ref_mean, gap = "–", "–"
        if ref in accs and n != ref and tasks:
            d = [accs[n][t] - accs[ref][t] for t in tasks]
            ref_mean = f"{statistics.mean(accs[ref][t] for t in tasks):.2f}"
            gap = f"{statistics.mean(d):+.2f} ({sum(x > 0 for x in d)}/{sum(x < 0 for x in d)})"
        rows.append([n, human(params), str(len(tasks)), f"{mean:.2f}" if mean is not None else "–", ref_mean, gap])
    return rows


def _is_mimi(rec: dict) -> bool:
    """Plain MiMi: the default score, no distillation (a distilled MiMi is a method compared with it)."""
    cfg = rec.get("config", {})
    return cfg.get("method") == "mimi" and cfg.get("score", "mimi") == "mimi" and not cfg.get("distill")


def _cycle_points(ok: list[dict], budget: int, slack: float) -> list[dict]:
    """MiMi at a budget it was not run to: the cycle of a run to a smaller budget whose adapter parameters
    are at most ``budget`` and at least ``(1 - slack) * budget`` (the schedule passes through it), as a record."""
    points = []
    for r in ok:
        if not _is_mimi(r) or (r.get("budget") or 0) >= budget:
            continue
        for c in r.get("cycles", [])[1:-1]:
            if c.get("test_acc") is not None and (1 - slack) * budget <= c["adapter_params"] <= budget:
                head = r["params"].get("head") or 0
                points.append(
                    {
                        **r,
                        "label": f"{r['label']} (cycle {c['cycle']} of a longer run)",
                        "test_acc": c["test_acc"],
                        "params": {"trainable_without_head": c["trainable_params"] - head, "trainable": None},
                    }
                )
                break
    return points


def same_budget(ok: list[dict], slack: float = 0.02) -> dict[int, dict[str, list[dict]]]:
    """Budget r -> method -> runs: the methods sized by the same budget, MiMi's runs among them.

    Where MiMi was not run to a budget, the cycle of a MiMi run to a smaller budget that lands within
    ``slack`` below it stands in (with as many epochs as a run to that budget would spend)."""
    by_r: dict[int, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    budgets: dict[int, int] = {}
    for r in ok:
        cfg = r.get("config", {})
        if size_r(r) is not None and cfg.get("score", "mimi") == "mimi":
            by_r[size_r(r)][r["label"]].append(r)
            budget = r.get("budget") or (r["params"].get("adapter") if cfg.get("method") == "adapter" else None)
            if budget:
                budgets.setdefault(size_r(r), budget)
    for rr, named in by_r.items():
        if not any(_is_mimi(rs[0]) for rs in named.values()) and rr in budgets:
            for point in _cycle_points(ok, budgets[rr], slack):
                named[point["label"]].append(point)
    return by_r


def budget_table(ok: list[dict], slack: float = 0.02) -> list[list[str]]:
    """Methods sized by the same budget (see ``same_budget``), side by side, each against MiMi on the tasks
    both ran."""
    by_r = same_budget(ok, slack)
    rows = [
        ["budget r", "method", "params (no head)", "tasks", "mean test acc", "mimi, same tasks", "gap (above/below)"]
    ]
    for rr in sorted(by_r, reverse=True):
        named = dict(sorted(by_r[rr].items(), key=lambda kv: (not _is_mimi(kv[1][0]), kv[0])))
        ref = next((n for n, rs in named.items() if _is_mimi(rs[0])), None)
        if len(named) > 1:
            rows += [[str(rr)] + row for row in _compare_rows(named, ref)]
    return rows


def _by_pair(recs: list[dict]) -> dict[tuple[str, int], float]:
    """(task, seed) -> test accuracy (%). Records sharing a pair are averaged: MiMi's stand-in cycles can come
    from runs to several smaller budgets, with the same seed."""
    accs: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in recs:
        accs[(r["task"], r.get("seed", 0))].append(100 * r["test_acc"])
    return {k: statistics.mean(v) for k, v in accs.items()}


# Fewer pairs than this get no "ahead" verdict: even 5 of 5 differences of one sign have a two-sided sign-test
# p of 0.06, while their percentile bootstrap interval always excludes 0.
MIN_PAIRS = 6


@dataclass(frozen=True)
class Comparison:
    """One method minus a reference (MiMi unless said) at budget ``r``, paired by (task, seed)."""

    r: int
    name: str
    diff: PairedDiff
    n_seeds: int
    above: int  # tasks whose mean over the paired seeds is above the reference's
    below: int
    ref: str = "mimi"
    # 95% interval of the same mean with tasks resampled, then seeds within a task: what the gap says about
    # another task; None with fewer than two tasks
    across_tasks: tuple[float, float] | None = None

    @property
    def verdict(self) -> str:
        d = self.diff
        if d.n < 2:  # one pair resamples to itself: no interval to judge by
            return "one pair, no interval"
        if d.holds(0.0):
            return f"not separable at {self.n_seeds} seed{'s' if self.n_seeds != 1 else ''}"
        v = f"{self.name} ahead" if d.mean > 0 else f"{self.ref} ahead"
        if d.n < MIN_PAIRS:  # a bootstrap of a handful of pairs excludes 0 whenever they agree in sign
            return f"{v} in {d.n} pairs: too few to judge (< {MIN_PAIRS})"
        if self.across_tasks is not None and self.across_tasks[0] <= 0.0 <= self.across_tasks[1]:
            v += " on these tasks; not with tasks resampled"  # the gap may not carry over to another task
        return v


def compare_pairs(
    r: int,
    name: str,
    mine: dict[tuple[str, int], float],
    ref: dict[tuple[str, int], float],
    seed: int,
    ref_name: str = "mimi",
) -> Comparison | None:
    """``mine - ref`` paired by (task, seed) (``(task, seed) -> test %``): mean and interval over pairs, and with
    tasks resampled; None when no pair is shared."""
    pairs = sorted(set(mine) & set(ref))
    if not pairs:
        return None
    d = paired_difference([mine[p] for p in pairs], [ref[p] for p in pairs], seed=seed)
    per_task: dict[str, list[float]] = defaultdict(list)
    for t, s in pairs:
        per_task[t].append(mine[(t, s)] - ref[(t, s)])
    # the mean of a task's paired differences is the gap between its two means over the same seeds
    gaps = [statistics.mean(v) for v in per_task.values()]
    n_seeds = len({s for _, s in pairs})
    across = clustered_bootstrap_interval(list(per_task.values()), seed=seed) if len(per_task) > 1 else None
    above, below = sum(g > 0 for g in gaps), sum(g < 0 for g in gaps)
    return Comparison(r, name, d, n_seeds, above, below, ref_name, across)


def _interval(c: Comparison) -> str:
    d = c.diff
    return f"[{d.low:+.2f}, {d.high:+.2f}]" if d.n > 1 else "–"


def _across(c: Comparison) -> str:
    return "–" if c.across_tasks is None else "[{:+.2f}, {:+.2f}]".format(*c.across_tasks)


def paired_comparisons(
    ok: list[dict], slack: float = 0.02, seed: int = 0, against: str | None = None
) -> list[Comparison]:
    """Each method minus MiMi (or the method labelled ``against``) at the same budget (see ``same_budget``),
    paired by (task, seed): the mean difference in points and its 95% percentile bootstrap interval (pairs
    resampled; ``seed`` fixes the resamples so the report is reproducible), largest budget first. Budgets
    where the reference did not run are left out."""
    by_r = same_budget(ok, slack)
    out = []
    for rr in sorted(by_r, reverse=True):
        if against is None:
            # all MiMi entries at r pool into one reference: stand-in cycles are labelled by their cycle number
            is_ref = {name: _is_mimi(rs[0]) for name, rs in by_r[rr].items()}
        else:
            is_ref = {name: name == against for name in by_r[rr]}
        ref = _by_pair([r for name, rs in by_r[rr].items() if is_ref[name] for r in rs])
        for name, rs in sorted(by_r[rr].items()):
            c = None if is_ref[name] else compare_pairs(rr, name, _by_pair(rs), ref, seed, against or "mimi")
            if c is not None:
                out.append(c)
    return out


def paired_table(ok: list[dict], slack: float = 0.02, seed: int = 0, against: str | None = None) -> list[list[str]]:
    """``paired_comparisons`` as rows: pairs (seeds), mean difference, interval, tasks above/below, verdict."""
    ref = against or "mimi"
    header = ["budget r", "method", "pairs (seeds)", f"method − {ref}", "95% bootstrap interval"]
    rows = [header + ["tasks resampled", "tasks above/below", "verdict"]]
    for c in paired_comparisons(ok, slack, seed, against):
        d = c.diff
        row = [str(c.r), c.name, f"{d.n} ({c.n_seeds})", f"{d.mean:+.2f}", _interval(c), _across(c)]
        rows.append(row + [f"{c.above}/{c.below}", c.verdict])
    return rows


def by_param_budget(ok: list[dict]) -> dict[int, dict[str, list[dict]]]:
    """Budget in adapter parameters -> method label -> runs, for runs sized by ``--budget-params`` (one number):
    the kilobyte budgets, below what a uniform adapter can express, where every peer is given MiMi's budget. A MiMi
    run with another score (its control) is one of the labels compared with MiMi, never the reference."""
    out: dict[int, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in ok:
        cfg = r.get("config", {})
        b = cfg.get("budget_params")
        if isinstance(b, int) and cfg.get("budget_dim") is None:
            out[b][r["label"]].append(r)
    return out


def param_budget_table(ok: list[dict], seed: int = 0) -> list[list[str]]:
    """Each method minus MiMi at the same parameter budget (see :func:`by_param_budget`), paired by (task, seed)
    as in :func:`paired_table`, with each side's mean trained parameters (no head). The reference is the MiMi label
    with the most runs at that budget; another MiMi label there (runs to that budget alone, say) is compared with it
    like any method."""
    header = ["budget (params)", "method", "params (no head)", "pairs (seeds)", "method − mimi"]
    rows = [header + ["95% bootstrap interval", "tasks resampled", "tasks above/below", "verdict"]]
    for b, named in sorted(by_param_budget(ok).items(), reverse=True):
        mimis = [n for n, rs in named.items() if _is_mimi(rs[0])]
        ref_name = max(mimis, key=lambda n: (len(named[n]), n)) if mimis else None
        ref = _by_pair(named[ref_name]) if ref_name else {}
        for name, rs in sorted(named.items(), key=lambda kv: (kv[0] != ref_name, kv[0])):
            params = statistics.mean(r["params"]["trainable_without_head"] or r["params"]["trainable"] for r in rs)
            head = [f"{b:,}", name, f"{params:,.0f}"]
            if name == ref_name:
                rows.append(head + [f"{len(rs)} runs", "(reference)", "", "", "", ""])
                continue
            c = compare_pairs(b, name, _by_pair(rs), ref, seed, ref_name or "mimi")
            if c is None:
                rows.append(head + [f"{len(rs)} runs", "no MiMi pair", "", "", "", ""])
                continue
            d = c.diff
            rows.append(head + [f"{d.n} ({c.n_seeds})", f"{d.mean:+.2f}", _interval(c), _across(c)])
            rows[-1] += [f"{c.above}/{c.below}", c.verdict]
    return rows


def plot_paired(ok: list[dict], path: Path, slack: float = 0.02, seed: int = 0) -> Path | None:
    """A forest plot of ``paired_comparisons``: each method's mean gap to MiMi with its 95% interval, one row
    per (budget, method); red where MiMi is ahead, blue where the method is, grey where 0 is inside."""
    comps = [c for c in paired_comparisons(ok, slack, seed) if c.diff.n > 1]
    if not comps:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(comps) + 1.3), dpi=120)
    ys = list(range(len(comps)))[::-1]
    for y, c in zip(ys, comps):
        d = c.diff
        color = "grey" if d.holds(0.0) else ("tab:blue" if d.mean > 0 else "tab:red")
        if c.across_tasks is not None:  # a pale band behind the pairs' interval, usually wider
            ax.plot(c.across_tasks, [y, y], color=color, alpha=0.2, linewidth=8, solid_capstyle="butt")
        ax.errorbar(
            d.mean, y, xerr=[[d.mean - d.low], [d.high - d.mean]], fmt="o", color=color, capsize=3, markersize=5
        )
        note = f"{d.mean:+.2f}, {d.n} pairs, {c.n_seeds} seed{'s' if c.n_seeds > 1 else ''}"
        right = max(d.high, c.across_tasks[1] if c.across_tasks else d.high)
        ax.annotate(
            note,
            (right, y),
            xytext=(6, -3),
            textcoords="offset points",
            fontsize=7,
            color="dimgrey",
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.85},  # over the 0 line
            zorder=3,
        )
    for y, (a, b) in zip(ys, zip(comps, comps[1:])):
        if a.r != b.r:  # a rule between budgets
            ax.axhline(y - 0.5, color="lightgrey", linewidth=0.8)
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_yticks(ys, [f"r={c.r}  {c.name}" for c in comps], fontsize=8)
    ax.set_xlabel("test accuracy minus MiMi's, same budget (points; linear in ±2, log beyond)", fontsize=9)
    ax.set_title(
        "Against MiMi, paired by (task, seed): right of 0 beats MiMi\n"
        "whiskers: 95% interval, pairs resampled; pale band: tasks resampled",
        fontsize=9,
    )
    ax.grid(True, axis="x", alpha=0.3)
    # linear within +-2 points, logarithmic beyond: one far-off method (AdaLoRA at -12) does not squeeze the rest
    ax.set_xscale("symlog", linthresh=2.0)
    lo = min([c.diff.low for c in comps] + [c.across_tasks[0] for c in comps if c.across_tasks])
    hi = max([c.diff.high for c in comps] + [c.across_tasks[1] for c in comps if c.across_tasks])
    ax.set_xlim(min(lo, -1.0) * 1.15, max(hi, 1.0) * 4 + 4)  # room for the notes on the right
    ticks = [t for t in (-20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20) if lo * 1.15 <= t <= max(hi, 1.0) * 4 + 4]
    ax.set_xticks(ticks, [f"{t:+d}" if t else "0" for t in ticks])
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def ablation_table(ok: list[dict], seed: int = 0) -> list[list[str]]:
    """MiMi's neuron scores and its one-shot variant, at every budget where two or more of them ran: each
    against the default ``mimi`` score, paired by (task, seed) as in ``paired_table``."""
    by_r: dict[int, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in ok:
        cfg = r.get("config", {})
        if cfg.get("method") in ("mimi", "mimi-oneshot") and size_r(r) is not None and not cfg.get("distill"):
            name = f"{cfg.get('score', 'mimi')}" + (", one-shot" if cfg["method"] == "mimi-oneshot" else "")
            by_r[size_r(r)][name].append(r)
    rows = []
    for rr in sorted(by_r, reverse=True):
        named = by_r[rr]
        if len(named) < 2 or "mimi" not in named:
            continue
        ref = _by_pair(named["mimi"])
        for name, rs in sorted(named.items(), key=lambda kv: (kv[0] != "mimi", kv[0])):
            params = human(
                statistics.mean(r["params"]["trainable_without_head"] or r["params"]["trainable"] for r in rs)
            )
            mine = _by_pair(rs)
            pairs = sorted(set(mine) & set(ref)) if name != "mimi" else sorted(mine)
            n_seeds = len({s for _, s in pairs})
            row = [str(rr), name, params, f"{len(pairs)} ({n_seeds})"]
            row.append(f"{statistics.mean(mine[p] for p in pairs):.2f}" if pairs else "–")
            c = None if name == "mimi" else compare_pairs(rr, name, mine, ref, seed)
            if c is None:
                rows.append(row + ["–"] * 6)
                continue
            mimi_mean = statistics.mean(ref[p] for p in pairs)
            row += [f"{mimi_mean:.2f}", f"{c.diff.mean:+.2f}", _interval(c), _across(c)]
            rows.append(row + [f"{c.above}/{c.below}", c.verdict])
    if not rows:
        return []
    header = ["budget r", "score", "params (no head)", "pairs (seeds)", "mean test acc", "mimi, same pairs"]
    header += ["score − mimi", "95% bootstrap interval", "tasks resampled", "tasks above/below", "verdict"]
    return [header] + rows


def _md(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def _html(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


Point = tuple[float, float, float | None]  # params, accuracy (%), its standard error over seeds (None: one seed)


def _size(r: dict, x: str) -> float | None:
    """A run's x coordinate: trainable parameters without head, or the bytes of its task file as trained."""
    if x == "bytes":
        return r.get("checkpoint_bytes") or None
    return r["params"]["trainable_without_head"] or r["params"]["trainable"]


def _task_points(ok: list[dict], task: str, x: str = "params") -> dict[str, list[Point]]:
    """Plot line -> one point per variant on ``task``: mean params (or task-file bytes, ``x="bytes"``) and mean ±
    SE of accuracy over seeds."""
    runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in ok:
        if r["task"] == task:
            runs[(line_key(r), variant(r))].append(r)
    by_label: dict[str, list[Point]] = defaultdict(list)
    for (label, _), rs in runs.items():
        acc = mean_se([100 * r["test_acc"] for r in rs])
        sizes = [_size(r, x) for r in rs]
        if None not in sizes:
            by_label[label].append((statistics.mean(sizes), acc.mean, acc.se))
    return by_label


def _mean_points(ok: list[dict], x: str = "params", n_tasks: int | None = None) -> dict[str, list[Point]]:
    """Plot line -> one point per variant that ran on every task (``n_tasks``, default: all tasks of ``ok``):
    means over tasks. The error bar is the standard error of that mean, sqrt(sum of squared per-task SEs) / tasks
    (seeds independent across tasks), only where every task has two seeds or more: a single seed says nothing
    about its own spread."""
    agg = aggregate(ok)
    n_tasks = n_tasks or len({r["task"] for r in ok})
    by_label: dict[str, list[Point]] = defaultdict(list)
    for v, cells in agg.items():
        if len(cells) == n_tasks:
            label = next(line_key(r) for r in ok if variant(r) == v)
            ses = [c["se"] for c in cells.values()]
            se = None if None in ses else sum(e * e for e in ses) ** 0.5 / n_tasks
            sizes = [c[x] for c in cells.values()]
            if None not in sizes:
                by_label[label].append((statistics.mean(sizes), statistics.mean(c["acc"] for c in cells.values()), se))
    return by_label


def _head_only(recs: list[dict]) -> set[str]:
    """Plot lines whose runs train the head alone (the linear probe): drawn at the head's size, and said so."""
    lines: dict[str, bool] = {}
    for r in recs:
        lines[line_key(r)] = lines.get(line_key(r), True) and not r["params"]["trainable_without_head"]
    return {k for k, v in lines.items() if v}


def plot_pareto(
    recs: list[dict], task: str | None, path: Path, x: str = "params", context: Sequence[dict] = ()
) -> Path:
    """Accuracy vs trainable parameters (log x), or vs the bytes of each task file as trained (``x="bytes"``,
    float32): one line per method label, ± SE bars where a point has two seeds or more; the cycles of pruned runs
    dotted (parameters only). ``context`` runs (see :class:`Context`) are drawn in grey, hollow and dashed, their
    mean only where they ran on every task of ``recs``. A line of head-only runs (the linear probe) is drawn at
    the head's parameter count, its legend says so."""
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=120)
    ok = [r for r in recs if r["status"] == "ok"]
    by_label = _task_points(ok, task, x) if task is not None else _mean_points(ok, x)
    head_only = _head_only(ok) | _head_only(list(context))
    if context:
        n_tasks = len({r["task"] for r in ok})
        cx = _task_points(list(context), task, x) if task is not None else _mean_points(list(context), x, n_tasks)
        for i, (label, pts) in enumerate(sorted(cx.items())):
            pts.sort()
            xs, ys, _ = zip(*pts)
            grey = plt.cm.Greys(0.45 + 0.5 * (i % 4) / 3)
            shown = f"{label}, head only" if label in head_only and x == "params" else label
            ax.plot(
                xs,
                ys,
                linestyle="--" if len(pts) > 1 else "none",
                color=grey,
                marker="os^vD<>ph*P"[i % 11],
                markerfacecolor="none",
                markersize=6,
                linewidth=1,
                label=shown,
                zorder=1,
            )
    colors: dict[str, Any] = {}
    for i, (label, pts) in enumerate(sorted(by_label.items())):
        pts.sort()
        xs, ys, errs = zip(*pts)
        style = dict(color=plt.cm.tab20(i % 20), marker="os^vD<>ph*P"[i % 11], markersize=6, linewidth=1.2)
        if label == "mimi":  # the method of this project: drawn on top, thicker
            style.update(color="black", marker="*", markersize=11, linewidth=2.2, zorder=5)
        shown = f"{label}, head only" if label in head_only and x == "params" else label
        ax.plot(xs, ys, linestyle="-" if len(pts) > 1 else "none", label=shown, **style)
        colors[label] = style["color"]
        bars = [(x, y, e) for x, y, e in zip(xs, ys, errs) if e is not None]
        if bars:
            bx, by, be = zip(*bars)
            ax.errorbar(bx, by, yerr=be, fmt="none", ecolor=style["color"], elinewidth=1, capsize=3, zorder=5)
    if task is not None and x == "params":  # the cycles of pruned runs (seed 0), dotted in their method's colour
        for r in ok:
            if r["task"] == task and len(r.get("cycles", [])) > 1 and r.get("seed", 0) == 0:
                head = r["params"]["head"] or 0
                cs = [c for c in r["cycles"] if c.get("test_acc") is not None]  # --test-every last: the end only
                xs = [c["trainable_params"] - head for c in cs]
                color = colors.get(line_key(r), "grey")
                ax.plot(xs, [100 * c["test_acc"] for c in cs], ":", color=color, alpha=0.5, linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel(
        "trainable parameters without head (log)"
        if x == "params"
        else "bytes of the task file, float32 as trained (log)"
    )
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(_short(task) if task else "mean over tasks")
    ax.grid(True, which="both", alpha=0.3)
    if by_label:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def plot_mimi_sizes(recs: list[dict], path: Path, method: str = "mimi") -> Path | None:
    """Final size of every pruned unit found by ``method`` (MiMi's adapter hidden sizes, or `mimi-lora`'s
    ranks), per task (one column each)."""
    unit = size_unit(method)
    what = "LoRA ranks" if unit == "rank" else "adapter sizes"
    mimi = [r for r in recs if r["status"] == "ok" and r.get("method") == method and r.get("layout")]
    if not mimi:
        return None
    # one run per task: the smallest budget of the first label, first seed
    first = {}
    for r in sorted(mimi, key=lambda r: (r["label"], r["seed"], r["params"]["adapter"])):
        first.setdefault(r["task"], r)
    runs = list(first.values())
    layout = runs[0]["layout"]
    grid, rows, _ = _block_grid([{"sizes": r["cycles"][-1]["sizes"], "cycle": 0} for r in runs], layout)
    sizes = {size_r(r) for r in runs}
    same = len(sizes) == 1 and len({r["label"] for r in runs}) == 1
    return save_size_grid(
        grid,
        rows,
        [_short(r["task"]) if same else f"{_short(r['task'])} ({variant(r)})" for r in runs],
        path,
        xlabel="task",
        col_width=0.8,
        rotate=True,
        unit=unit,
        title=f"{what} found by {variant(runs[0])}" if same else f"{what} found by {method}, smallest budget per task",
    )


def role_table(ok: list[dict], method: str) -> list[list[str]]:
    """Where ``method``'s pruning leaves its units (hidden neurons, or LoRA ranks), per budget: the mean over
    runs of the units kept in each role (``attn.qkv``, ``mlp.fc1``, ...; summed over blocks) and their share.
    Runs with the default ``mimi`` score and no distillation only, so that ablation runs do not mix in."""
    by_r: dict[int, list[dict]] = defaultdict(list)
    for r in ok:
        cfg = r.get("config", {})
        plain = cfg.get("score", "mimi") == "mimi" and not cfg.get("distill")
        if r.get("method") == method and r.get("layout") and plain and size_r(r):
            by_r[size_r(r)].append(r)
    if not by_r:
        return []
    roles = sorted({a["role"] for rs in by_r.values() for r in rs for a in r["layout"]})
    rows = [["budget r", "runs"] + roles + ["total"]]
    for rr in sorted(by_r, reverse=True):
        kept: dict[str, list[int]] = defaultdict(list)
        for r in by_r[rr]:
            role_of = {a["name"]: a["role"] for a in r["layout"]}
            sizes = r["cycles"][-1]["sizes"]
            for role in roles:
                kept[role].append(sum(v for k, v in sizes.items() if role_of.get(k) == role))
        means = {role: statistics.mean(kept[role]) for role in roles}
        total = sum(means.values())
        share = {role: 100 * m / total if total else 0.0 for role, m in means.items()}
        cells = [f"{means[role]:.1f} ({share[role]:.0f}%)" for role in roles]
        rows.append([str(rr), str(len(by_r[rr]))] + cells + [f"{total:.1f}"])
    return rows


def write_report(
    results: str | Path | Sequence[str | Path],
    *,
    out: str | Path | None = None,
    against: Sequence[str] = (),
    context: Sequence[str | Path | Context] = (),
) -> Path:
    """Render ``report.md``, ``report.html`` and PNG plots from the JSONs in ``results`` (one folder, or several
    merged: a run found twice is reported once). The report goes to ``out`` (default: the first folder's
    ``report/``). Every method is paired with MiMi at its budget, and also with each label in ``against``.
    ``context``: other folders' runs (``FOLDER`` or ``FOLDER:LABEL,LABEL``, see :class:`Context`) drawn in grey
    on the Pareto plots and listed in a table of their own, for scale; they enter no pairing."""
    folders = [Path(results)] if isinstance(results, str | Path) else [Path(r) for r in results]
    for folder in folders:
        if not folder.is_dir():
            raise ConfigError(f"{folder}: no such folder; give the results folder of a bench spec")
    out = Path(out) if out is not None else folders[0] / "report"
    recs = load_results(folders)
    if not recs:
        raise ConfigError(
            f"{', '.join(map(str, folders))}: no result JSON of `mimi bench` here; give the folder a spec's "
            "`results:` names (e.g. benchmarks/results/minivtab)"
        )
    ok = [r for r in recs if r["status"] == "ok"]
    labels = sorted({r.get("label", "?") for r in ok})
    for a in against:  # a typo would silently give an empty section: refuse it before anything is written
        if a not in labels:
            raise ConfigError(f"--against {a!r}: no finished run has that label; the labels here: {', '.join(labels)}")
    failed = [r for r in recs if r["status"] != "ok"]
    groups = _groups(recs)
    tasks = {r["task"] for r in ok}
    ctx = [r for c in context for r in (c if isinstance(c, Context) else Context.parse(c)).load(tasks)]
    agg = aggregate(ok)
    plots = [plot_pareto(ok, None, out / "pareto_mean.png", context=ctx)] if ok else []
    if any("run_id" in r for r in ok):  # runs of several budgets (kilobyte tasks): bytes are the other axis
        plots.append(plot_pareto(ok, None, out / "pareto_mean_bytes.png", x="bytes", context=ctx))
    for ts in groups.values():
        for t in ts:
            plots.append(plot_pareto(ok, t, out / f"pareto_{_short(t)}.png", context=ctx))
    sizes = plot_mimi_sizes(ok, out / "mimi_sizes.png")
    ranks = plot_mimi_sizes(ok, out / "mimi_lora_ranks.png", method="mimi-lora")
    roles = {m: role_table(ok, m) for m in ("mimi", "mimi-lora")}
    forest = plot_paired(ok, out / "paired_vs_mimi.png")
    table, gtable = main_table(agg, groups), group_table(agg, groups)
    ctable = context_table(ctx, groups) if ctx else []
    btable, ptable, atable = budget_table(ok), paired_table(ok), ablation_table(ok)
    wall = wall_seconds(recs)
    n_multi = any("run_id" in r for r in ok)
    lines = [
        "# Benchmark report",
        "",
        f"{len(ok)} runs ok"
        + (
            f" ({len({r.get('run_id', r['id']) for r in ok})} trained: one run keeps several budgets)"
            if n_multi
            else ""
        )
        + f", {len(failed)} failed; {len(groups)} groups, "
        f"{sum(len(t) for t in groups.values())} tasks; total wall time {wall / 3600:.2f} h. "
        "Test top-1 accuracy (%) of each run's final model (test is never used to select anything), mean over "
        "seeds, with ± its standard error and (the number of seeds) where there are two or more; "
        "params = trainable parameters without the classifier head, mean over tasks.",
        "",
        "## Per task",
        "",
        _md(table),
        "",
        "## Per group",
        "",
        _md(gtable),
        "",
    ]
    if ctable:
        lines += [
            "## Context: runs of other folders",
            "",
            "For scale, not compared: runs of " + ", ".join(sorted({f"`{r['context']}`" for r in ctx})) + " on "
            "these tasks (the folder in brackets), drawn in grey on the plots; a mean only where every task ran.",
            "",
            _md(ctable),
            "",
        ]
    if len(btable) > 1:
        lines += [
            "## At the same budget",
            "",
            "Methods sized by the same budget r (the parameter count of uniform adapters of hidden size r). "
            "Each method is compared with MiMi on the tasks both ran: its mean test accuracy, MiMi's on those "
            "tasks, the mean gap, and the number of tasks where the method is above / below MiMi.",
            "",
            _md(btable),
            "",
        ]
    if len(ptable) > 1:
        lines += [
            "## Against MiMi at the same budget, paired by seed",
            "",
            "Each method minus MiMi (test accuracy, points) at the same budget r, over the (task, seed) pairs "
            "both ran (a task with more seeds weighs more): the mean difference, its 95% percentile bootstrap "
            "interval (10,000 resamples of the pairs, fixed seed), and the tasks where the method's mean over "
            "those seeds is above / below MiMi's. An interval holding 0 is not separable at that many seeds; "
            f"fewer than {MIN_PAIRS} pairs get no verdict (a handful that agree in sign always exclude 0). "
            "The pairs' interval treats a task's seeds as independent of each other; *tasks resampled* is the "
            "two-stage bootstrap (tasks with replacement, then each drawn task's seeds), the wider interval to "
            "read when asking whether the gap carries over to another task.",
            "",
            _md(ptable),
            "",
        ] + ([f"![paired differences to MiMi]({forest.name})", ""] if forest else [])
    kb = param_budget_table(ok)
    if len(kb) > 1:
        lines += [
            "## At parameter budgets, paired by seed",
            "",
            "Runs sized by one `--budget-params` (MiMi's kilobyte budgets, below a uniform adapter of one neuron; "
            "a run of several budgets gives one point per budget). Each method minus MiMi at the same budget, "
            "paired by (task, seed): the mean difference, its 95% bootstrap interval (pairs resampled, then tasks resampled) and the verdict rules of the r-budget tables.",
            "",
            _md(kb),
            "",
        ]
    extra = {a: paired_table(ok, against=a) for a in against}
    for a, rows in extra.items():
        lines += [f"## Against {a} at the same budget, paired by seed", ""]
        lines += [_md(rows), ""] if len(rows) > 1 else [f"No budget where `{a}` and another method both ran.", ""]
    if atable:
        lines += [
            "## MiMi ablation: neuron scores and one-shot pruning",
            "",
            "The same schedule with each neuron score, and one cut straight to the budget (one-shot), at every "
            "budget where they ran: each against the default `mimi` score over the (task, seed) pairs both ran, "
            "with a 95% bootstrap interval as above (for `mimi` itself: all its runs).",
            "",
            _md(atable),
            "",
        ]
    lines += [
        "## Accuracy vs trainable parameters",
        "",
    ] + [f"![{p.stem}]({p.name})" for p in plots]
    if sizes:
        lines += ["", "## Hidden sizes found by MiMi", "", f"![mimi sizes]({sizes.name})"]
    if ranks:
        lines += ["", "## LoRA ranks found by `mimi-lora`", "", f"![mimi-lora ranks]({ranks.name})"]
    if any(roles.values()):
        lines += [
            "",
            "## Where the pruning leaves its units",
            "",
            "Units kept at the end (hidden neurons of MiMi's adapters, rank-1 components of `mimi-lora`), summed "
            "over blocks per role and averaged over runs (tasks and seeds; default score only), with each role's "
            "share. One unit costs a role's in + out features, so a share of units is not a share of parameters.",
        ]
        for m, rows in roles.items():
            if rows:
                lines += ["", f"`{m}`:", "", _md(rows)]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- `{r['id']}`: {r.get('error', '?')}" for r in failed]
    md = atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    body = (
        f"<h1>Benchmark report</h1><p>{html.escape(lines[2])}</p><h2>Per task</h2>{_html(table)}"
        f"<h2>Per group</h2>{_html(gtable)}"
        + (f"<h2>Context: runs of other folders</h2>{_html(ctable)}" if ctable else "")
        + (f"<h2>At the same budget</h2>{_html(btable)}" if len(btable) > 1 else "")
        + (f"<h2>Against MiMi at the same budget, paired by seed</h2>{_html(ptable)}" if len(ptable) > 1 else "")
        + (f"<h2>At parameter budgets, paired by seed</h2>{_html(kb)}" if len(kb) > 1 else "")
        + "".join(f"<h2>Against {html.escape(a)}, paired by seed</h2>{_html(rows)}" for a, rows in extra.items())
        + (f"<h2>MiMi ablation</h2>{_html(atable)}" if atable else "")
        + "".join(f"<h2>Where {m} leaves its units</h2>{_html(rows)}" for m, rows in roles.items() if rows)
        + "<h2>Plots</h2>"
        + "".join(
            f'<img src="{p.name}" style="max-width:48%">'
            for p in ([forest] if forest else []) + plots + [x for x in (sizes, ranks) if x]
        )
    )
    style = "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}</style>"
    atomic_write_text(
        out / "report.html",
        f"<!doctype html><html><head><meta charset='utf-8'>{style}</head><body>{body}</body></html>\n",
    )
    return md
