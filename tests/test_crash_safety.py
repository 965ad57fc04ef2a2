"""Crash safety: SIGKILL at five points then --resume equals an unbroken run; NaN loss and a full disk stop with
one line and keep the last good checkpoint; two bench workers share one run list; offline means offline."""

from __future__ import annotations

import errno
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from vtab_fixture import write_vtab_task

import mimi
from mimi.cli import main

HERE = Path(__file__).parent
TRAIN = "--model test_vit --img-size 32 --batch-size 16 --device cpu --seed 0 --no-progress --data vtab1k:toy"
MIMI = "--method mimi --adapter-dim 8 --budget-params 600 --rho 0.5 --epochs 1 --first-epochs 2 --lr 3e-3"
TIMELESS = ("seconds", "elapsed")


def _argv(root: Path, out: Path, method: str = MIMI) -> list[str]:
    return ["train", *TRAIN.split(), *method.split(), "--data-root", str(root), "--out", str(out)]


def _timeless(obj):
    if isinstance(obj, dict):
        return {k: _timeless(v) for k, v in obj.items() if k not in TIMELESS}
    if isinstance(obj, list):
        return [_timeless(v) for v in obj]
    return obj


def _result(out: Path) -> tuple[dict, list, list]:
    adapters = load_file(str(out / "adapters.safetensors"))
    summary = _timeless(json.loads((out / "summary.json").read_text()))
    metrics = [_timeless(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return adapters, summary, metrics


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    base = tmp_path_factory.mktemp("crash")
    root = write_vtab_task(base / "data")
    assert main(_argv(root, base / "unbroken")) == 0
    return root, _result(base / "unbroken")


# point -> the N-th occurrence to kill at (the run has 6 cycles, 7 epochs of 3 steps, 5 cuts)
KILLS = {"mid-epoch": 8, "evaluation": 6, "after-prune": 2, "checkpoint-write": 5, "final-save": 1}


@pytest.mark.parametrize("point", sorted(KILLS))
def test_sigkill_then_resume_equals_unbroken(point, unbroken, tmp_path):
    root, (adapters, summary, metrics) = unbroken
    out = tmp_path / "run"
    cmd = [sys.executable, str(HERE / "kill_at.py"), point, str(KILLS[point]), "--", *_argv(root, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # really killed there
    assert main(["train", "--resume", str(out)]) == 0
    got_adapters, got_summary, got_metrics = _result(out)
    assert got_adapters.keys() == adapters.keys()
    assert all(torch.equal(got_adapters[k], adapters[k]) for k in adapters)
    assert got_summary == summary
    assert got_metrics == metrics
    assert not list(out.rglob("*.tmp"))  # no temporary file left behind


# --distill: the teacher (the model at the end of cycle 0, or a --teacher run's) is part of the run state
DISTILL = MIMI + " --distill"
# kill -> (point, N): while the teacher's logits are written at the end of cycle 0 (cycle 0 is finished again and the
# teacher made again). Mid-cycle with the teacher read back from the run folder: the taught run below; a kill in
# cycle 0, before any teacher exists, is the plain run's case above.
DISTILL_KILLS = {"teacher-write": ("teacher-write", 1)}


def _taught(teacher: Path) -> str:
    """The equal-epoch small adapter distilled from a MiMi run's cycle-0 model (the fair control)."""
    return f"--method adapter --adapter-dim 2 --epochs 3 --lr 3e-3 --teacher {teacher}:cycles/cycle_0.safetensors"


@pytest.fixture(scope="module")
def unbroken_distilled(unbroken, tmp_path_factory):
    root, _ = unbroken
    base = tmp_path_factory.mktemp("crash_distill")
    assert main(_argv(root, base / "mimi", DISTILL)) == 0
    assert main(_argv(root, base / "adapter", _taught(base / "mimi"))) == 0
    return root, base, _result(base / "mimi"), _result(base / "adapter")


def test_a_distilled_run_differs_from_the_plain_one_after_cycle_0(unbroken, unbroken_distilled):
    _, (plain, plain_summary, _) = unbroken
    _, base, (adapters, summary, _), _ = unbroken_distilled
    assert [c["distilled"] for c in summary] == [False] + [True] * (len(summary) - 1)
    assert {k: v for k, v in summary[0].items() if k != "distilled"} == plain_summary[0]  # cycle 0: CE alone
    assert adapters.keys() != plain.keys() or any(not torch.equal(adapters[k], plain[k]) for k in adapters)
    assert all((base / "mimi" / f).is_file() for f in ("teacher.safetensors", "teacher_logits.safetensors"))


@pytest.mark.parametrize("kill", sorted(DISTILL_KILLS))
def test_sigkill_a_distilled_run_then_resume_equals_unbroken(kill, unbroken_distilled, tmp_path):
    root, _, want, _ = unbroken_distilled
    point, n = DISTILL_KILLS[kill]
    out = tmp_path / "run"
    cmd = [sys.executable, str(HERE / "kill_at.py"), point, str(n), "--", *_argv(root, out, DISTILL)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert main(["train", "--resume", str(out)]) == 0
    got = _result(out)
    assert got[0].keys() == want[0].keys() and all(torch.equal(got[0][k], want[0][k]) for k in want[0])
    assert got[1:] == want[1:]
    assert not list(out.rglob("*.tmp"))


def test_sigkill_a_run_taught_by_another_then_resume_equals_unbroken(unbroken_distilled, tmp_path):
    """Killed mid-training, resumed after the teacher's run folder is gone (it did not survive a move): the run
    reads its teacher back from its own folder."""
    root, base, _, want = unbroken_distilled
    teacher = tmp_path / "teacher"
    shutil.copytree(base / "mimi", teacher)
    out = tmp_path / "run"
    cmd = [sys.executable, str(HERE / "kill_at.py"), "mid-epoch", "5", "--", *_argv(root, out, _taught(teacher))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    shutil.rmtree(teacher)
    assert main(["train", "--resume", str(out)]) == 0
    got = _result(out)
    assert got[0].keys() == want[0].keys() and all(torch.equal(got[0][k], want[0][k]) for k in want[0])
    assert got[1:] == want[1:]


def test_nan_loss_stops_keeps_checkpoint_and_resumes_with_lower_lr(unbroken, tmp_path, capsys, monkeypatch):
    import mimi.training.engine as engine

    root, _ = unbroken
    out = tmp_path / "run"
    real = engine.nn.functional.cross_entropy
    calls = {"n": 0}

    def nan_on_fifth_training_step(logits, y, **kw):
        loss = real(logits, y, **kw)
        if "label_smoothing" in kw:  # training steps (evaluation sums its losses)
            calls["n"] += 1
            if calls["n"] == 5:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(engine.nn.functional, "cross_entropy", nan_on_fifth_training_step)
    assert main(_argv(root, out)) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mimi train: error: the loss became nan") and "--resume" in err[-1] and "--lr" in err[-1]
    meta = json.loads(mimi.read_metadata(out / "checkpoint.safetensors")["position"])
    assert (meta["cycle"], meta["epoch"]) == (0, 1)  # the last good epoch: step 5 is in epoch 2 (3 steps each)
    monkeypatch.undo()
    assert main(["train", "--resume", str(out), "--lr", "1e-3"]) == 0
    assert "lr: 0.001" in (out / "config.yaml").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary[-1]["adapter_params"] <= 600


def test_disk_full_keeps_previous_checkpoint(unbroken, tmp_path, capsys, monkeypatch):
    import mimi.core.taskfile as ckpt

    root, _ = unbroken
    out = tmp_path / "run"
    real, calls, before = ckpt.save_file, {"n": 0}, {}

    def full_on_fourth_checkpoint(tensors, path, metadata=None):
        if ".checkpoint.safetensors." in path:
            calls["n"] += 1
            if calls["n"] == 4:
                before["bytes"] = (out / "checkpoint.safetensors").read_bytes()
                Path(path).write_bytes(b"partial")  # a write cut short by the full disk
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", full_on_fourth_checkpoint)
    assert main(_argv(root, out)) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mimi train: error: cannot write to") and "No space left" in err[-1]
    assert (out / "checkpoint.safetensors").read_bytes() == before["bytes"]  # the last good one, untouched
    assert not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    assert main(["train", "--resume", str(out)]) == 0


def test_two_bench_workers_run_each_run_once(tmp_path):
    root = write_vtab_task(tmp_path / "data")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"name: two\nresults: {tmp_path / 'results'}\nruns: {tmp_path / 'runs'}\n"
        f"defaults: {{model: test_vit, img_size: 32, batch_size: 16, device: cpu, progress: false, epochs: 1, "
        f"data_root: {root}, weights: none}}\n"
        "groups: {g: [vtab1k:toy]}\nseeds: [0, 1, 2]\n"
        "methods: [{label: linear, method: linear}, {label: bitfit, method: bitfit}]\n"
    )
    cmd = [sys.executable, "-m", "mimi", "bench", str(spec), "--quiet", "--no-report"]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), [o[1][-1000:] for o in outs]
    started = [line.split()[-1] for o, _ in outs for line in o.splitlines() if line.startswith("[")]
    assert len(started) == len(set(started)) == 6  # every run started by exactly one worker
    recs = [json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json")]
    assert sorted(r["id"] for r in recs) == sorted(started) and all(r["status"] == "ok" for r in recs)
    assert not list((tmp_path / "results" / ".claims").iterdir())


def test_offline_hub_makes_no_network_call(monkeypatch):
    from mimi.backbones import create_backbone
    from mimi.core.errors import BackboneError

    def no_network(*a, **k):
        raise AssertionError("a network call was made")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(BackboneError, match="vit_tiny_patch16_224.*HF_HUB_OFFLINE"):
        create_backbone("vit_tiny_patch16_224.augreg_in21k", weights="hub")


def test_decompression_bomb_is_one_line(tmp_path, capsys, monkeypatch):
    from PIL import Image

    f = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(f)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own guard, with a limit this image exceeds twice
    task = tmp_path / "t.safetensors"
    import timm

    import mimi

    model = timm.create_model("test_vit", img_size=32, num_classes=3)
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    mimi.save_adapters(model, task)
    argv = ["predict", "--backbone", "test_vit", "--img-size", "32", "--weights", "none", "--task", f"t={task}"]
    assert main([*argv, "--images", str(f), "--out", str(tmp_path / "p.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mimi predict: error: cannot read image") and "decompression bomb" in err[-1].lower()
    assert not (tmp_path / "p.jsonl").exists()
