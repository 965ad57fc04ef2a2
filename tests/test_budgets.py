"""Several budgets from one run: the schedule lands on each, keeps each as a task, and agrees with single-budget runs."""

import json

import pytest
from safetensors.torch import load_file
from vtab_fixture import write_vtab_task

from mimi.cli import main
from mimi.config import TrainConfig
from mimi.core.errors import ConfigError
from mimi.core.schedule import MiMiPruner

COMMON = "--model test_vit --img-size 32 --data vtab1k:toy --batch-size 16 --device cpu --seed 0 --no-progress"
MIMI = "--method mimi --adapter-dim 16 --rho 0.5 --epochs 1 --first-epochs 2 --lr 3e-3 --no-save-cycles"
BUDGETS = (2000, 1000, 500)  # test_vit: 4 adapters of 16 x 129 + 64 = 8,512 parameters at insertion


def _train(root, out, budgets: str, extra: str = "") -> None:
    args = ["train", *COMMON.split(), *MIMI.split(), "--budget-params", budgets, *extra.split()]
    assert main([*args, "--data-root", str(root), "--out", str(out)]) == 0


def _same_tensors(a_path, b_path) -> bool:
    a, b = load_file(str(a_path)), load_file(str(b_path))
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


# ------------------------------------------------------------------ the schedule


def test_stops_are_landed_on_and_the_path_to_the_first_is_a_single_budget_path():
    multi = MiMiPruner(budget=1000, stops=[8000, 4000], rho=0.5)
    assert multi.planned_targets(20000) == [10000, 8000, 4000, 2000, 1000]
    alone = MiMiPruner(budget=8000, rho=0.5)
    assert multi.planned_targets(20000)[:2] == alone.planned_targets(20000)
    assert multi.budgets == [8000, 4000, 1000]
    # no stop is ever cut past, whatever rho: one-shot lands on each in turn
    assert MiMiPruner(budget=1000, stops=[4000, 8000], rho=1.0).planned_targets(20000) == [8000, 4000, 1000]


def test_a_stop_at_or_below_the_budget_is_refused():
    with pytest.raises(ConfigError, match="stops must be integers above the budget"):
        MiMiPruner(budget=1000, stops=[1000])


def test_pruner_state_keeps_its_stops_and_old_states_have_none():
    p = MiMiPruner(budget=1000, stops=[4000], rho=0.5)
    assert MiMiPruner.from_state_dict(p.state_dict()).stops == [4000]
    old = {"budget": 1000, "rho": 0.5, "score": "mimi", "seed": 0, "cycle": 2, "history": []}
    assert MiMiPruner.from_state_dict(old).stops == [] and "stops" not in MiMiPruner(budget=1000).state_dict()


@pytest.mark.parametrize(
    ("given", "stored"), [("8000,32000,16000", [32000, 16000, 8000]), ([8000, 8000], 8000), (4000, 4000)]
)
def test_budget_fields_read_several_values_largest_first(given, stored):
    assert TrainConfig(budget_params=given).budget_params == stored
    assert TrainConfig.from_dict({"budget_dim": given}).budget_dim == stored


@pytest.mark.parametrize("bad", ["8000,x", [], [1.5], "", True])
def test_bad_budget_lists_are_refused_in_one_line(bad):
    with pytest.raises(ConfigError, match="budget_params must be an integer or comma-separated integers"):
        TrainConfig.from_dict({"budget_params": bad})


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = write_vtab_task(tmp_path_factory.mktemp("data"))
    base = tmp_path_factory.mktemp("runs")
    _train(root, base / "multi", ",".join(map(str, BUDGETS)), "--test-every last")
    _train(root, base / "first", str(BUDGETS[0]), "--test-every last")
    return root, base


