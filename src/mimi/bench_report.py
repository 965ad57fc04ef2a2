"""The benchmark report, made from the run JSONs alone: tables per task and group, Pareto and size plots."""

from __future__ import annotations

import html
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .io_utils import atomic_write, atomic_write_text  # noqa: E402
from .report import _block_grid, human, save_size_grid  # noqa: E402

GROUP_ORDER = ("natural", "specialized", "structured")


def load_results(results: Path) -> list[dict[str, Any]]:
    recs = []
    for p in sorted(Path(results).glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "id" in rec and "status" in rec:
            recs.append(rec)
    return recs


def variant(rec: dict) -> str:
    """Method label plus its swept values, e.g. 'mimi budgetdim=8'."""
    grid = " ".join(f"{k.replace('_', '')}={v}" for k, v in rec.get("grid", {}).items())
    return f"{rec['label']} {grid}".strip()


def _short(task: str) -> str:
    return task.split(":")[-1]


def _groups(recs: list[dict]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for r in recs:
        if r["task"] not in groups[r["group"]]:
            groups[r["group"]].append(r["task"])
    order = [g for g in GROUP_ORDER if g in groups] + sorted(g for g in groups if g not in GROUP_ORDER)
    return {g: groups[g] for g in order}


def aggregate(recs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """variant -> task -> {acc, std, params, n}: mean over seeds of the final test accuracy."""
    cells: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        if r["status"] == "ok":
            cells[variant(r)][r["task"]].append(r)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for v, tasks in cells.items():
        out[v] = {}
        for t, rs in tasks.items():
            accs = [100 * r["test_acc"] for r in rs]
            params = [r["params"]["trainable_without_head"] or r["params"]["trainable"] for r in rs]
            out[v][t] = {
                "acc": statistics.mean(accs),
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


def _fmt(cell: dict | None) -> str:
    if cell is None:
        return "–"
    return f"{cell['acc']:.1f}" + (f" ±{cell['std']:.1f}" if cell["n"] > 1 else "")


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


def group_table(agg: dict, groups: dict[str, list[str]]) -> list[list[str]]:
    rows = [["method"] + list(groups)]
    for v in sorted(agg):
        row = [v]
        for ts in groups.values():
            accs = [agg[v][t]["acc"] for t in ts if t in agg[v]]
            row.append(f"{statistics.mean(accs):.2f}" if len(accs) == len(ts) else "–")
        rows.append(row)
    return rows


def _md(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def _html(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def plot_pareto(recs: list[dict], task: str | None, path: Path) -> Path:
    """Accuracy vs trainable parameters (log x): one line per method label; MiMi cycles dotted."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ok = [r for r in recs if r["status"] == "ok"]
    by_label: dict[str, list[tuple[float, float]]] = defaultdict(list)
    if task is not None:
        for r in ok:
            if r["task"] == task:
                by_label[r["label"]].append(
                    (r["params"]["trainable_without_head"] or r["params"]["trainable"], 100 * r["test_acc"])
                )
    else:  # mean over tasks, only for variants that ran on every task
        agg = aggregate(ok)
        n_tasks = len({r["task"] for r in ok})
        for v, cells in agg.items():
            if len(cells) == n_tasks:
                label = next(r["label"] for r in ok if variant(r) == v)
                by_label[label].append(
                    (
                        statistics.mean(c["params"] for c in cells.values()),
                        statistics.mean(c["acc"] for c in cells.values()),
                    )
                )
    for i, (label, pts) in enumerate(sorted(by_label.items())):
        pts.sort()
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="os^vD<>ph*"[i % 10], linestyle="-" if len(pts) > 1 else "none", label=label)
    if task is not None:
        for r in ok:
            if r["task"] == task and len(r.get("cycles", [])) > 1:
                head = r["params"]["head"] or 0
                xs = [c["trainable_params"] - head for c in r["cycles"]]
                ax.plot(xs, [100 * c["test_acc"] for c in r["cycles"]], ":", color="grey", alpha=0.6, linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters without head (log)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(_short(task) if task else "mean over tasks")
    ax.grid(True, which="both", alpha=0.3)
    if by_label:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def plot_mimi_sizes(recs: list[dict], path: Path) -> Path | None:
    """Final hidden size of every adapter found by MiMi, per task (one column each)."""
    mimi = [r for r in recs if r["status"] == "ok" and r.get("method", "").startswith("mimi") and r.get("layout")]
    if not mimi:
        return None
    # one run per task: the smallest budget of the first label, first seed
    first = {}
    for r in sorted(mimi, key=lambda r: (r["label"], r["params"]["adapter"], r["seed"])):
        first.setdefault(r["task"], r)
    runs = list(first.values())
    layout = runs[0]["layout"]
    grid, rows, _ = _block_grid([{"sizes": r["cycles"][-1]["sizes"], "cycle": 0} for r in runs], layout)
    return save_size_grid(
        grid,
        rows,
        [_short(r["task"]) for r in runs],
        path,
        xlabel="task",
        col_width=0.8,
        rotate=True,
        title=f"adapter sizes found by {runs[0]['label']} ({variant(runs[0])})",
    )


def write_report(results: str | Path, *, out: str | Path | None = None) -> Path:
    """Render ``report.md``, ``report.html`` and PNG plots from the JSONs in ``results``."""
    results = Path(results)
    out = Path(out) if out is not None else results / "report"
    recs = load_results(results)
    ok = [r for r in recs if r["status"] == "ok"]
    failed = [r for r in recs if r["status"] != "ok"]
    groups = _groups(recs)
    agg = aggregate(ok)
    plots = [plot_pareto(ok, None, out / "pareto_mean.png")] if ok else []
    for ts in groups.values():
        for t in ts:
            plots.append(plot_pareto(ok, t, out / f"pareto_{_short(t)}.png"))
    sizes = plot_mimi_sizes(ok, out / "mimi_sizes.png")
    table, gtable = main_table(agg, groups), group_table(agg, groups)
    wall = sum(r.get("wall_seconds", 0) for r in recs)
    lines = [
        "# Benchmark report",
        "",
        f"{len(ok)} runs ok, {len(failed)} failed; {len(groups)} groups, "
        f"{sum(len(t) for t in groups.values())} tasks; total wall time {wall / 3600:.2f} h. "
        "Test top-1 accuracy (%) of each run's final model (test is never used to select anything); "
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
        "## Accuracy vs trainable parameters",
        "",
    ] + [f"![{p.stem}]({p.name})" for p in plots]
    if sizes:
        lines += ["", "## Hidden sizes found by MiMi", "", f"![mimi sizes]({sizes.name})"]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- `{r['id']}`: {r.get('error', '?')}" for r in failed]
    md = atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    body = (
        f"<h1>Benchmark report</h1><p>{html.escape(lines[2])}</p><h2>Per task</h2>{_html(table)}"
        f"<h2>Per group</h2>{_html(gtable)}<h2>Plots</h2>"
        + "".join(f'<img src="{p.name}" style="max-width:48%">' for p in plots + ([sizes] if sizes else []))
    )
    style = "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}</style>"
    atomic_write_text(
        out / "report.html",
        f"<!doctype html><html><head><meta charset='utf-8'>{style}</head><body>{body}</body></html>\n",
    )
    return md
