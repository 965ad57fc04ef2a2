"""`mimi bench` on a tiny spec runs every method; `mimi report` renders tables and plots from the JSONs alone."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from vtab_fixture import write_vtab_task

from mimi.bench.spec import BenchSpec
from mimi.cli import main
from mimi.core.errors import ConfigError
from mimi.methods import METHODS


def _spec(tmp_path, root, methods):
    spec = {
        "name": "tiny",
        "results": str(tmp_path / "results"),
        "runs": str(tmp_path / "runs"),
        "defaults": {
            "model": "test_vit",
            "img_size": 32,
            "weights": "none",
            "data_root": str(root),
            "epochs": 1,
            "first_epochs": 1,
            "batch_size": 16,
            "device": "cpu",
            "progress": False,
            "lr": 0.003,
            "adapter_dim": 8,
        },
        "groups": {"natural": ["vtab1k:toy"], "structured": ["vtab1k:toy2"]},
        "seeds": [0],
        "methods": methods,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_bench_runs_every_method_and_report_renders(tmp_path):
    root = write_vtab_task(tmp_path / "data", "toy", sizes={"train800": 12, "val200": 6, "test": 6})
    write_vtab_task(root, "toy2", sizes={"train800": 12, "val200": 6, "test": 6}, seed=1)
    methods = [{"label": name, "method": name} for name in sorted(METHODS) if not name.startswith("mimi")]
    methods += [
        {"label": "mimi", "method": "mimi", "budget_dim": [4, 2]},
        {"label": "mimi-oneshot", "method": "mimi-oneshot", "budget_dim": 2},
        {"label": "mimi-score", "method": "mimi", "budget_dim": 2, "score": ["random", "gradient", "magnitude"]},
    ]
    spec_path = _spec(tmp_path, root, [m | ({"budget_dim": 2} if "lora" in m["method"] else {}) for m in methods])
    runs = BenchSpec.load(spec_path).expand()
    assert len(runs) == 2 * (len(methods) - 3 + 2 + 1 + 3)
    assert main(["bench", str(spec_path), "--quiet", "--shard", "0/2"]) == 0
    assert main(["bench", str(spec_path), "--quiet", "--shard", "1/2"]) == 0
    results = sorted((tmp_path / "results").glob("*.json"))
    assert len(results) == len(runs)
    recs = [json.loads(p.read_text()) for p in results]
    assert all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs if r["status"] != "ok"]
    for r in recs:
        assert {"config", "git_commit", "versions", "wall_seconds", "params", "checkpoint_bytes", "cycles"} <= set(r)
        assert r["params"]["trainable_without_head"] == r["params"]["trainable"] - r["params"]["head"]
        assert all({"val_acc", "test_acc"} <= set(c) for c in r["cycles"])
    by_id = {r["id"]: r for r in recs}
    mimi_small = next(r for i, r in by_id.items() if i.startswith("toy__mimi__budgetdim2"))
    assert 0 < mimi_small["params"]["adapter"] <= mimi_small["budget"] == 12 * (2 * (2 * 64 + 1) + 64)
    assert len(mimi_small["cycles"]) > 2 and len(by_id[next(i for i in by_id if "oneshot" in i)]["cycles"]) == 2

    # skip-done: a second pass runs nothing and leaves the files untouched
    stamp = {p: p.stat().st_mtime_ns for p in results}
    assert main(["bench", str(spec_path), "--quiet", "--no-report"]) == 0
    assert {p: p.stat().st_mtime_ns for p in results} == stamp

    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "results"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "mean (tasks)" in md and "mean (groups)" in md and "| mimi budgetdim=2 |" in md
    assert (
        (out / "report.html").is_file() and (out / "pareto_mean.png").is_file() and (out / "pareto_toy.png").is_file()
    )
    assert (out / "mimi_sizes.png").is_file()
    assert "## At the same budget" in md and "## MiMi ablation" in md
    ablation = md.split("## MiMi ablation")[1].split("##")[0]
    assert all(f"| {score} |" in ablation for score in ("mimi", "random", "gradient", "magnitude", "mimi, one-shot"))


def test_failures_are_recorded_not_dropped(tmp_path):
    root = write_vtab_task(tmp_path / "data", "toy", sizes={"train800": 6, "val200": 3, "test": 3})
    spec_path = _spec(tmp_path, root, [{"label": "broken", "method": "lora", "method_kwargs": {"rank": 0}}])
    assert main(["bench", str(spec_path), "--quiet"]) == 1
    recs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json")}
    assert set(recs) == {"toy__broken__s0", "toy2__broken__s0"}  # toy2 has no data folder: also recorded
    rec = recs["toy__broken__s0"]
    assert rec["status"] == "failed" and "rank" in rec["error"]
    assert recs["toy2__broken__s0"]["status"] == "failed" and "no such task folder" in recs["toy2__broken__s0"]["error"]
    md = (tmp_path / "results" / "report" / "report.md").read_text()
    assert "Failed runs" in md and rec["id"] in md


def _rec(task, label, method, acc, params, cycles=(), **cfg):
    return {
        "budget": params if "budget_dim" in cfg else None,
        "cycles": [{"cycle": 0}, *cycles, {"cycle": len(cycles) + 1}],
        "id": f"{task}__{label}",
        "task": task,
        "group": "g",
        "label": label,
        "status": "ok",
        "test_acc": acc,
        "grid": {},
        "config": {"method": method, **cfg},
        "params": {"trainable_without_head": params, "trainable": params + 10, "adapter": params, "head": 10},
    }


def test_budget_and_ablation_tables_compare_on_shared_tasks():
    from mimi.reporting.bench_report import ablation_table, budget_table

    on_the_way = {"cycle": 1, "adapter_params": 1990, "trainable_params": 2000, "test_acc": 0.85}
    recs = [
        _rec("a", "mimi", "mimi", 0.80, 1000, cycles=[on_the_way], budget_dim=4),
        _rec("b", "mimi", "mimi", 0.60, 1000, budget_dim=4),
        _rec("a", "adapter", "adapter", 0.70, 1010, adapter_dim=4),
        _rec("b", "adapter", "adapter", 0.65, 1010, adapter_dim=4),
        _rec("c", "adapter", "adapter", 0.99, 1010, adapter_dim=4),  # no MiMi on c: not compared
        _rec("a", "rand", "mimi", 0.50, 1000, budget_dim=4, score="random"),
        _rec("a", "big", "adapter", 0.90, 9000, adapter_dim=32),  # alone at its budget: no row
        _rec("a", "mid", "adapter", 0.82, 2000, adapter_dim=8),  # MiMi passed through 1990 <= 2000 params
        _rec("a", "bitfit", "bitfit", 0.75, 50),  # no budget knob: not in the budget table
    ]
    rows = budget_table(recs)
    assert [r[:2] for r in rows[1:3]] == [["8", "mimi (cycle 1 of a longer run)"], ["8", "mid"]]
    assert rows[1][2:5] == ["2.0k", "1", "85.00"] and rows[2][5:] == ["85.00", "-3.00 (0/1)"]
    assert rows[3][:2] == ["4", "mimi"] and len(rows) == 5
    adapter = rows[4]
    assert adapter[1:] == ["adapter", "1.0k", "2", "67.50", "70.00", "-2.50 (1/1)"]
    abl = ablation_table(recs + [_rec("b", "rand", "mimi", 0.62, 1000, budget_dim=4, score="random")])
    assert [r[:2] for r in abl[1:]] == [["4", "mimi"], ["4", "random"]]
    assert abl[1][3:] == ["2 (1)", "70.00", "–", "–", "–", "–", "–", "–"]
    # random - mimi: -30 on a, +2 on b; two pairs resample to -30, -14 or +2
    # two tasks of one pair each: resampling tasks is resampling the pairs, the same interval
    interval = "[-30.00, +2.00]"
    assert abl[2][3:] == ["2 (1)", "56.00", "70.00", "-14.00", interval, interval, "1/1", "not separable at 1 seed"]


def test_runs_finished_by_another_worker_meanwhile_are_skipped(tmp_path, monkeypatch):
    import mimi.bench.runner as bench

    root = write_vtab_task(tmp_path / "data", "toy", sizes={"train800": 6, "val200": 3, "test": 3})
    spec_path = _spec(tmp_path, root, [{"label": "linear", "method": "linear"}])
    started = []

    def fake_run_one(run, results, log=print):  # "another worker" finishes every other run meanwhile
        started.append(run.id)
        rec = {"id": run.id, "status": "ok", "test_acc": 0.5, "wall_seconds": 0.0}
        for other in BenchSpec.load(spec_path).expand():
            (results / f"{other.id}.json").write_text(json.dumps({**rec, "id": other.id}))
        return rec

    monkeypatch.setattr(bench, "run_one", fake_run_one)
    spec = yaml.safe_load(spec_path.read_text())
    spec["seeds"], spec["groups"] = [0, 1, 2], {"natural": ["vtab1k:toy"]}
    spec_path.write_text(yaml.safe_dump(spec))
    assert main(["bench", str(spec_path), "--quiet", "--no-report"]) == 0
    assert len(BenchSpec.load(spec_path).expand()) == 3 and started == ["toy__linear__s0"]


def test_a_method_can_have_its_own_seeds(tmp_path):
    root = write_vtab_task(tmp_path / "data", "toy", sizes={"train800": 6, "val200": 3, "test": 3})
    methods = [{"label": "linear", "method": "linear"}, {"label": "bitfit", "method": "bitfit", "seeds": [0]}]
    spec_path = _spec(tmp_path, root, methods)
    spec = yaml.safe_load(spec_path.read_text())
    spec["seeds"], spec["groups"] = [0, 1, 2], {"natural": ["vtab1k:toy"]}
    spec_path.write_text(yaml.safe_dump(spec))
    ids = [r.id for r in BenchSpec.load(spec_path).expand()]
    assert ids == ["toy__linear__s0", "toy__linear__s1", "toy__linear__s2", "toy__bitfit__s0"]
    spec["methods"][1]["seeds"] = 0
    spec_path.write_text(yaml.safe_dump(spec))
    assert main(["bench", str(spec_path), "--dry-run"]) == 2  # one-line ConfigError, not a traceback


def test_queue_sets_the_order_and_is_reread_before_every_run(tmp_path, monkeypatch, capsys):
    import mimi.bench.runner as bench

    root = write_vtab_task(tmp_path / "data", "toy", sizes={"train800": 6, "val200": 3, "test": 3})
    spec_path = _spec(tmp_path, root, [{"label": "linear", "method": "linear"}])
    spec = yaml.safe_load(spec_path.read_text())
    spec["seeds"], spec["groups"] = [0, 1, 2, 3], {"natural": ["vtab1k:toy"]}
    spec_path.write_text(yaml.safe_dump(spec))
    queue = tmp_path / "queue.txt"
    queue.write_text("# most wanted first\ntoy__linear__s2\n\ntoy__linear__s0\n")
    started = []

    def fake_run_one(run, results, log=print):
        started.append(run.id)
        if run.id == "toy__linear__s2":  # edited while the worker runs: s3 jumps ahead of s0, s1 is added
            queue.write_text("toy__linear__s3\ntoy__linear__s0\ntoy__linear__s1\ntoy__nothing__s0\n")
        rec = {"id": run.id, "status": "ok", "test_acc": 0.5, "wall_seconds": 0.0}
        (results / f"{run.id}.json").write_text(json.dumps(rec))
        return rec

    monkeypatch.setattr(bench, "run_one", fake_run_one)
    assert main(["bench", str(spec_path), "--quiet", "--no-report", "--queue", str(queue)]) == 0
    assert started == ["toy__linear__s2", "toy__linear__s3", "toy__linear__s0", "toy__linear__s1"]
    assert (
        capsys.readouterr().err.count("'toy__nothing__s0' is not a run of this spec") == 1
    )  # re-read 3 times; a log line (stderr)

    for f in (tmp_path / "results").glob("*.json"):
        f.unlink()
    started.clear()
    queue.write_text("toy__linear__s3\ntoy__linear__s0\ntoy__linear__s1\n")  # --only / --shard still apply
    assert main(["bench", str(spec_path), "--quiet", "--no-report", "--queue", str(queue), "--only", "s[01]$"]) == 0
    assert started == ["toy__linear__s0", "toy__linear__s1"]

    queue.write_text("toy__linear__s0\ntoy__linaer__s1\n")  # a typo at start is an error, before any run
    assert main(["bench", str(spec_path), "--quiet", "--queue", str(queue)]) == 2
    assert "toy__linaer__s1" in capsys.readouterr().err


def test_dry_run_estimates_from_finished_runs_of_the_same_kind(tmp_path, capsys):
    from mimi.bench.runner import estimate_seconds
    from mimi.bench.spec import BenchRun

    results = tmp_path / "results"
    results.mkdir()
    done = [("mimi", {"budget_dim": 3}, 100.0), ("mimi", {"budget_dim": 3}, 300.0), ("mimi", {"budget_dim": 3}, 200.0)]
    done += [("mimi", {"budget_dim": 12}, 50.0), ("linear", {}, None)]
    for k, (label, grid, wall) in enumerate(done):
        rec = {"id": f"r{k}", "status": "ok", "label": label, "grid": grid, "wall_seconds": wall}
        (results / f"r{k}.json").write_text(json.dumps(rec))
    (results / "failed.json").write_text(json.dumps({"id": "f", "status": "failed", "label": "bitfit", "grid": {}}))

    def run(label, grid):
        return BenchRun(f"t__{label}__{grid}", "t", "g", label, 1, grid, {})

    todo = [run("mimi", {"budget_dim": 3}), run("mimi", {"budget_dim": 48}), run("linear", {}), run("bitfit", {})]
    guess = estimate_seconds(todo, results)
    # same label and budget: median of 100/300/200; another budget: median over the label (50, 100, 200, 300)
    assert guess == {todo[0].id: 200.0, todo[1].id: 150.0}


def test_dry_run_shows_runs_held_by_live_workers(tmp_path, capsys):
    import os
    import platform

    root = write_vtab_task(tmp_path / "data", "toy", sizes={"train800": 6, "val200": 3, "test": 3})
    spec_path = _spec(tmp_path, root, [{"label": "linear", "method": "linear"}])
    spec = yaml.safe_load(spec_path.read_text())
    spec["seeds"], spec["groups"] = [0, 1, 2, 3], {"natural": ["vtab1k:toy"]}
    spec_path.write_text(yaml.safe_dump(spec))
    results = Path(spec["results"])
    (results / ".claims").mkdir(parents=True)
    done = {"id": "toy__linear__s0", "status": "ok", "label": "linear", "grid": {}, "wall_seconds": 600.0}
    (results / "toy__linear__s0.json").write_text(json.dumps(done))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: its claim is stale
    claims = {"s1": f"{platform.node()} {os.getpid()}", "s2": f"{platform.node()} {dead.pid}", "s3": "elsewhere 1"}
    for seed, holder in claims.items():
        (results / ".claims" / f"toy__linear__{seed}.claim").write_text(holder)
    assert main(["bench", str(spec_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"running toy__linear__s1  ({platform.node()} {os.getpid()}, 0 min so far of ~10 min)" in out
    assert "todo toy__linear__s2  (~10 min)" in out  # its worker died: up for grabs
    assert "running toy__linear__s3  (elsewhere 1," in out  # another host's claim is respected
    # 3 left, 2 of them running for ~0 s of their 600 s guess: 1800 s = 0.5 h
    assert "3 to do (2 running): ~0.5 h of one worker" in out
    assert "~0.2 h of wall if the 2 workers holding runs now go on" in out  # 0.25 h: two holders share it
    assert (results / ".claims" / "toy__linear__s2.claim").exists()  # a dry run takes nothing over


def _claim_after(barrier, results, run_id, won):
    from mimi.bench.claims import claim

    barrier.wait()
    if claim(Path(results), run_id):
        won.put(os.getpid())
        time.sleep(1.0)  # hold it while the others try


def test_only_one_of_many_workers_takes_over_a_stale_claim(tmp_path):
    import multiprocessing as mp
    import platform

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".claims").mkdir()
    stale = tmp_path / ".claims" / "toy__linear__s0.claim"
    ctx = mp.get_context("fork")
    for _ in range(5):  # the race is a matter of timing: give it several chances
        stale.write_text(f"{platform.node()} {dead.pid}")
        barrier, won = ctx.Barrier(6), ctx.Queue()
        procs = [
            ctx.Process(target=_claim_after, args=(barrier, str(tmp_path), "toy__linear__s0", won)) for _ in range(6)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        winners = [won.get(timeout=5) for _ in range(won.qsize())] if not won.empty() else []
        assert len(winners) == 1, winners
        assert stale.read_text() == f"{platform.node()} {winners[0]}"


def test_a_released_claim_is_free_and_another_workers_claim_is_left_alone(tmp_path):
    import platform

    from mimi.bench.claims import claim, claimed, release

    assert claim(tmp_path, "a")
    assert claimed(tmp_path, "a")[0] == f"{platform.node()} {os.getpid()}"
    assert not claim(tmp_path, "a")  # held: a second claim fails, even from this process (flock is per open file)
    release(tmp_path, "a")
    assert claimed(tmp_path, "a") is None and not (tmp_path / ".claims" / "a.claim").exists()
    (tmp_path / ".claims" / "b.claim").write_text("elsewhere 7")
    assert not claim(tmp_path, "b")  # another host's claim is respected
    release(tmp_path, "b")  # not ours: left in place
    assert (tmp_path / ".claims" / "b.claim").read_text() == "elsewhere 7"


def test_a_distilled_pair_is_one_job_and_report_pairs_it(tmp_path, capsys):
    """teacher_from ties the distilled equal-epoch adapter to the distilled MiMi run of its task and seed: one job,
    lead first; the follower learns from the lead's cycle-0 file; a follower whose teacher is gone fails in one line."""
    root = write_vtab_task(tmp_path / "data", "toy", sizes={"train800": 12, "val200": 6, "test": 6})
    lead = {"label": "mimi-distill", "method": "mimi", "budget_dim": [2], "distill": True, "save_cycles": True}
    follower = {"label": "adapter-distill", "method": "adapter", "adapter_dim": 2, "first_epochs": 3}
    follower["teacher_from"] = "mimi-distill__budgetdim2:cycles/cycle_0.safetensors"
    methods = [{"label": "mimi", "method": "mimi", "budget_dim": [2]}, lead, follower]
    spec_path = _spec(tmp_path, root, methods)
    spec = yaml.safe_load(spec_path.read_text())
    spec["groups"] = {"natural": ["vtab1k:toy"]}
    spec_path.write_text(yaml.safe_dump(spec))
    runs = BenchSpec.load(spec_path).expand()
    jobs = BenchSpec.jobs(runs)
    assert list(jobs) == ["toy__mimi__budgetdim2__s0", "toy__mimi-distill__budgetdim2__s0"]
    assert [r.id for r in jobs["toy__mimi-distill__budgetdim2__s0"]][1] == "toy__adapter-distill__s0"
    taught = runs[-1].config
    assert (
        taught["distill"]
        and taught["teacher"] == f"{tmp_path / 'runs'}/toy__mimi-distill__budgetdim2__s0:cycles/cycle_0.safetensors"
    )

    queue = tmp_path / "queue.txt"
    queue.write_text("toy__adapter-distill__s0\n")  # a follower queued alone brings its lead
    assert main(["bench", str(spec_path), "--quiet", "--no-report", "--queue", str(queue)]) == 0
    out = capsys.readouterr().out
    assert out.index("toy__mimi-distill__budgetdim2__s0") < out.index("toy__adapter-distill__s0")
    recs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json")}
    assert set(recs) == {"toy__mimi-distill__budgetdim2__s0", "toy__adapter-distill__s0"}
    assert all(r["status"] == "ok" for r in recs.values())
    logits = [load_file(str(tmp_path / "runs" / i / "teacher_logits.safetensors"))["logits"] for i in recs]
    assert torch.equal(*logits)  # the same teacher: the lead's model at the end of cycle 0

    # a follower to train again, its lead's folder gone (another machine): one line, the lead left alone
    (tmp_path / "results" / "toy__adapter-distill__s0.json").unlink()
    shutil.rmtree(tmp_path / "runs" / "toy__adapter-distill__s0")
    shutil.rmtree(tmp_path / "runs" / "toy__mimi-distill__budgetdim2__s0" / "cycles")
    assert main(["bench", str(spec_path), "--quiet", "--no-report", "--only", "distill"]) == 1
    rec = json.loads((tmp_path / "results" / "toy__adapter-distill__s0.json").read_text())
    assert rec["status"] == "failed" and "is gone" in rec["error"] and "delete" in rec["error"]

    for bad, message in (
        ({**follower, "teacher_from": "nothing"}, "no run of this spec"),
        ({**follower}, "does not keep cycles/ files"),
    ):
        lead_kept = {**lead, "save_cycles": False} if "keep" in message else lead
        spec["methods"] = [lead_kept, bad]
        spec_path.write_text(yaml.safe_dump(spec))
        with pytest.raises(ConfigError, match=message):
            BenchSpec.load(spec_path).expand()


def test_report_pairs_distilled_runs_and_keeps_them_out_of_mimi():
    from mimi.reporting.bench_report import ablation_table, paired_comparisons

    recs = []
    for task, base in (("a", 0.70), ("b", 0.60), ("c", 0.50)):
        recs.append(_rec(task, "mimi", "mimi", base, 1000, budget_dim=3))
        recs.append(_rec(task, "mimi-distill", "mimi", base + 0.02, 1000, budget_dim=3, distill=True))
        recs.append(_rec(task, "adapter-distill", "adapter", base - 0.01, 1010, adapter_dim=3, distill=True))
    got = {c.name: c.diff.mean for c in paired_comparisons(recs)}
    assert got == pytest.approx({"mimi-distill": 2.0, "adapter-distill": -1.0})  # plain MiMi alone is the reference
    vs = {c.name: c.diff.mean for c in paired_comparisons(recs, against="mimi-distill")}
    assert vs == pytest.approx({"mimi": -2.0, "adapter-distill": -3.0})
    assert ablation_table(recs) == []  # a distilled MiMi is no neuron score of the ablation
