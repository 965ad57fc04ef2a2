"""End to end: the real CLI on a VTAB-1k-layout folder written here, with timm's test_vit."""

import contextlib
import json

import pytest
from safetensors.torch import load_file
from vtab_fixture import write_vtab_task

import mimi.training.loop as loop
from mimi.cli import main

BUDGET = 500
COMMON = "--model test_vit --img-size 32 --data vtab1k:toy --batch-size 16 --device cpu --seed 0 --no-progress"
MIMI = f"--method mimi --adapter-dim 16 --budget-params {BUDGET} --rho 0.5 --epochs 1 --first-epochs 3 --lr 3e-3"


def _args(root, out, extra: str = MIMI) -> list[str]:
    return ["train", *COMMON.split(), *extra.split(), "--data-root", str(root), "--out", str(out)]


@contextlib.contextmanager
def crash_after_checkpoints(n: int, exc: BaseException):
    """Make the trainer raise ``exc`` right after its n-th checkpoint is written (a crash at a known point)."""
    original, calls = loop.save_checkpoint, {"n": 0}

    def save(*a, **k):
        original(*a, **k)
        calls["n"] += 1
        if calls["n"] == n:
            raise exc

    loop.save_checkpoint = save
    try:
        yield
    finally:
        loop.save_checkpoint = original


def _same_tensors(a_path, b_path) -> bool:
    a, b = load_file(str(a_path)), load_file(str(b_path))
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = write_vtab_task(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(_args(root, out)) == 0
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
    assert json.loads((tmp_path / "e.json").read_text())["acc"] == pytest.approx(summary[-1]["test_acc"], abs=1e-9)
    cycle0 = ["--weights", "cycles/cycle_0.safetensors", "--json", str(tmp_path / "v.json")]
    assert main(["eval", str(out), "--split", "val", *cycle0]) == 0
    assert json.loads((tmp_path / "v.json").read_text())["acc"] == pytest.approx(summary[0]["val_acc"], abs=1e-9)
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["acc"] == pytest.approx(summary[-1]["test_acc"], abs=1e-9)


def test_info_shows_sizes_and_bytes(finished_run, capsys):
    _, out = finished_run
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bytes" in text and "adapters:" in text
    assert text.splitlines()[1].startswith(
        "trained: mimi on vtab1k:toy, backbone test_vit at 32 px, weights random-init"
    )
    summary = json.loads((out / "summary.json").read_text())
    head = 64 * 3 + 3
    assert f"head: {head:,} parameters" in text
    assert f"{summary[-1]['adapter_params']:,} parameters" in text.splitlines()[-2]


class Stop(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted(finished_run, tmp_path):
    """Cut the run just after the prune of cycle 1, resume, compare bit for bit."""
    root, full = finished_run
    out = tmp_path / "cut"
    # checkpoints: start, 3 epochs, end of cycle 0, after the prune of cycle 1 -> crash
    with crash_after_checkpoints(6, Stop()), pytest.raises(Stop):
        main(_args(root, out))
    assert not (out / "adapters.safetensors").exists()
    assert main(["train", "--resume", str(out)]) == 0
    assert _same_tensors(full / "adapters.safetensors", out / "adapters.safetensors")
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, out))
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in sa] == [
        {k: v for k, v in e.items() if k != "seconds"} for e in sb
    ]
    ma, mb = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (full, out))
    assert [(m["cycle"], m["epoch"], m["train_loss"]) for m in ma] == [
        (m["cycle"], m["epoch"], m["train_loss"]) for m in mb
    ]


def test_resume_mid_cycle_zero_after_ctrl_c(finished_run, tmp_path):
    root, full = finished_run
    out = tmp_path / "cut0"
    with crash_after_checkpoints(2, KeyboardInterrupt()):  # after the first epoch of cycle 0
        assert main(_args(root, out)) == 130
    assert main(["train", "--resume", str(out)]) == 0
    assert _same_tensors(full / "adapters.safetensors", out / "adapters.safetensors")


def test_resume_before_first_checkpoint_starts_over(tmp_path, finished_run):
    root, _ = finished_run
    out = tmp_path / "early"
    assert main(_args(root, out, "--method linear --epochs 1")) == 0
    (out / "checkpoint.safetensors").unlink()  # as if killed before the first checkpoint was written
    (out / "adapters.safetensors").unlink()
    assert main(["train", "--resume", str(out)]) == 0
    assert (out / "adapters.safetensors").is_file() and len(json.loads((out / "summary.json").read_text())) == 1


