"""Pinned numbers of one seeded tiny MiMi run through the real CLI (as torchtune's recipe tests pin losses).

The run is the one of tests/test_cli_train.py: timm's test_vit at 32 px on a 3-class colour task, adapters of 16
pruned by rho 0.5 down to 500 parameters. Its per-epoch losses and accuracies and its per-cycle accuracies,
parameter counts and adapter sizes are compared with tests/expected/pinned_mimi_tiny.json, so any change of the
numbers (initialisation, data order, scores, pruning, the schedule, the optimiser) fails here, even one that keeps
every behavioural test green. Losses may differ by rel 1e-4 / abs 1e-5 (other CPUs, thread counts or BLAS builds
sum in another order); accuracies, parameter counts and sizes must be exact.

An intended change of the numbers is recorded by running this file with ``MIMI_REGEN_PINNED=1`` (it rewrites the
expected file and skips), and committing the new file with the reason in the message.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
from vtab_fixture import write_vtab_task

from mimi.cli import main

EXPECTED = Path(__file__).parent / "expected" / "pinned_mimi_tiny.json"
ARGS = (
    "--model test_vit --img-size 32 --data vtab1k:toy --batch-size 16 --device cpu --seed 0 --no-progress "
    "--method mimi --adapter-dim 16 --budget-params 500 --rho 0.5 --epochs 1 --first-epochs 3 --lr 3e-3"
).split()
LOSS_REL, LOSS_ABS = 1e-4, 1e-5
TOLERANCE = (
    f"train_loss: within rel {LOSS_REL:g} or abs {LOSS_ABS:g}; "
    "val_acc, test_acc, adapter_params, sizes: exact (equal floats / ints)"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = write_vtab_task(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("runs") / "run"
    old = os.umask(0o022)  # a shared machine's usual umask: the run folder's modes are checked below
    try:
        assert main(["train", *ARGS, "--data-root", str(root), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    return out


def _observed(out: Path) -> dict:
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {
        "epochs": [{k: m[k] for k in ("cycle", "epoch", "train_loss", "val_acc", "adapter_params")} for m in metrics],
        "cycles": [{k: c[k] for k in ("cycle", "val_acc", "test_acc", "adapter_params", "sizes")} for c in summary],
    }


def test_numbers_match_the_pinned_run(run):
    observed = _observed(run)
    if os.environ.get("MIMI_REGEN_PINNED") == "1":
        EXPECTED.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "_comment": "written by MIMI_REGEN_PINNED=1 pytest tests/test_pinned_numbers.py; see that file",
            "tolerance": TOLERANCE,
            "args": ARGS,
            **observed,
        }
        EXPECTED.write_text(json.dumps(doc, indent=1) + "\n")
        pytest.skip(f"regenerated {EXPECTED}")
    expected = json.loads(EXPECTED.read_text())
    assert expected["args"] == ARGS, "the pinned file was made with other arguments: regenerate it"

    # Structure first, so a changed schedule says so instead of failing on the first differing number.
    key = ("cycle", "epoch", "adapter_params")
    assert [tuple(e[k] for k in key) for e in observed["epochs"]] == [
        tuple(e[k] for k in key) for e in expected["epochs"]
    ]
    for got, want in zip(observed["epochs"], expected["epochs"], strict=True):
        where = f"cycle {want['cycle']} epoch {want['epoch']}"
        assert math.isclose(got["train_loss"], want["train_loss"], rel_tol=LOSS_REL, abs_tol=LOSS_ABS), (
            f"{where}: train_loss {got['train_loss']!r} != pinned {want['train_loss']!r}"
        )
        assert got["val_acc"] == want["val_acc"], f"{where}: val_acc"
    assert observed["cycles"] == expected["cycles"]


def test_run_folder_is_readable_by_others(run):
    """Under umask 022 every file the run wrote is 0644 (atomic writes used to leave 0600 files)."""
    modes = {str(p.relative_to(run)): stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*") if p.is_file()}
    assert {"summary.json", "adapters.safetensors", "cycles/cycle_0.safetensors", "run.json"} <= set(modes)
    assert {name: oct(m) for name, m in modes.items() if m != 0o644} == {}
