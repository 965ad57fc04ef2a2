"""Tables and plots of one run, made from its summary alone."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mimi.core.files import atomic_write, atomic_write_text  # noqa: E402


def human(n: float) -> str:
    """12_345 -> '12.3k'."""
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.{1 if abs(n) < 100 * div else 0}f}{unit}"
    return f"{n:.0f}"


def sizes_text(sizes: dict[str, int], layout: list[dict], limit: int = 60) -> str:
    """Hidden sizes in model order, '-' for removed adapters: e.g. '12 7 - 3 ...'."""
    text = " ".join(str(sizes.get(a["name"], "-")) for a in layout) if layout else " ".join(map(str, sizes.values()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cycle_table(summary: list[dict], layout: list[dict] | None = None) -> str:
    """Markdown table: one row per cycle."""
    rows = [
        "| cycle | adapter params | trainable params | % of backbone | val acc | test acc | adapters alive | hidden sizes |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e in summary:
        alive = f"{len(e['sizes'])}/{len(layout)}" if layout else str(len(e["sizes"]))
        rows.append(
            f"| {e['cycle']} | {e['adapter_params']:,} | {e['trainable_params']:,} | {e['pct_of_backbone']:.3f} | "
            f"{100 * e['val_acc']:.2f} | {_pct(e['test_acc'])} | {alive} | {sizes_text(e['sizes'], layout or [])} |"
        )
    return "\n".join(rows)


def budget_table(summary: list[dict]) -> str | None:
    """Markdown table of the tasks a run of several budgets kept (``budgets/B.safetensors``); None for other runs."""
    kept = [e for e in summary if "budget" in e]
    if not kept:
        return None
    rows = [
        "| budget | adapter params | cycle | epochs so far | val acc | test acc | task file |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e in kept:
        epochs = sum(c["epochs"] for c in summary if c["cycle"] <= e["cycle"])
        rows.append(
            f"| {e['budget']:,} | {e['adapter_params']:,} | {e['cycle']} | {epochs} | {100 * e['val_acc']:.2f} | "
            f"{_pct(e['test_acc'])} | `budgets/{e['budget']}.safetensors` |"
        )
    return "\n".join(rows)


def _pct(acc: float | None) -> str:
    """An accuracy in percent, or '—' for a split not evaluated (``--test-every last``)."""
    return "—" if acc is None else f"{100 * acc:.2f}"


def _block_grid(summary: list[dict], layout: list[dict]) -> tuple[np.ndarray, list[str], list[str]]:
    """Hidden size per (adapter slot, cycle); slots ordered as in the model, labelled 'block/role'."""
    labels = []
    for a in layout:
        m = re.search(r"(?:^|\.)(?:blocks|layers?)\.(\d+)(?:\.blocks\.(\d+))?", a["name"])
        block = ".".join(g for g in (m.groups() if m else ()) if g is not None) or a["name"]
        labels.append(f"{block}/{a['role']}")
    grid = np.array([[e["sizes"].get(a["name"], 0) for e in summary] for a in layout], dtype=float)
    return grid, labels, [str(e["cycle"]) for e in summary]


def plot_accuracy_vs_params(summary: list[dict], path: Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, label, style in (("val_acc", "validation", "o--"), ("test_acc", "test", "s-")):
        pts = [(e["trainable_params"], 100 * e[key]) for e in summary if e[key] is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    for e in summary:
        ax.annotate(
            f"c{e['cycle']}",
            (e["trainable_params"], 100 * (e["val_acc"] if e["test_acc"] is None else e["test_acc"])),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (adapters + head), log scale")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "accuracy over the MiMi cycles")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def save_size_grid(
    grid: np.ndarray,
    rows: list[str],
    cols: list[str],
    path: Path,
    *,
    title: str,
    xlabel: str,
    col_width: float = 0.55,
    rotate: bool = False,
    unit: str = "hidden size",
) -> Path:
    """Heat map of hidden sizes, or of LoRA ranks with ``unit="rank"`` (rows: adapter slots, columns: cycles or
    tasks), removed adapters marked x."""
    fig, ax = plt.subplots(figsize=(1.5 + col_width * len(cols), 1.2 + 0.22 * len(rows)), dpi=120)
    im = ax.imshow(np.where(grid > 0, grid, np.nan), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=45 if rotate else 0, ha="right" if rotate else "center", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("block / branch")
    top = grid.max() if grid.size else 0
    for (i, j), v in np.ndenumerate(grid):
        # dark text on the bright (large) end of viridis, white on the dark end, red x where removed
        color = "red" if v == 0 else ("black" if v > 0.6 * top else "white")
        ax.text(j, i, "x" if v == 0 else f"{int(v)}", ha="center", va="center", fontsize=5, color=color)
    fig.colorbar(im, ax=ax, label=f"{unit} (x: removed)")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def plot_sizes_heatmap(
    summary: list[dict], layout: list[dict], path: Path, title: str = "", unit: str = "hidden size"
) -> Path:
    grid, rows, cols = _block_grid(summary, layout)
    title = title or f"{unit} per adapter and cycle"
    return save_size_grid(grid, rows, cols, path, title=title, xlabel="cycle", unit=unit)


def size_unit(method: str | None) -> str:
    """What ``method``'s units are called ("hidden size", "rank"), from its traits; "hidden size" for a name not
    registered here (a run folder of a plugin method that is not installed)."""
    from mimi.methods import method_traits  # loads torch: only when a report has sizes to plot

    traits = method_traits(method)
    return traits.size_unit if traits is not None else "hidden size"


def write_run_report(out: Path, summary: list[dict], info: dict[str, Any]) -> Path:
    """plots/accuracy_vs_params.png, plots/sizes_heatmap.png and report.md for one run."""
    out = Path(out)
    layout = info.get("layout", [])
    title = f"{info.get('data', '')} · {info.get('model', '')}"
    plot_accuracy_vs_params(summary, out / "plots" / "accuracy_vs_params.png", title)
    if layout:
        unit = size_unit(info.get("method"))
        plot_sizes_heatmap(summary, layout, out / "plots" / "sizes_heatmap.png", title, unit=unit)
    final = summary[-1]
    lines = [
        f"# {title}",
        "",
        f"Backbone `{info.get('model')}` (weights: {info.get('weights_source')}, {human(info.get('backbone_params', 0))} "
        f"parameters) at {info.get('img_size')} px; {info.get('n_train')} train / {info.get('n_val')} val / "
        f"{info.get('n_test')} test images, {info.get('num_classes')} classes.",
        "",
        (
            f"Final (last cycle): **{100 * final['test_acc']:.2f}% test**, "
            if final["test_acc"] is not None
            else f"Cycle {final['cycle']} so far (test is evaluated after the last cycle only): "
        )
        + f"{100 * final['val_acc']:.2f}% validation, with "
        f"{final['trainable_params']:,} trained parameters ({final['pct_of_backbone']:.3f}% of the backbone).",
        "",
        cycle_table(summary, layout),
        "",
    ]
    kept = budget_table(summary)
    if kept is not None:
        lines += ["Tasks kept at each budget (`mimi export RUN --budget N`):", "", kept, ""]
    lines += ["![accuracy vs parameters](plots/accuracy_vs_params.png)"]
    if layout:
        lines += ["", "![hidden sizes](plots/sizes_heatmap.png)"]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
