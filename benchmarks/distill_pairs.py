"""Does distillation help? The README's tables of issue 24, from the committed MiniVTAB JSONs (nothing is trained).

For r=3 and r=12: one row per task (test %, mean over the seeds both sides of every comparison have), then each
comparison the issue asks about, paired by (task, seed): the mean difference in points, its 95% interval with
the pairs resampled and with tasks resampled (then seeds within a task), tasks above / below, and the verdict,
all by ``mimi report``'s own pairing (no "ahead" under 6 pairs; an "ahead" that does not hold with tasks resampled
says so).

    python benchmarks/distill_pairs.py                 # markdown on stdout
    python benchmarks/distill_pairs.py --json out.json # and the numbers as JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mimi.reporting.bench_report import compare_pairs, load_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "minivtab"

# (column, label, budget_dim or None) per budget: what each side of a comparison is
ARMS = {
    3: {
        "MiMi": ("mimi", 3),
        "MiMi --distill": ("mimi-distill", 3),
        "adapter, 23 epochs": ("adapter-equal-epochs-r3", None),
        "same, distilled": ("adapter-equal-epochs-distill-r3", None),
        "PEFT LoRA": ("peft-lora", 3),
    },
    12: {
        "MiMi": ("mimi", 12),
        "MiMi --distill": ("mimi-distill", 12),
        "adapter, 17 epochs": ("adapter-equal-epochs", None),
        "same, distilled": ("adapter-equal-epochs-distill", None),
        "PEFT LoRA": ("peft-lora", 12),
    },
}
COMPARISONS = [  # (name, minuend column, subtrahend column)
    ("distill - MiMi", "MiMi --distill", "MiMi"),
    ("distill - distilled adapter", "MiMi --distill", "same, distilled"),
    ("distilled adapter - adapter", "same, distilled", 2),  # 2: the budget's plain equal-epoch adapter column
    ("distill - adapter", "MiMi --distill", 2),
    ("distill - PEFT LoRA", "MiMi --distill", "PEFT LoRA"),
]


def accuracies(records: list[dict], label: str, budget: int | None) -> dict[tuple[str, int], float]:
    """(task, seed) -> test % of the finished runs with this label (and budget_dim, where given)."""
    out = {}
    for r in records:
        if r.get("label") != label or r.get("status", "ok") != "ok":
            continue
        if budget is not None and r.get("config", {}).get("budget_dim") != budget:
            continue
        out[(r["task"].split(":")[-1], int(r.get("seed", 0)))] = 100 * r["test_acc"]
    return out


def compare(a: dict, b: dict, names: tuple[str, str]) -> dict | None:
    """``a - b`` by the report's own pairing and verdict (:func:`mimi.reporting.bench_report.compare_pairs`)."""
    c = compare_pairs(0, names[0], a, b, seed=0, ref_name=names[1])
    if c is None:
        return None
    d = c.diff
    return {
        "pairs": d.n,
        "tasks": len({t for t, _ in set(a) & set(b)}),
        "seeds": c.n_seeds,
        "mean": d.mean,
        "pairs_interval": [d.low, d.high] if d.n > 1 else None,
        "tasks_interval": list(c.across_tasks) if c.across_tasks else None,
        "above": c.above,
        "below": c.below,
        "verdict": c.verdict,
    }


def _iv(iv: list[float] | None) -> str:
    return "–" if iv is None else f"[{iv[0]:+.2f}, {iv[1]:+.2f}]"


def budget_tables(records: list[dict], r: int) -> tuple[str, dict]:
    arms = {col: accuracies(records, label, b) for col, (label, b) in ARMS[r].items()}
    cols = list(arms)
    lead = arms["MiMi --distill"]
    if not lead:
        return "", {}
    tasks = sorted({t for t, _ in lead})
    lines = [
        f"| task (r={r}) | seeds | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for t in tasks:
        seeds = sorted(s for tt, s in lead if tt == t)
        cells = []
        for c in cols:
            vals = [arms[c][(t, s)] for s in seeds if (t, s) in arms[c]]
            cells.append(f"{statistics.mean(vals):.2f}" if len(vals) == len(seeds) else "–")
        lines.append(f"| {t} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    rows = [
        f"| comparison (r={r}) | pairs (tasks x seeds) | mean | 95% pairs resampled | 95% tasks resampled | "
        "tasks above/below | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    numbers = {}
    for name, x, y in COMPARISONS:
        y = cols[y] if isinstance(y, int) else y
        c = compare(arms[x], arms[y], (x, y))
        if c is None:
            continue
        numbers[name] = c
        rows.append(
            f"| {name} | {c['pairs']} ({c['tasks']} x {c['seeds']}) | {c['mean']:+.2f} | {_iv(c['pairs_interval'])} | "
            f"{_iv(c['tasks_interval'])} | {c['above']}/{c['below']} | {c['verdict']} |"
        )
    return table + "\n\n" + "\n".join(rows), numbers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--json", type=Path, help="also write the comparisons as JSON here")
    args = p.parse_args()
    records = load_results(args.results)
    out = {}
    for r in ARMS:
        md, numbers = budget_tables(records, r)
        if md:
            print(md + "\n")
            out[f"r{r}"] = numbers
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