def test_each_budget_is_kept_as_a_task_with_its_accuracy(runs):
    _, base = runs
    out = base / "multi"
    summary = json.loads((out / "summary.json").read_text())
    kept = {e["budget"]: e for e in summary if "budget" in e}
    assert sorted(kept, reverse=True) == list(BUDGETS)
    for b, e in kept.items():
        assert e["adapter_params"] <= b and e["target"] == b
        assert e["test_acc"] is not None and e["val_acc"] is not None  # tested even with --test-every last
        assert (out / "budgets" / f"{b}.safetensors").is_file()
    # cycles that are not kept are not tested under --test-every last
    assert all(e["test_acc"] is None for e in summary if "budget" not in e)
    assert _same_tensors(out / "budgets" / "500.safetensors", out / "adapters.safetensors")
    assert json.loads((out / "run.json").read_text())["budgets"] == list(BUDGETS)
    report = (out / "report.md").read_text()
    for b, e in kept.items():  # the run report lists each kept task with its accuracies
        assert f"| {b:,} | {e['adapter_params']:,} | {e['cycle']} |" in report
        assert f"{100 * e['test_acc']:.2f} | `budgets/{b}.safetensors` |" in report
    assert "Tasks kept at each budget" not in (base / "first" / "report.md").read_text()
    assert "budgets" not in json.loads((base / "first" / "run.json").read_text())


def test_the_first_budget_equals_a_run_to_it_alone_bit_for_bit(runs):
    _, base = runs
    multi = json.loads((base / "multi" / "summary.json").read_text())
    alone = json.loads((base / "first" / "summary.json").read_text())
    n = len(alone)
    assert [e["sizes"] for e in multi[:n]] == [e["sizes"] for e in alone]
    assert multi[n - 1]["val_acc"] == alone[-1]["val_acc"] and multi[n - 1]["test_acc"] == alone[-1]["test_acc"]
    assert _same_tensors(
        base / "multi" / "budgets" / f"{BUDGETS[0]}.safetensors", base / "first" / "adapters.safetensors"
    )
    assert not (base / "first" / "budgets").exists()  # one budget: the run folder is as it always was


