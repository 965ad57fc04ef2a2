"""``torchrun ... ddp_entry.py DUMP_DIR [KILL_RANK KILL_STEP] -- train ...``: the real CLI under torchrun, plus two
test probes. Each rank writes its final trained tensors to DUMP_DIR/rank<R>.safetensors (so a test can compare the
ranks), and rank KILL_RANK SIGKILLs itself inside its KILL_STEP-th optimizer step (a rank that dies mid-run)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import mimi.trainer as trainer
from mimi.cli import main
from mimi.core.taskfile import trained_state

split = sys.argv.index("--")
probe, args = sys.argv[1:split], sys.argv[split + 1 :]
dump, rank = Path(probe[0]), int(os.environ.get("RANK", "0"))

fit = trainer.Trainer.fit


def fit_and_dump(self, *a, **k):
    summary = fit(self, *a, **k)
    save_file(trained_state(self.run.model), str(dump / f"rank{rank}.safetensors"))
    return summary


trainer.Trainer.fit = fit_and_dump

if len(probe) == 3 and int(probe[1]) == rank:
    step, calls = torch.optim.AdamW.step, {"n": 0}

    def step_then_die(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == int(probe[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *a, **k)

    torch.optim.AdamW.step = step_then_die

sys.exit(main(args))
