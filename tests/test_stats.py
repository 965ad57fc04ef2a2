"""Statistics over seeds (mimi.reporting.stats) against hand-computed values, and their sections in `mimi report`."""

import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from mimi.cli import main
from mimi.reporting.bench_report import _mean_points, _task_points, fmt_mean_se, paired_table, write_report
from mimi.reporting.stats import (
    MeanSE,
    bootstrap_mean_interval,
    clustered_bootstrap_interval,
    mean_se,
    paired_difference,
)


def test_mean_se_matches_hand_computed_values():
    s = mean_se([1, 2, 3])
    assert s.mean == 2 and s.n == 3
    assert s.se == pytest.approx(1 / math.sqrt(3)) and s.se == pytest.approx(0.57735, abs=1e-5)
    assert mean_se([70, 70, 73]).se == pytest.approx(1.0)  # sample var (1 + 1 + 4) / 2 = 3, / 3 = 1
    one = mean_se([85.1])
    assert (one.mean, one.se, one.n) == (85.1, None, 1)
    with pytest.raises(ValueError):
        mean_se([])


def test_bootstrap_interval_of_identical_values_is_the_value():
    assert bootstrap_mean_interval([2, 2, 2]) == (2.0, 2.0)
    # 0.1 is not exact in binary: the mean of three copies may round off it, the interval must not
    assert bootstrap_mean_interval([0.1, 0.1, 0.1]) == (0.1, 0.1)


def test_bootstrap_interval_hand_computed_and_symmetric_case():
    # resample means of [0, 1] are 0, 0.5, 1 with probability 1/4, 1/2, 1/4: the 2.5% and 97.5% quantiles are 0, 1
    assert bootstrap_mean_interval([0, 1]) == (0.0, 1.0)
    low, high = bootstrap_mean_interval([-3, -2, -1, 1, 2, 3])
    assert low < 0 < high and low == pytest.approx(-high, abs=0.25)
    # a narrower coverage gives a nested interval
    low80, high80 = bootstrap_mean_interval([-3, -2, -1, 1, 2, 3], confidence=0.8)
    assert low <= low80 < high80 <= high
    with pytest.raises(ValueError):
        bootstrap_mean_interval([1, 2], confidence=1.0)


def test_bootstrap_is_deterministic_with_its_seed():
    values = np.random.default_rng(123).normal(size=20).tolist()
    assert bootstrap_mean_interval(values) == bootstrap_mean_interval(values)
    assert bootstrap_mean_interval(values, seed=1) != bootstrap_mean_interval(values, seed=2)


def test_clustered_bootstrap_hand_computed_cases():
    # two groups of one value: the plain bootstrap of [0, 10] (0, 5, 10 with 1/4, 1/2, 1/4)
    assert clustered_bootstrap_interval([[0], [10]]) == (0.0, 10.0)
    # three tasks whose seeds agree: resampling 3 tasks gives means of 3 draws from {1, 2, -1}; the 2.5% and
    # 97.5% quantiles are -1 (all three -1: 1/27 > 2.5%) and 2 (all three 2: 1/27)
    assert clustered_bootstrap_interval([[1, 1, 1], [2, 2, 2], [-1, -1, -1]]) == (-1.0, 2.0)
    assert clustered_bootstrap_interval([[2, 2], [2]]) == (2.0, 2.0)  # uneven groups, all one value
    with pytest.raises(ValueError):
        clustered_bootstrap_interval([])
    with pytest.raises(ValueError):
        clustered_bootstrap_interval([[1.0], []])
    with pytest.raises(ValueError):
        clustered_bootstrap_interval([[1.0], [2.0]], confidence=0.0)


def test_clustered_bootstrap_invariants():
    rng = np.random.default_rng(7)
    singles = rng.normal(size=12)
    # one value per group: exactly the plain bootstrap (the same draws of the same generator)
    assert clustered_bootstrap_interval([[v] for v in singles]) == bootstrap_mean_interval(singles)
    # seeds that share their task's effect: pairs treated as independent understate the spread across tasks
    effects = rng.normal(scale=2.0, size=6)
    groups = [(e + rng.normal(scale=0.1, size=3)).tolist() for e in effects]
    flat = [v for g in groups for v in g]
    c_low, c_high = clustered_bootstrap_interval(groups)
    p_low, p_high = bootstrap_mean_interval(flat)
    assert c_low < p_low and p_high < c_high and c_low <= float(np.mean(flat)) <= c_high
    assert clustered_bootstrap_interval(groups, seed=3) == clustered_bootstrap_interval(groups, seed=3)