def test_export_eval_and_info_take_a_budget(runs, tmp_path, capsys):
    _, base = runs
    out = base / "multi"
    summary = {e["budget"]: e for e in json.loads((out / "summary.json").read_text()) if "budget" in e}
    assert main(["eval", str(out), "--budget", "1000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["acc"] == summary[1000]["test_acc"]
    assert main(["export", str(out), "--budget", "1000", "--out", str(tmp_path / "t.safetensors")]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--budget", "1000"]) == 0
    printed = capsys.readouterr().out
    assert "budgets/1000.safetensors" in printed and f"{summary[1000]['adapter_params']:,} parameters" in printed
    assert main(["info", str(tmp_path / "t.safetensors")]) == 0
    assert f"{summary[1000]['adapter_params']:,} parameters" in capsys.readouterr().out


def test_a_budget_the_run_did_not_keep_is_refused_naming_those_it_kept(runs, capsys):
    _, base = runs
    assert main(["eval", str(base / "multi"), "--budget", "750"]) == 2
    assert "no task at budget 750 (budgets/750.safetensors); it kept 2000, 1000, 500" in capsys.readouterr().err
    assert main(["export", str(base / "first"), "--budget", "2000", "--out", str(base / "x.safetensors")]) == 2
    assert "leave out --budget" in capsys.readouterr().err and not (base / "x.safetensors").exists()


def test_several_budgets_for_a_method_that_does_not_prune_are_refused(runs, tmp_path, capsys):
    root, _ = runs
    args = ["train", *COMMON.split(), "--method", "lora", "--budget-params", "2000,1000"]
    assert main([*args, "--data-root", str(root), "--out", str(tmp_path / "r")]) == 2
    assert "give it one budget" in capsys.readouterr().err and not (tmp_path / "r").exists()


# ------------------------------------------------------------------ bench and report


def test_bench_records_each_budget_of_one_run_and_the_report_counts_it_once(tmp_path):
    import yaml

    from mimi.reporting.bench_report import by_param_budget, load_results, wall_seconds

    root = write_vtab_task(tmp_path / "data", "toy", sizes={"train800": 12, "val200": 6, "test": 6})
    defaults = {"model": "test_vit", "img_size": 32, "weights": "none", "data_root": str(root), "epochs": 1}
    defaults |= {"first_epochs": 1, "batch_size": 16, "device": "cpu", "progress": False, "adapter_dim": 16}
    methods = [
        {"label": "mimi-kb", "method": "mimi", "budget_params": "2000,1000", "save_cycles": False},
        {"label": "small", "method": "adapter", "adapter_dim": 1, "budget_params": 1000, "first_epochs": 3},
    ]
    spec = {"name": "kb", "results": str(tmp_path / "res"), "runs": str(tmp_path / "runs"), "defaults": defaults}
    spec |= {"groups": {"natural": ["vtab1k:toy"]}, "seeds": [0], "methods": methods}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["bench", str(tmp_path / "spec.yaml")]) == 0
    rec = json.loads((tmp_path / "res" / "toy__mimi-kb__s0.json").read_text())
    assert [k["budget"] for k in rec["budgets"]] == [2000, 1000]
    summary = json.loads((tmp_path / "runs" / "toy__mimi-kb__s0" / "summary.json").read_text())
    for k in rec["budgets"]:
        e = summary[k["cycle"]]
        assert (k["test_acc"], k["params"]["adapter"], k["budget"]) == (e["test_acc"], e["adapter_params"], e["budget"])
        assert k["epochs"] == sum(c["epochs"] for c in summary[: k["cycle"] + 1])
    assert rec["budgets"][-1]["test_acc"] == rec["test_acc"]  # the last budget is the run's final model

    points = load_results(tmp_path / "res")
    mimi_points = [p for p in points if p["label"] == "mimi-kb"]
    assert sorted(p["budget"] for p in mimi_points) == [1000, 2000]
    assert {p["run_id"] for p in mimi_points} == {rec["id"]} and len({p["id"] for p in points}) == 3
    small = json.loads((tmp_path / "res" / "toy__small__s0.json").read_text())
    assert wall_seconds(points) == pytest.approx(rec["wall_seconds"] + small["wall_seconds"])  # not twice
    assert set(by_param_budget(points)[1000]) == {"mimi-kb", "small"}
    report = (tmp_path / "res" / "report" / "report.md").read_text()
    assert "## At parameter budgets, paired by seed" in report and "3 runs ok (2 trained" in report
    assert (tmp_path / "res" / "report" / "pareto_mean_bytes.png").is_file()  # bytes as the other axis
    from mimi.reporting.bench_report import _task_points

    by_bytes = dict(_task_points(points, "vtab1k:toy", x="bytes"))["mimi-kb"]
    kept_bytes = sorted(k["checkpoint_bytes"] for k in rec["budgets"])
    assert sorted(x for x, _, _ in by_bytes) == kept_bytes and kept_bytes[0] < kept_bytes[1]


def test_param_budget_table_pairs_every_label_with_the_mimi_label_of_most_runs():
    from mimi.reporting.bench_report import param_budget_table

    def rec(label, task, seed, acc, method="mimi", **extra):
        cfg = {"method": method, "budget_params": 8000, **extra}
        params = {"trainable_without_head": 7000, "trainable": 7500}
        out = {"id": f"{task}{label}{seed}", "label": label, "task": task, "seed": seed, "test_acc": acc}
        return out | {"config": cfg, "params": params, "status": "ok"}

    tasks = [f"t{i}" for i in range(6)]
    ok = [rec("mimi-kb", t, s, 0.80) for t in tasks for s in (0, 1)]
    ok += [rec("mimi-alone", t, 0, 0.81) for t in tasks] + [rec("fact", t, 0, 0.70, "fact-tt") for t in tasks]
    rows = {r[1]: r for r in param_budget_table(ok)[1:]}
    assert rows["mimi-kb"][4] == "(reference)"  # 12 runs against 6: the multi-budget runs are the reference
    assert rows["mimi-alone"][3:5] == ["6 (1)", "+1.00"] and rows["fact"][3:5] == ["6 (1)", "-10.00"]
    assert rows["fact"][-1] == "mimi-kb ahead" and rows["mimi-alone"][-1] == "mimi-alone ahead"
    # MiMi's score control: more runs than mimi-kb, yet compared with it, never the reference
    ok += [rec("mimi-random", t, s, 0.82, score="random") for t in tasks for s in (0, 1, 2)]
    rows = {r[1]: r for r in param_budget_table(ok)[1:]}
    assert rows["mimi-kb"][4] == "(reference)" and rows["mimi-random"][3:5] == ["12 (2)", "+2.00"]
