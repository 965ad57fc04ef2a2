"""`mimi bench` on a tiny spec runs every method; `mimi report` renders tables and plots from the JSONs alone."""

import json

import yaml
from vtab_fixture import write_vtab_task

from mimi.bench import BenchSpec
from mimi.cli import main
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
