"""--distill: the loss against a hand computation, the options and their checks, the teacher's files and logits, the
fair control (--teacher RUN:cycles/cycle_0.safetensors) and the teacher's logits under DDP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from vtab_fixture import write_vtab_task

import mimi
from mimi.cli import main
from mimi.config import DistillOptions, TrainConfig
from mimi.core.errors import ConfigError
from mimi.training import distill
from mimi.training.distributed import World
from mimi.training.engine import Indexed, loader

TRAIN = "--model test_vit --img-size 32 --batch-size 16 --device cpu --seed 0 --no-progress --data vtab1k:toy"
MIMI = "--method mimi --adapter-dim 8 --budget-params 3000 --rho 0.5 --epochs 1 --first-epochs 1 --lr 3e-3"
ADAPTER = "--method adapter --adapter-dim 2 --epochs 2 --lr 3e-3"


def _argv(root: Path, out: Path, method: str, *extra: str) -> list[str]:
    return ["train", *TRAIN.split(), *method.split(), *extra, "--data-root", str(root), "--out", str(out)]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    base = tmp_path_factory.mktemp("distill")
    root = write_vtab_task(base / "data")
    write_vtab_task(root, "four", n_classes=4, sizes={"train800": 8, "val200": 4, "test": 4})
    assert main(_argv(root, base / "mimi", MIMI, "--distill")) == 0
    return root, base


def test_loss_is_the_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.tensor([0, 2, 1, 1])
    a, temp = 0.3, 2.5
    ce = -sum(math.log(torch.softmax(s[i], 0)[y[i]]) for i in range(4)) / 4
    ps, pt = torch.softmax(s / temp, 1), torch.softmax(t / temp, 1)
    kl = sum(float(pt[i, c] * (pt[i, c].log() - ps[i, c].log())) for i in range(4) for c in range(3)) / 4
    got = distill.distillation_loss(s, y, t, alpha=a, temp=temp)
    assert got.item() == pytest.approx((1 - a) * ce + a * temp**2 * kl, rel=1e-5)
    assert distill.distillation_loss(s, y, t, alpha=0.0, temp=temp).item() == pytest.approx(ce, rel=1e-6)
    assert distill.distillation_loss(s, y, s, alpha=1.0, temp=temp).item() == pytest.approx(0.0, abs=1e-6)


def test_options_are_typed_validated_and_recorded(tmp_path):
    with pytest.raises(ConfigError, match="distill_alpha must be in"):
        DistillOptions(alpha=1.5)
    with pytest.raises(ConfigError, match="distill_temp must be > 0"):
        TrainConfig(distill=True, distill_temp=0.0)
    assert TrainConfig().distill_options() is None
    cfg = TrainConfig(teacher="runs/a:cycles/cycle_0.safetensors")  # a teacher asks for distillation
    assert cfg.distill and cfg.distill_options() == DistillOptions(0.5, 2.0, "runs/a:cycles/cycle_0.safetensors")
    cfg.save(tmp_path / "config.yaml")
    assert TrainConfig.load(tmp_path / "config.yaml").distill_options() == cfg.distill_options()
    assert distill.parse_teacher("r") == (Path("r"), Path("r/adapters.safetensors"))
    assert distill.parse_teacher("r:cycles/cycle_0.safetensors") == (Path("r"), Path("r/cycles/cycle_0.safetensors"))


def test_a_teacher_that_cannot_teach_is_one_line_before_anything_is_written(distilled, tmp_path, capsys):
    root, base = distilled
    teacher = base / "mimi"
    cases = [
        (ADAPTER + " --distill", "name the teacher with --teacher"),
        (ADAPTER + f" --teacher {teacher} --img-size 48", "another backbone (img_size 32; this run: 48)"),
        (ADAPTER + f" --teacher {teacher}:cycles/cycle_9.safetensors", "no file"),
        (ADAPTER + f" --teacher {tmp_path}", "not a run folder"),
        (ADAPTER + " --distill-alpha 2", "distill_alpha must be in [0, 1]"),
    ]
    for i, (method, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        assert main(_argv(root, out, method)) == 2, method
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()
    out = tmp_path / "four"
    argv = _argv(root, out, ADAPTER, "--teacher", str(teacher))
    assert main([a if a != "vtab1k:toy" else "vtab1k:four" for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its head has 3 classes, this task 4" in err[0] and not out.exists()


def test_the_teacher_is_saved_and_its_logits_are_its_own(distilled):
    root, base = distilled
    out = base / "mimi"
    summary = json.loads((out / "summary.json").read_text())
    assert [c["distilled"] for c in summary] == [False] + [True] * (len(summary) - 1) and len(summary) >= 3
    meta = mimi.read_metadata(out / "adapters.safetensors")
    assert json.loads(meta["distill"]) == {"alpha": 0.5, "temp": 2.0, "teacher": None}
    assert "distill: true" in (out / "config.yaml").read_text()
    # teacher.safetensors holds the tensors of cycle 0; the cached logits are that model's, row i for image i
    teacher, cycle0 = load_file(str(out / "teacher.safetensors")), load_file(str(out / "cycles/cycle_0.safetensors"))
    assert teacher.keys() == cycle0.keys() and all(torch.equal(teacher[k], cycle0[k]) for k in teacher)
    logits = distill.load_teacher(out, cached=True, n_train=48, device=torch.device("cpu")).logits
    rebuilt = distill.load_teacher(out, cached=False, n_train=48, device=torch.device("cpu"))  # the per-batch path
    run = mimi.trainer.load_run(out, weights="cycles/cycle_0.safetensors")
    xs = torch.stack([run.task.train[i][0] for i in range(48)])
    with torch.no_grad():
        torch.testing.assert_close(logits, run.model.eval()(xs), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rebuilt(xs, None), logits, rtol=1e-4, atol=1e-5)


def test_indexed_data_keeps_the_seeded_order():
    data = [(torch.tensor([float(i)]), i % 3) for i in range(37)]
    plain = [y.tolist() for _, y in loader(data, batch_size=8, shuffle=True, seed=5)]
    indexed = list(loader(Indexed(data), batch_size=8, shuffle=True, seed=5))
    assert [y.tolist() for _, y, _ in indexed] == plain
    assert all(torch.equal(x[:, 0].long(), i) for x, _, i in indexed)  # each index is its item's own


def test_the_fair_control_learns_from_the_cycle0_file_and_alpha_0_is_plain(distilled, tmp_path):
    root, base = distilled
    spec = f"{base / 'mimi'}:cycles/cycle_0.safetensors"
    assert main(_argv(root, tmp_path / "plain", ADAPTER)) == 0
    assert main(_argv(root, tmp_path / "alpha0", ADAPTER, "--teacher", spec, "--distill-alpha", "0")) == 0
    plain, alpha0 = (load_file(str(tmp_path / n / "adapters.safetensors")) for n in ("plain", "alpha0"))
    assert all(torch.equal(alpha0[k], plain[k]) for k in plain)  # the same batches (indexed), the same loss
    rows = load_file(str(tmp_path / "alpha0" / "teacher_logits.safetensors"))["logits"]
    assert torch.equal(rows, load_file(str(base / "mimi" / "teacher_logits.safetensors"))["logits"])
    meta = json.loads(mimi.read_metadata(tmp_path / "alpha0" / "adapters.safetensors")["distill"])
    assert meta == {"alpha": 0.0, "temp": 2.0, "teacher": spec}


def _logits_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model, data = _tiny()
    table = distill.compute_logits(
        model, data, num_classes=3, device=torch.device("cpu"), batch_size=4, amp_dtype=None, world=World(rank, world)
    )
    if rank == 1:  # every rank holds the whole table
        torch.save(table, out)
    dist.destroy_process_group()


def _tiny():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, num_classes=3).eval()
    g = torch.Generator().manual_seed(1)
    return model, [(torch.randn(3, 32, 32, generator=g), i % 3) for i in range(11)]


def test_teacher_logits_under_ddp_are_each_ranks_share_summed(tmp_path):
    out = tmp_path / "table.pt"
    mp.spawn(_logits_worker, args=(2, f"file://{tmp_path / 'rdzv'}", str(out)), nprocs=2, join=True)
    model, data = _tiny()
    want = distill.compute_logits(
        model, data, num_classes=3, device=torch.device("cpu"), batch_size=4, amp_dtype=None, world=World()
    )
    torch.testing.assert_close(torch.load(out, weights_only=True), want, rtol=1e-5, atol=1e-6)