def test_clear_errors(tmp_path, capsys, finished_run):
    root, out = finished_run
    bad_task = [
        "train",
        "--model",
        "test_vit",
        "--data",
        "vtab1k:nope",
        "--data-root",
        str(root),
        "--no-progress",
        "--out",
        str(tmp_path / "x"),
        "--budget-params",
        "10",
    ]
    assert main(bad_task) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert not (tmp_path / "x" / "config.yaml").exists()  # nothing half-written
    assert main(_args(root, out)) == 2  # an existing run folder is never overwritten
    assert "already holds a run" in capsys.readouterr().err
    assert main(_args(root, tmp_path / "y", "--method mimi --weights none")) == 2
    assert "needs a budget" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert main(["train", "--resume", str(out), "--epochs", "3"]) == 2
    assert "--resume takes the run's own config" in capsys.readouterr().err


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
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_bf16_autocast_path_runs_on_cpu(tmp_path, finished_run):
    """The CUDA default (bf16 autocast) exercised on CPU: the loop, pruning and evaluation work under autocast."""
    root, _ = finished_run
    out = tmp_path / "bf16"
    extra = f"--method mimi --adapter-dim 8 --budget-params {BUDGET} --rho 1.0 --epochs 1 --precision bf16"
    assert main(_args(root, out, extra)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 2 and summary[-1]["adapter_params"] <= BUDGET
    assert all(0.0 <= e["test_acc"] <= 1.0 for e in summary)


def test_select_best_val_and_resume(tmp_path, finished_run):
    """--select best-val ends each cycle on its best validation epoch; a resumed run selects the same."""
    root, _ = finished_run
    extra = f"{MIMI} --select best-val --first-epochs 4"
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_args(root, full, extra)) == 0
    summary = json.loads((full / "summary.json").read_text())
    metrics = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    for e in summary:
        vals = [m["val_acc"] for m in metrics if m["cycle"] == e["cycle"]]
        assert e["selected_epoch"] == 1 + vals.index(max(vals))
        assert e["val_acc"] == pytest.approx(max(vals), abs=1e-9)  # the kept weights are the selected epoch's
    with crash_after_checkpoints(4, Stop()), pytest.raises(Stop):  # mid cycle 0, a best already held
        main(_args(root, cut, extra))
    assert main(["train", "--resume", str(cut)]) == 0
    assert _same_tensors(full / "adapters.safetensors", cut / "adapters.safetensors")


def test_export_float16(finished_run, tmp_path, capsys):
    _, out = finished_run
    assert main(["export", str(out), "--out", str(tmp_path / "task.safetensors")]) == 0
    size = (tmp_path / "task.safetensors").stat().st_size
    assert size < 0.75 * (out / "adapters.safetensors").stat().st_size
    assert "float16" in capsys.readouterr().out


def test_test_every_last_skips_only_the_intermediate_test_passes(tmp_path, finished_run, capsys):
    """--test-every last changes nothing but which test passes run: same weights, same validation, the last
    cycle's test; a skipped cycle's test is recovered from its saved adapters with `mimi eval`."""
    root, full = finished_run
    out = tmp_path / "last"
    assert main(_args(root, out, f"{MIMI} --test-every last")) == 0
    every, last = (json.loads((d / "summary.json").read_text()) for d in (full, out))
    assert len(last) == len(every) >= 3
    assert [e["val_acc"] for e in last] == [e["val_acc"] for e in every]
    assert [e["test_acc"] for e in last[:-1]] == [None] * (len(last) - 1)
    assert last[-1]["test_acc"] == every[-1]["test_acc"]
    assert _same_tensors(full / "adapters.safetensors", out / "adapters.safetensors")
    report = (out / "report.md").read_text()
    assert f"**{100 * every[-1]['test_acc']:.2f}% test**" in report and "| — |" in report
    assert main(["eval", str(out), "--weights", "cycles/cycle_1.safetensors", "--json", str(tmp_path / "c1.json")]) == 0
    assert json.loads((tmp_path / "c1.json").read_text())["acc"] == pytest.approx(every[1]["test_acc"], abs=1e-9)
    capsys.readouterr()
    assert main(_args(root, tmp_path / "bad", f"{MIMI} --test-every sometimes")) == 2
    assert "test_every must be cycle or last" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_test_every_last_still_tests_a_run_cut_by_max_cycles(tmp_path, finished_run):
    root, _ = finished_run
    out = tmp_path / "capped"
    assert main(_args(root, out, f"{MIMI} --test-every last --max-cycles 1")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 2 and summary[-1]["adapter_params"] > BUDGET  # stopped above the budget
    assert summary[0]["test_acc"] is None and summary[-1]["test_acc"] is not None


def test_epoch_lines_name_what_a_method_without_adapters_trains(finished_run, tmp_path, capsys):
    """VPT-deep sized by the budget: the epoch line gives its prompt parameters, not "adapter params 0"."""
    import timm

    import mimi.trainer
    from mimi.config import TrainConfig

    vit = timm.create_model("test_vit", pretrained=False, img_size=32)
    per_token = vit.embed_dim * len(vit.blocks)
    root, _ = finished_run
    cfg = TrainConfig(
        model="test_vit",
        img_size=32,
        data="vtab1k:toy",
        data_root=str(root),
        method="vpt-deep",
        budget_params=2 * per_token + 1,  # room for two tokens a block, not three
        first_epochs=1,
        batch_size=16,
        device="cpu",
        seed=0,
        out=str(tmp_path / "vpt"),
        progress=False,
        tensorboard=False,
    )
    lines: list[str] = []
    mimi.trainer.train(cfg, log=lines.append)
    epoch_lines = [line for line in lines if line.startswith("cycle 0 epoch")]
    assert epoch_lines and all(f"trained params {2 * per_token:,} (no head)" in line for line in epoch_lines)
    assert not any("adapter params 0" in line for line in epoch_lines)

    # `mimi info` lists the prompts by block in numeric order and says what is trained besides the head
    capsys.readouterr()
    assert main(["info", str(tmp_path / "vpt")]) == 0
    text = capsys.readouterr().out.splitlines()
    blocks = [line.split()[0] for line in text if line.startswith("blocks.")]
    assert blocks == [f"blocks.{i}" for i in range(len(vit.blocks))]
    assert text[2].startswith("trained module")
    assert f"trained besides the head: {len(vit.blocks)} modules, {2 * per_token:,} parameters" in text
    assert not any(line.startswith("adapters:") for line in text)
