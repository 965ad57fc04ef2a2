"""Run ``mimi ARGS`` and SIGKILL this very process at a chosen point (used by test_crash_safety).

    python kill_at.py POINT N -- train ...

POINT: mid-epoch (inside the N-th optimizer step), evaluation (N-th evaluation), after-prune (right after the N-th
cut), checkpoint-write (the N-th checkpoint's temporary file written, not yet renamed), final-save (the final
adapters' temporary file written, not yet renamed), teacher-write (the N-th temporary file of the cached teacher
logits written, not yet renamed).
"""

from __future__ import annotations

import os
import signal
import sys

import torch

import mimi.core.files as io_utils
import mimi.core.schedule as schedule
import mimi.training.loop as loop
from mimi.cli import main

point, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[4:]
calls = {"n": 0}


def hit() -> bool:
    calls["n"] += 1
    return calls["n"] == n


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if point == "mid-epoch":
    step = torch.optim.AdamW.step

    def patched_step(self, *a, **k):
        if hit():
            die()
        return step(self, *a, **k)

    torch.optim.AdamW.step = patched_step
elif point == "evaluation":
    evaluate = loop.evaluate

    def patched_evaluate(*a, **k):
        if hit():
            die()
        return evaluate(*a, **k)

    loop.evaluate = patched_evaluate
elif point == "after-prune":
    prune_step = schedule.MiMiPruner.step

    def patched_prune(self, *a, **k):
        sizes = prune_step(self, *a, **k)
        if hit():
            die()
        return sizes

    schedule.MiMiPruner.step = patched_prune
elif point in ("checkpoint-write", "final-save", "teacher-write"):
    target = {
        "checkpoint-write": ".checkpoint.safetensors.",
        "final-save": ".adapters.safetensors.",
        "teacher-write": ".teacher_logits.safetensors.",
    }[point]
    fsync = io_utils._fsync

    def patched_fsync(path, *, directory=False):
        if not directory and target in str(path) and hit():
            die()  # the temporary file is complete on disk; the rename has not happened
        return fsync(path, directory=directory)

    io_utils._fsync = patched_fsync
else:
    raise SystemExit(f"unknown point {point}")

sys.exit(main(args))
