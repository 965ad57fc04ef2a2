"""DDP through the pruning cycles: torchrun with 2 CPU processes (gloo) on the tiny model and a written folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from vtab_fixture import write_vtab_task

from mimi.cli import main

HERE = Path(__file__).parent
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
TRAIN = "--model test_vit --img-size 32 --batch-size 16 --device cpu --seed 0 --no-progress --data vtab1k:toy"
MIMI = "--method mimi --adapter-dim 8 --budget-params 1500 --rho 0.5 --epochs 2 --first-epochs 3 --lr 3e-3"


def _torchrun(dump: Path, argv: list[str], *probe: str) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000)]
    cmd += [str(HERE / "ddp_entry.py"), str(dump), *probe, "--", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _train(root: Path, out: Path) -> list[str]:
    return ["train", *TRAIN.split(), *MIMI.split(), "--data-root", str(root), "--out", str(out)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    root = write_vtab_task(base / "data")
    proc = _torchrun(base, _train(root, base / "ddp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base, root, proc


def test_ddp_run_one_folder_identical_ranks(ddp_run):
    base, _, proc = ddp_run
    out = base / "ddp"
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in base.iterdir() if p.is_dir()) == ["data", "ddp"]  # one run folder
    ranks = [load_file(str(base / f"rank{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # identical adapters on both ranks
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) >= 3 and summary[-1]["adapter_params"] <= 1500  # >= 2 cuts, on budget
    saved = load_file(str(out / "adapters.safetensors"))
    assert all(torch.equal(saved[k], ranks[0][k]) for k in saved)
    assert proc.stderr.count("== cycle 0") == 1  # only rank 0 logs (progress lines go to stderr)


def test_ddp_matches_single_process_with_the_same_global_batch(ddp_run, tmp_path):
    """Same global batches, same first step (to float rounding); the runs then agree on the schedule and accuracy.

    Per-adapter sizes are not compared: two halves summed by all-reduce round differently from one batch, and
    Adam turns those 1e-8 differences on near-zero gradients (down-projections behind a zero up-projection) into
    full-size updates, so which neuron ranks first can differ while budget and accuracy agree.
    """
    base, root, _ = ddp_run
    single = tmp_path / "single"
    assert main(_train(root, single)) == 0
    a = json.loads((base / "ddp" / "summary.json").read_text())
    b = json.loads((single / "summary.json").read_text())
    assert len(a) == len(b) and a[-1]["adapter_params"] <= 1500 and b[-1]["adapter_params"] <= 1500
    # each cut aims at rho of what is left (whole neurons): the counts agree to a few neurons
    assert all(abs(x["adapter_params"] - y["adapter_params"]) <= 0.05 * x["adapter_params"] for x, y in zip(a, b))
    assert abs(a[-1]["test_acc"] - b[-1]["test_acc"]) <= 0.02


def test_a_killed_rank_then_resume_under_torchrun_equals_unbroken(ddp_run, tmp_path):
    base, root, _ = ddp_run
    out = tmp_path / "run"
    proc = _torchrun(tmp_path, _train(root, out), "1", "7")  # rank 1 dies inside its 7th step (cycle 1)
    assert proc.returncode != 0
    proc = _torchrun(tmp_path, ["train", "--resume", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = load_file(str(base / "ddp" / "adapters.safetensors")), load_file(str(out / "adapters.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def _grad_worker(rank: int, world: int, init: str, x: torch.Tensor, y: torch.Tensor, out: str) -> None:
    import mimi
    from mimi.core.scores import GradientAccumulator
    from mimi.training.loop import Trainer  # noqa: F401  (the module under test imports cleanly in a worker)

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model = _tiny()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    acc = GradientAccumulator(model)
    for step in range(3):  # three global batches of 8, each rank its half
        xb, yb = x[step * 8 : (step + 1) * 8][rank::world], y[step * 8 : (step + 1) * 8][rank::world]
        ddp.zero_grad()
        torch.nn.functional.cross_entropy(ddp(xb), yb).backward()
        acc.update()
    if rank == 0:
        torch.save({k: v for k, v in mimi.score_neurons(model, "gradient", accumulator=acc).items()}, out)
    dist.destroy_process_group()


def _tiny() -> torch.nn.Module:
    import timm

    import mimi

    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, num_classes=3)
    mimi.add_adapters(model, mimi.AdapterConfig(hidden_dim=4, init_seed=0))
    with torch.no_grad():
        for _, a in mimi.adapters(model):
            a.up.weight.normal_(0, 0.1)
    return model


def test_gradient_score_under_ddp_equals_single_process(tmp_path):
    from mimi.core.scores import GradientAccumulator, score_neurons

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, 32, 32, generator=g), torch.randint(0, 3, (24,), generator=g)
    out = tmp_path / "ddp_scores.pt"
    mp.spawn(_grad_worker, args=(2, f"file://{tmp_path / 'rdzv'}", x, y, str(out)), nprocs=2, join=True)
    model = _tiny()
    acc = GradientAccumulator(model)
    for step in range(3):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[step * 8 : (step + 1) * 8]), y[step * 8 : (step + 1) * 8]).backward()
        acc.update()
    want = score_neurons(model, "gradient", accumulator=acc)
    got = torch.load(out, weights_only=True)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-7)