def test_paired_difference():
    d = paired_difference([3, 4, 5], [1, 2, 3])
    assert (d.mean, d.low, d.high, d.n) == (2.0, 2.0, 2.0, 3) and not d.holds(0) and d.holds(2)
    with pytest.raises(ValueError):
        paired_difference([1, 2], [1])


def test_fmt_mean_se():
    assert fmt_mean_se(MeanSE(85.1, None, 1)) == "85.10"
    assert fmt_mean_se(MeanSE(85.1, 0.3214, 3)) == "85.10 ± 0.32 (3)"


def _rec(task, label, method, seed, acc, size=None, cycles=None, **cfg):
    """A run JSON as `mimi bench` writes it (the fields the report reads), at 1000 trainable parameters."""
    grid = {k: v for k, v in cfg.items() if k in ("budget_dim", "adapter_dim")}
    suffix = "".join(f"__{k.replace('_', '')}{v}" for k, v in grid.items())
    final = {"cycle": 0, "val_acc": acc, "test_acc": acc, "trainable_params": 1010, "adapter_params": 1000}
    return {
        "id": f"{task}__{label}{suffix}__s{seed}",
        "task": f"vtab1k:{task}",
        "group": "natural" if task == "a" else "structured",
        "method": method,
        "label": label,
        "grid": grid,
        "seed": seed,
        "config": {"method": method, "seed": seed, **cfg},
        "status": "ok",
        "params": {"trainable": 1010, "trainable_without_head": 1000, "adapter": 1000, "head": 10},
        "budget": size if "budget_dim" in cfg else None,
        "val_acc": acc,
        "test_acc": acc,
        "cycles": cycles or [final],
        "wall_seconds": 1.0,
    }


# test accuracy (%) per task and seed 0, 1, 2; chosen so that every statistic below is computed by hand
ACCS = {
    "mimi": {"a": [80, 82, 84], "b": [70, 70, 73]},
    "adapter": {"a": [81.5, 83.5, 85.5], "b": [69.5, 69.5, 72.5]},  # +1.5 on a, -0.5 on b: not separable
    "lora": {"a": [82, 84, 86], "b": [72, 72, 75]},  # +2 on every pair: ahead
}
KNOB = {"mimi": {"budget_dim": 4}, "adapter": {"adapter_dim": 4}, "lora": {"budget_dim": 4}}


def _write_runs(folder):
    folder.mkdir()
    recs = [
        _rec(task, label, label, seed, acc / 100, size=1000, **KNOB[label])
        for label, tasks in ACCS.items()
        for task, accs in tasks.items()
        for seed, acc in enumerate(accs)
    ]
    recs += [_rec(task, "bitfit", "bitfit", 0, acc) for task, acc in (("a", 0.77), ("b", 0.66))]  # one seed
    for r in recs:
        (folder / f"{r['id']}.json").write_text(json.dumps(r))
    return recs


def test_report_shows_mean_se_over_seeds_and_paired_differences(tmp_path):
    _write_runs(tmp_path / "results")
    md = write_report(tmp_path / "results", out=tmp_path / "report").read_text()
    per_task = md.split("## Per task")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0]: line for line in per_task.splitlines() if line.startswith("| ")}
    # a: mean 82, sample std 2, SE 2 / sqrt(3) = 1.15; b: mean 71, sample std sqrt(3), SE 1
    assert "| 82.00 ± 1.15 (3) | 71.00 ± 1.00 (3) |" in rows["| mimi budgetdim=4"]
    assert "| 83.50 ± 1.15 (3) | 70.50 ± 1.00 (3) |" in rows["| adapter adapterdim=4"]
    assert "| 77.00 | 66.00 |" in rows["| bitfit"]  # one seed: the value alone

    paired = md.split("## Against MiMi at the same budget, paired by seed")[1].split("\n## ")[0]
    # adapter - mimi: +1.5 on the 3 pairs of a, -0.5 on the 3 of b, mean +0.50. Resampling the 6 pairs,
    # k of them from a, gives a mean of (2k - 3) / 6 with k ~ Binomial(6, 1/2): P(k <= 0) = 1/64 < 2.5% <
    # P(k <= 1) = 7/64, so the interval runs from k = 1 to k = 5: [-1/6, +7/6]
    # tasks resampled: each task's seeds give the same difference, so only the draw of tasks matters: both a
    # (1/4) +1.5, one of each (1/2) +0.5, both b (1/4) -0.5, and the 95% interval is [-0.5, +1.5]
    assert (
        "| 4 | adapter | 6 (3) | +0.50 | [-0.17, +1.17] | [-0.50, +1.50] | 1/1 | not separable at 3 seeds |" in paired
    )
    assert "| 4 | lora | 6 (3) | +2.00 | [+2.00, +2.00] | [+2.00, +2.00] | 2/0 | lora ahead |" in paired
    assert "bitfit" not in paired and "| 4 | mimi " not in paired
    assert (tmp_path / "report" / "pareto_mean.png").is_file()
    assert "paired by seed" in (tmp_path / "report" / "report.html").read_text()
    assert "![paired differences to MiMi](paired_vs_mimi.png)" in paired
    assert (tmp_path / "report" / "paired_vs_mimi.png").stat().st_size > 1000


