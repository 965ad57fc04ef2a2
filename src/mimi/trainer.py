"""The public entry points of training: start a run, resume one, reload one, evaluate one.

Run folder::

    config.yaml          the resolved configuration
    run.json             backbone, data and adapter layout facts
    metrics.jsonl        one line per epoch
    summary.json         one entry per cycle (params, sizes, val/test accuracy, seconds)
    cycles/cycle_K.safetensors, adapters.safetensors (final)
    budgets/<params>.safetensors   a run of several budgets: the task finished at each (summary entries say which)
    teacher.safetensors, teacher_logits.safetensors   --distill: the teacher and its cached logits
    checkpoint.safetensors   last epoch: trained tensors + optimizer state (resume)
    plots/*.png, report.md
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from mimi.config import TrainConfig
from mimi.core import taskfile as ckpt
from mimi.core.adapters import adapter_param_count, count_trainable
from mimi.core.errors import CheckpointError, ConfigError
from mimi.core.files import atomic_write_json, remove_stale_temp_files
from mimi.core.int8_backbone import check_backbone_dtype, quantize_backbone
from mimi.training import distill, distributed
from mimi.training.engine import (
    evaluate,
)
from mimi.training.loop import Trainer
from mimi.training.run import Run, build_run, preflight
from mimi.training.state import read_checkpoint, read_json, truncate_metrics

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- the run


# ---------------------------------------------------------------- entry points


def train(cfg: TrainConfig, *, log: Callable[[str], None] | None = None) -> list[dict]:
    """Start a new run in ``cfg.out`` (which must not hold a run already).

    Args:
        cfg: the run's configuration.
        log: receives the run's progress lines (default: the ``mimi.trainer`` and ``mimi.training.loop`` loggers at INFO; the command line
            shows them on stderr).

    Returns:
        The run summary: one entry per cycle (parameters, sizes, validation and test accuracy, seconds).
    """
    out = Path(cfg.out)
    if (out / "config.yaml").exists():
        raise ConfigError(
            f"{out} already holds a run; continue it with `mimi train --resume {out}` or pick another --out"
        )
    preflight(cfg)  # names, flags, data listing, budget, teacher, output folder: before any weights load or decode
    distill.remove_saved(out)  # a new run makes its teacher again (an attempt stopped before its first checkpoint)
    world, device = distributed.init(cfg.device)
    run = build_run(cfg, device=device)
    trainer = Trainer(run, log=log, world=world)  # validates the budget before anything is written
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
        info = {**run.info, "budget": trainer.budget, "world_size": world.size, "config_sha256": _sha(out)}
        if len(trainer.budgets) > 1:
            info["budgets"] = trainer.budgets
        atomic_write_json(out / "run.json", info)
        (out / "metrics.jsonl").write_text("")
    distributed.barrier(world)
    trainer.log(
        f"{cfg.method} on {run.task.name}: {run.info['n_train']} train / {run.info['n_val']} val / "
        f"{run.info['n_test']} test, {run.task.num_classes} classes | {cfg.model} ({run.info['weights_source']}) "
        f"at {run.info['img_size']}px on {run.device} | trainable {count_trainable(run.model):,}"
        + (
            f" | budget {trainer.budget:,}: targets {trainer.pruner.planned_targets(adapter_param_count(run.model))}"
            if trainer.pruner
            else ""
        )
    )
    return trainer.fit()


def _sha(out: Path) -> str:
    import hashlib

    return hashlib.sha256((out / "config.yaml").read_bytes()).hexdigest()


def resume(run_dir: str | Path, *, lr: float | None = None, log: Callable[[str], None] | None = None) -> list[dict]:
    """Continue an interrupted run from its last checkpoint; the result equals an unbroken run.

    Args:
        run_dir: the run folder.
        lr: a new peak learning rate from here on (e.g. after the loss became NaN); the only setting a resumed
            run may change. It is written to the run's config.yaml.
    """
    out = Path(run_dir)
    path = out / "checkpoint.safetensors"
    if not (out / "config.yaml").is_file():
        raise CheckpointError(f"{out}: no resumable run here (no config.yaml); start one with `mimi train --out {out}`")
    info = read_json(out / "run.json", {})
    if info.get("config_sha256") not in (None, _sha(out)):
        raise ConfigError(
            f"{out}/config.yaml was edited since the run started; a run resumes with its own config: restore the "
            "file, or start a new run with another --out (only --lr may change on resume)"
        )
    cfg = TrainConfig.load(out / "config.yaml")
    world, device = distributed.init(cfg.device)  # any number of processes: the checkpoint is the same for all
    log = (log or logger.info) if world.main else (lambda *a, **k: None)
    if lr is not None and lr != cfg.lr:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "lr": lr})
        log(f"learning rate changed to {lr:g} from here on")
    if world.main:
        remove_stale_temp_files(out)  # a kill inside a write leaves its temporary file; the real one is intact
        if lr is not None:
            cfg.save(out / "config.yaml")
            atomic_write_json(out / "run.json", {**info, "config_sha256": _sha(out)})
    distributed.barrier(world)
    if not path.is_file():  # stopped before its first checkpoint: nothing to continue, start it again
        log(f"{out} has no checkpoint yet: starting the run from the beginning")
        if world.main:
            (out / "config.yaml").unlink()
            (out / "run.json").unlink(missing_ok=True)
        distributed.barrier(world)
        return train(cfg, log=log)
    saved = read_checkpoint(path)
    run = build_run(cfg, sizes=saved.sizes, device=device)
    ckpt.restore_trained(run.model, path, meta=saved.meta, tensors=saved.tensors)
    trainer = Trainer(run, log=log, world=world)
    cursor = saved.restore(trainer)
    trainer.summary = [e for e in read_json(out / "summary.json", []) if e["cycle"] < saved.done_cycles]
    if world.main:
        truncate_metrics(out / "metrics.jsonl", saved.position)
    log(
        f"resuming {out} at cycle {saved.position['cycle']} epoch {saved.position['epoch']}"
        + (" (cycle complete)" if saved.position["cycle_done"] else "")
    )
    return trainer.fit(resume_from=cursor)


def budget_weights(run_dir: str | Path, budget: int) -> str:
    """The file, in a run folder, of the task a run of several budgets finished at ``budget`` (adapter parameters).

    Raises:
        ConfigError: the run kept no task at that budget (the message lists those it kept).
    """
    out = Path(run_dir)
    if not (out / "config.yaml").is_file():
        raise CheckpointError(f"{out}: not a run folder (no config.yaml)")
    rel = f"budgets/{budget}.safetensors"
    if not (out / rel).is_file():
        kept = sorted((int(p.stem) for p in (out / "budgets").glob("*.safetensors") if p.stem.isdigit()), reverse=True)
        have = (
            f"it kept {', '.join(map(str, kept))}" if kept else "it kept none (a run of one budget: leave out --budget)"
        )
        raise ConfigError(f"{out}: no task at budget {budget} ({rel}); {have}")
    return rel


def load_run(
    run_dir: str | Path, *, weights: str = "adapters.safetensors", budget: int | None = None, device: str | None = None
) -> Run:
    """Rebuild a finished (or interrupted) run's model from its folder, for evaluation: its final adapters, another
    file of the folder (``weights``), or the task a run of several budgets kept at ``budget``; on ``device``
    (default: the run's own setting)."""
    out = Path(run_dir)
    if not (out / "config.yaml").is_file():
        raise CheckpointError(f"{out}: not a run folder (no config.yaml)")
    if budget is not None:
        weights = budget_weights(out, budget)
    path = out / weights if not Path(weights).is_absolute() else Path(weights)
    cfg = TrainConfig.load(out / "config.yaml")
    cfg.progress = False
    if device is not None:
        cfg.device = device
    meta = ckpt.read_metadata(path)
    run = build_run(cfg, sizes=json.loads(meta["sizes"]) if json.loads(meta["adapter_config"]) else None)
    ckpt.restore_trained(run.model, path, meta=meta)
    return run


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str = "test",
    weights: str = "adapters.safetensors",
    budget: int | None = None,
    backbone_dtype: str = "float32",
    engine: str | None = None,
) -> dict:
    """Accuracy of a run's saved adapters on one split (``val`` or ``test``); ``budget``: the task a run of several
    budgets kept at that budget; ``backbone_dtype="int8"``: the frozen backbone quantised first (CPU only; see
    :func:`mimi.core.int8_backbone.quantize_backbone`, whose ``engine`` is passed on)."""
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test, got {split!r}")
    check_backbone_dtype(backbone_dtype, "cpu", engine)
    if budget is not None:
        weights = budget_weights(run_dir, budget)
    # an int8 backbone runs on the CPU, whatever device the run trained on
    run = load_run(run_dir, weights=weights, device="cpu" if backbone_dtype == "int8" else None)
    quantize_backbone(run.model, backbone_dtype, engine=engine)
    res = evaluate(
        run.model,
        getattr(run.task, split),
        num_classes=run.task.num_classes,
        device=run.device,
        batch_size=run.cfg.eval_batch_size,
        amp_dtype=run.amp_dtype,
    )
    return {"run": str(run_dir), "split": split, "weights": weights, "backbone_dtype": backbone_dtype, **res}
