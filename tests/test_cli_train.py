"""End to end: the real CLI on a VTAB-1k-layout folder written here, with timm's test_vit."""

import json
import shutil

import pytest
from safetensors.torch import load_file
from vtab_fixture import write_vtab_task

from mimi.cli import main

BUDGET = 500


def _train_args(root, out, *extra):
    return [
        "train",
        "--model",
        "test_vit",
        "--img-size",
        "32",
        "--data",
        "vtab1k:toy",
        "--data-root",
        str(root),
        "--method",
        "mimi",
        "--adapter-dim",
        "16",
        "--budget-params",
        str(BUDGET),
        "--rho",
        "0.5",
        "--epochs",
        "1",
        "--first-epochs",
        "3",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--seed",
        "0",
        "--lr",
        "3e-3",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = write_vtab_task(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(_train_args(root, out)) == 0
    return root, out


def test_run_folder_files_and_summary(finished_run):
    _, out = finished_run
    for name in (
        "config.yaml",
        "run.json",
        "metrics.jsonl",
        "summary.json",
        "adapters.safetensors",
        "report.md",
        "plots/accuracy_vs_params.png",
        "plots/sizes_heatmap.png",
        "cycles/cycle_0.safetensors",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    keys = {"cycle", "adapter_params", "trainable_params", "pct_of_backbone", "sizes", "val_acc", "test_acc", "seconds"}
    assert all(keys <= set(e) for e in summary)
    params = [e["adapter_params"] for e in summary]
    assert params == sorted(params, reverse=True) and params[-1] <= BUDGET and len(summary) >= 3
    assert [e["cycle"] for e in summary] == list(range(len(summary)))
    for e in summary:
        assert sum(h * (64 + 64 + 1) + 64 for h in e["sizes"].values()) == e["adapter_params"]
    assert summary[0]["test_acc"] > 1 / 3 + 0.15  # above chance (3 classes)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == sum(e["epochs"] for e in summary)
    assert {"train_loss", "train_acc", "val_acc", "lr", "adapter_params"} <= set(metrics[0])
    final = load_file(str(out / "adapters.safetensors"))
    assert not any(k.startswith(("blocks.0.attn.qkv", "patch_embed", "cls_token")) for k in final)


def test_eval_reproduces_reported_test_accuracy(finished_run, capsys, tmp_path):
    _, out = finished_run
    summary = json.loads((out / "summary.json").read_text())
    assert main(["eval", str(out), "--split", "test", "--json", str(tmp_path / "e.json")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["acc"] == pytest.approx(summary[-1]["test_acc"], abs=1e-9)
    assert (
        main(
            [
                "eval",
                str(out),
                "--split",
                "val",
                "--weights",
                "cycles/cycle_0.safetensors",
                "--json",
                str(tmp_path / "v.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "v.json").read_text())["acc"] == pytest.approx(summary[0]["val_acc"], abs=1e-9)
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["acc"] == pytest.approx(summary[-1]["test_acc"], abs=1e-9)


def test_info_shows_sizes_and_bytes(finished_run, capsys):
    _, out = finished_run
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bytes" in text and "adapters:" in text and "head:" in text


def test_resume_after_interruption_equals_uninterrupted(finished_run, tmp_path):
    """Cut the run after its 4th epoch (cycle 1, just after a prune), resume, compare bit for bit."""
    root, full = finished_run
    out = tmp_path / "cut"

    class Stop(Exception):
        pass

    import mimi.trainer as tr

    calls = {"n": 0}
    original = tr.save_checkpoint

    def crashing_save(*a, **k):
        original(*a, **k)
        calls["n"] += 1
        if calls["n"] == 6:  # start, 3 epochs, end of cycle 0, after-prune checkpoint of cycle 1
            raise Stop

    tr.save_checkpoint = crashing_save
    try:
        with pytest.raises(Stop):
            main(_train_args(root, out))
    finally:
        tr.save_checkpoint = original
    assert not (out / "adapters.safetensors").exists()
    assert main(["train", "--resume", str(out)]) == 0
    a, b = load_file(str(full / "adapters.safetensors")), load_file(str(out / "adapters.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, out))
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in sa]
    assert strip == [{k: v for k, v in e.items() if k != "seconds"} for e in sb]
    ma = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["cycle"], m["epoch"], m["train_loss"]) for m in ma] == [
        (m["cycle"], m["epoch"], m["train_loss"]) for m in mb
    ]


def test_resume_mid_cycle_zero(finished_run, tmp_path):
    root, full = finished_run
    out = tmp_path / "cut0"
    import mimi.trainer as tr

    original = tr.save_checkpoint
    calls = {"n": 0}

    def crashing_save(*a, **k):
        original(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:  # after the first epoch of cycle 0
            raise KeyboardInterrupt

    tr.save_checkpoint = crashing_save
    try:
        assert main(_train_args(root, out)) == 130
    finally:
        tr.save_checkpoint = original
    assert main(["train", "--resume", str(out)]) == 0
    a, b = load_file(str(full / "adapters.safetensors")), load_file(str(out / "adapters.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


def test_clear_errors(tmp_path, capsys, finished_run):
    root, out = finished_run
    assert (
        main(
            [
                "train",
                "--model",
                "test_vit",
                "--data",
                "vtab1k:nope",
                "--data-root",
                str(root),
                "--out",
                str(tmp_path / "x"),
                "--budget-params",
                "10",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert main(_train_args(root, out)) == 2  # existing run folder is never overwritten
    assert "already holds a run" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--model",
                "test_vit",
                "--img-size",
                "32",
                "--data",
                "vtab1k:toy",
                "--data-root",
                str(root),
                "--out",
                str(tmp_path / "y"),
                "--no-progress",
                "--weights",
                "none",
            ]
        )
        == 2
    )
    assert "needs a budget" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing")]) == 2
    shutil.rmtree(tmp_path / "x", ignore_errors=True)


def test_config_file_with_overrides(tmp_path, finished_run):
    root, _ = finished_run
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: test_vit\nimg_size: 32\ndata: vtab1k:toy\ndata_root: {root}\nmethod: linear\nepochs: 3\n"
        "batch_size: 16\ndevice: cpu\nprogress: false\nlr: 0.01\n"
    )
    out = tmp_path / "lin"
    assert main(["train", "--config", str(cfg), "--epochs", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 1 and summary[0]["epochs"] == 1 and summary[0]["adapter_params"] == 0
    assert summary[0]["trainable_params"] == 64 * 3 + 3


def test_resume_before_first_checkpoint_starts_over(tmp_path, finished_run):
    root, _ = finished_run
    out = tmp_path / "early"
    args = [
        "train",
        "--model",
        "test_vit",
        "--img-size",
        "32",
        "--data",
        "vtab1k:toy",
        "--data-root",
        str(root),
        "--method",
        "linear",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    (out / "checkpoint.safetensors").unlink()  # as if killed before the first checkpoint was written
    (out / "adapters.safetensors").unlink()
    assert main(["train", "--resume", str(out)]) == 0
    assert (out / "adapters.safetensors").is_file() and len(json.loads((out / "summary.json").read_text())) == 1