def test_pairing_against_another_method(tmp_path, capsys):
    recs = _write_runs(tmp_path / "results")
    rows = paired_table(recs, against="adapter")
    assert rows[0][3] == "method − adapter"
    # mimi - adapter is minus the adapter - mimi above: -0.50 in [-7/6, +1/6]
    # lora - adapter: +0.5 on every pair of a, +2.5 on every pair of b; tasks resampled: [+0.5, +2.5]
    assert rows[1] == ["4", "lora", "6 (3)", "+1.50", "[+0.83, +2.17]", "[+0.50, +2.50]", "2/0", "lora ahead"]
    mimi_row = ["4", "mimi", "6 (3)", "-0.50", "[-1.17, +0.17]", "[-1.50, +0.50]", "1/1", "not separable at 3 seeds"]
    assert rows[2] == mimi_row
    assert len(paired_table(recs, against="nobody")) == 1  # the header alone
    # from the command line a label no run has is a typo: one line naming the labels there, nothing written
    assert main(["report", str(tmp_path / "results"), "--out", str(tmp_path / "typo"), "--against", "adaptor"]) == 2
    assert (
        "'adaptor': no finished run has that label; the labels here: adapter, bitfit, lora, mimi"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "typo").exists()
    assert main(["report", str(tmp_path / "results"), "--out", str(tmp_path / "r"), "--against", "adapter"]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Against adapter at the same budget, paired by seed" in md and "| 4 | lora | 6 (3) | +1.50 |" in md


def test_forest_plot_draws_the_paired_comparisons_and_skips_single_pairs(tmp_path):
    from mimi.reporting.bench_report import paired_comparisons, plot_paired

    recs = _write_runs(tmp_path / "results")
    comps = paired_comparisons(recs)
    assert [(c.r, c.name, c.diff.n, c.n_seeds, c.above, c.below) for c in comps] == [
        (4, "adapter", 6, 3, 1, 1),
        (4, "lora", 6, 3, 2, 0),
    ]
    assert comps[0].verdict == "not separable at 3 seeds" and comps[1].verdict == "lora ahead"
    assert plot_paired(recs, tmp_path / "forest.png").stat().st_size > 1000
    one_pair = [r for r in recs if r["seed"] == 0 and r["task"] == "vtab1k:a"]  # one pair per method: no interval
    assert [c.diff.n for c in paired_comparisons(one_pair)] == [1, 1]
    assert plot_paired(one_pair, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_pareto_points_carry_se_only_with_two_seeds_or_more(tmp_path):
    recs = _write_runs(tmp_path / "results")
    task_a = _task_points(recs, "vtab1k:a")
    assert task_a["mimi"] == [(1000, pytest.approx(82.0), pytest.approx(2 / math.sqrt(3)))]
    assert task_a["bitfit"] == [(1000, pytest.approx(77.0), None)]
    mean = _mean_points(recs)
    # the SE of a mean over two tasks: sqrt(SE_a^2 + SE_b^2) / 2 = sqrt(4/3 + 1) / 2
    assert mean["mimi"] == [(1000, pytest.approx(76.5), pytest.approx(math.sqrt(7 / 3) / 2))]
    assert mean["bitfit"][0][2] is None


def test_paired_table_pools_mimi_cycles_standing_in_and_needs_two_pairs():
    # MiMi run to r=4 passes through r=8's budget (2000 adapter params) at cycle 1; its seed pairs with mid's
    on_the_way = {"cycle": 1, "adapter_params": 1990, "trainable_params": 2010, "test_acc": 0.85}
    last = {"cycle": 2, "adapter_params": 1000, "trainable_params": 1010, "test_acc": 0.80}
    mimi = _rec("a", "mimi", "mimi", 0, 0.80, size=1000, cycles=[{"cycle": 0}, on_the_way, last], budget_dim=4)
    mid = _rec("a", "mid", "adapter", 0, 0.82, adapter_dim=8)
    mid["params"]["adapter"] = 2000
    rows = paired_table([mimi, mid])
    assert rows[1:] == [["8", "mid", "1 (1)", "-3.00", "–", "–", "0/1", "one pair, no interval"]]


def test_report_merges_results_folders_once_each_and_warns_on_disagreement(tmp_path, caplog):
    from mimi.reporting.bench_report import load_results

    a, b = tmp_path / "shard0", tmp_path / "shard1"
    a.mkdir()
    b.mkdir()
    same = _rec("a", "mimi", "mimi", 0, 0.8, budget_dim=4)
    (a / "x.json").write_text(json.dumps(same))
    (b / "x.json").write_text(json.dumps(same))  # the same run in both shards: reported once, silently
    (b / "y.json").write_text(json.dumps(_rec("a", "mimi", "mimi", 1, 0.7, budget_dim=4)))
    (a / "z.json").write_text(json.dumps(_rec("b", "mimi", "mimi", 0, 0.6, budget_dim=4)))
    (b / "z.json").write_text(json.dumps(_rec("b", "mimi", "mimi", 0, 0.5, budget_dim=4)))  # disagrees
    recs = load_results([a, b])
    assert sorted(r["id"] for r in recs) == sorted({same["id"], "a__mimi__budgetdim4__s1", "b__mimi__budgetdim4__s0"})
    assert next(r for r in recs if r["id"].startswith("b__"))["test_acc"] == 0.6  # the first folder's
    assert "differs between" in caplog.text and caplog.text.count("differs between") == 1
    path = write_report([a, b], out=tmp_path / "merged")
    assert path.is_file() and "3 runs ok" in path.read_text()


def test_role_table_and_rank_map_of_mimi_lora(tmp_path):
    from mimi.reporting.bench_report import plot_mimi_sizes, role_table

    layout = [
        {"name": f"blocks.{b}.attn.{role}.adapter", "role": f"attn.{role}"} for b in (0, 1) for role in ("qkv", "proj")
    ]

    def run(task, seed, sizes, **cfg):
        final = {"cycle": 2, "test_acc": 0.8, "adapter_params": 1000, "trainable_params": 1010, "sizes": sizes}
        rec = _rec(task, "mimi-lora", "mimi-lora", seed, 0.8, size=1000, cycles=[final], budget_dim=4, **cfg)
        return {**rec, "layout": layout}

    recs = [
        run("a", 0, {"blocks.0.attn.proj.adapter": 3, "blocks.1.attn.proj.adapter": 1}),  # both qkv removed
        run("b", 0, {"blocks.0.attn.qkv.adapter": 2, "blocks.0.attn.proj.adapter": 2, "blocks.1.attn.proj.adapter": 4}),
        run("b", 1, {"blocks.0.attn.qkv.adapter": 16}, score="random"),  # an ablation run: left out
    ]
    # proj: (3 + 1 + 2 + 4) / 2 runs = 5.0; qkv: (0 + 2) / 2 = 1.0; total 6.0, shares 83% and 17%
    assert role_table(recs, "mimi-lora") == [
        ["budget r", "runs", "attn.proj", "attn.qkv", "total"],
        ["4", "2", "5.0 (83%)", "1.0 (17%)", "6.0"],
    ]
    assert role_table(recs, "mimi") == []
    path = plot_mimi_sizes(recs, tmp_path / "ranks.png", method="mimi-lora")
    assert path.stat().st_size > 1000
    assert plot_mimi_sizes(recs, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_verdict_says_when_a_gap_does_not_hold_with_tasks_resampled():
    from mimi.reporting.bench_report import Comparison
    from mimi.reporting.stats import PairedDiff

    def comp(across):
        return Comparison(3, "lora", PairedDiff(-0.9, -1.7, -0.2, 21), 3, 1, 6, across_tasks=across)

    assert comp((-2.0, -0.1)).verdict == "mimi ahead"  # both intervals exclude 0
    assert comp((-2.1, 0.03)).verdict == "mimi ahead on these tasks; not with tasks resampled"
    assert comp(None).verdict == "mimi ahead"  # one task: no second interval
    level = Comparison(3, "lora", PairedDiff(0.1, -0.4, 0.5, 21), 3, 3, 4, across_tasks=(-0.6, 0.7))
    assert level.verdict == "not separable at 3 seeds"
    few = Comparison(3, "mimi-distill", PairedDiff(0.71, 0.63, 0.80, 2), 1, 2, 0, across_tasks=(0.63, 0.80))
    assert few.verdict == "mimi-distill ahead in 2 pairs: too few to judge (< 6)"  # 2 of 2 agree: no verdict
    six = Comparison(3, "mimi-distill", PairedDiff(0.71, 0.2, 1.2, 6), 1, 6, 0, across_tasks=(0.1, 1.3))
    assert six.verdict == "mimi-distill ahead"


def test_context_runs_are_drawn_and_listed_but_never_paired(tmp_path, capsys):
    from mimi.reporting.bench_report import Context, context_table, plot_pareto

    assert Context.parse("runs/grid") == Context(Path("runs/grid"))
    assert Context.parse("runs/grid:linear, mimi") == Context(Path("runs/grid"), ("linear", "mimi"))
    assert Context.parse("C:\\runs\\grid") == Context(Path("C:\\runs\\grid"))  # a drive letter is not a label list
    _write_runs(tmp_path / "results")
    grid = tmp_path / "grid"
    grid.mkdir()
    head_only = {"trainable": 40, "trainable_without_head": 0, "adapter": 0, "head": 40}
    big = [_rec(t, "adapter", "adapter", 0, acc, adapter_dim=96) for t, acc in (("a", 0.90), ("b", 0.80))]
    ctx_recs = big + [
        {**_rec("a", "linear", "linear", 0, 0.50), "params": head_only},
        _rec("c", "linear", "linear", 0, 0.99),  # a task the results do not have: left out
        _rec("a", "ssf", "ssf", 0, 0.70),  # a label not asked for: left out
    ]
    for r in ctx_recs:
        (grid / f"{r['id']}.json").write_text(json.dumps(r))

    md = write_report(tmp_path / "results", out=tmp_path / "report", context=[f"{grid}:linear,adapter"]).read_text()
    section = md.split("## Context: runs of other folders")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0]: line for line in section.splitlines() if line.startswith("| ")}
    assert set(rows) - {"| method"} == {"| adapter adapterdim=96 [grid]", "| linear [grid]"}
    assert "| 90.00 | 80.00 | 85.00 |" in rows["| adapter adapterdim=96 [grid]"]  # both tasks: a mean
    assert rows["| linear [grid]"].endswith("| 50.00 | – | – | – |")  # only task a: no mean, task c dropped
    # never compared: the per-task table, the pairings and the run count are those of the results alone
    assert "[grid]" not in md.split("## Context")[0] and "[grid]" not in md.split("## Context")[1].split("\n## ", 1)[1]
    assert md.count("ssf") == 0 and "20 runs ok" in md

    # on the plots: the mean only where a context line has every task; a head-only line says so in its legend
    ctx = Context(grid, ("linear", "adapter")).load({"vtab1k:a", "vtab1k:b"})
    assert {r["context"] for r in ctx} == {"grid"} and len(ctx) == 3
    assert set(_mean_points(ctx, n_tasks=2)) == {"adapter [grid]"}
    assert context_table(ctx, {"natural": ["vtab1k:a"], "structured": ["vtab1k:b"]})[0][-2:] == [
        "mean (tasks)",
        "mean (groups)",
    ]
    seen = {}
    real_plot = plt.Axes.plot

    def spy(ax, *args, **kw):
        seen[kw.get("label")] = kw
        return real_plot(ax, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Axes, "plot", spy)
        recs = [json.loads(p.read_text()) for p in sorted((tmp_path / "results").glob("*.json"))]
        plot_pareto(recs, "vtab1k:a", tmp_path / "a.png", context=ctx)
    assert seen["linear [grid], head only"]["markerfacecolor"] == "none"  # hollow, grey, behind the results
    assert seen["adapter [grid]"]["zorder"] == 1 and "mimi" in seen

    # a label or folder that is not there: one line naming what is, nothing written
    for bad, said in ((f"{grid}:lineaar", "its labels: adapter, linear, ssf"), (f"{tmp_path}/nope", "no such folder")):
        assert main(["report", str(tmp_path / "results"), "--out", str(tmp_path / "bad"), "--context", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert said in err and "\n" not in err
        assert not (tmp_path / "bad").exists()
