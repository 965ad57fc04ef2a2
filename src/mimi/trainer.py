"""A training run: backbone + method + data, the MiMi cycles, honest evaluation, resumable checkpoints.

Run folder::

    config.yaml          the resolved configuration
    run.json             backbone, data and adapter layout facts
    metrics.jsonl        one line per epoch
    summary.json         one entry per cycle (params, sizes, val/test accuracy, seconds)
    cycles/cycle_K.safetensors, adapters.safetensors (final)
    checkpoint.safetensors   last epoch: trained tensors + optimizer state (resume)
    plots/*.png, report.md
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed
from .adapters import adapter_param_count, adapter_roles, adapters, count_trainable, uniform_adapter_params
from .backbones import (
    backbone_param_count,
    check_img_size,
    check_weights_source,
    create_backbone,
    model_img_size,
    preprocessing,
)
from .config import TrainConfig
from .data import TaskData, build_task
from .distributed import World
from .engine import (
    StepContext,
    autocast_dtype,
    evaluate,
    loader,
    make_optimizer,
    resolve_device,
    train_epoch,
    warmup_cosine,
)
from .errors import CheckpointError, ConfigError, TrainingError
from .io_utils import atomic_write_json, remove_stale_temp_files
from .methods import Method, get_method
from .run_state import optimizer_state, read_json, save_checkpoint, truncate_metrics
from .schedule import MiMiPruner
from .scores import SCORES, GradientAccumulator
from .shrink import apply_plan


@dataclass
class Run:
    """Everything built for one run: the live objects the loop works on."""

    cfg: TrainConfig
    model: nn.Module
    task: TaskData
    method: Method
    device: torch.device
    amp_dtype: torch.dtype | None
    backbone_params: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def task_metadata(run: Run) -> dict[str, str]:
    """What a task file records beside its tensors, so that it can be served without the run folder."""
    meta = {
        "method": run.cfg.method,
        "model": run.cfg.model,
        "weights_source": str(run.info.get("weights_source", "")),
        "img_size": str(run.info.get("img_size", "")),
        "data": run.task.name,
    }
    if run.task.classes:
        meta["classes"] = json.dumps(list(run.task.classes))
    return meta


def steps_per_epoch(cfg: TrainConfig, task: TaskData) -> int:
    return math.ceil(len(task.train) / cfg.batch_size)


def cycle_epochs(cfg: TrainConfig, cycle: int) -> int:
    return cfg.first_epochs if cycle == 0 and cfg.first_epochs is not None else cfg.epochs


def preflight(cfg: TrainConfig) -> None:
    """Every check that needs no weights and no decoded image, so that bad input fails in seconds, writing nothing.

    Names (method, score, model, dataset, weights source), flags that depend on the model (image size against the
    patch size; a pruning budget against the adapters at insertion and the cheapest neuron), the data listing
    (split files, image files, labels, paths) and whether the output folder can be created.
    """
    if not cfg.data:
        raise ConfigError("no dataset given: pass --data (e.g. vtab1k:TASK with --data-root DIR)")
    method = get_method(cfg.method)
    if cfg.score not in SCORES:
        raise ConfigError(f"unknown score {cfg.score!r}; choose one of {', '.join(sorted(SCORES))}")
    check_weights_source(cfg.weights)
    with torch.device("meta"):  # the architecture alone: no memory, no weights
        model, _ = create_backbone(cfg.model, weights="none", img_size=cfg.img_size, model_kwargs=cfg.model_kwargs)
    check_img_size(model, cfg.model)
    task = build_task(
        cfg.data,
        root=cfg.data_root,
        img_size=model_img_size(model),
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        trainval=cfg.trainval,
        check_only=True,
    )
    if method.prunes:
        model.reset_classifier(task.num_classes)
        with torch.device("meta"):
            model = method.prepare(model, cfg, total_steps=1)
        check_budget(cfg, model)
    probe_out(Path(cfg.out))


def check_budget(cfg: TrainConfig, model: nn.Module) -> None:
    """A pruning run must have something to prune, and must keep at least one neuron."""
    budget = resolve_budget(cfg, model)
    if budget is None:
        raise ConfigError(f"method {cfg.method} needs a budget: pass --budget-params N or --budget-dim H")
    start = adapter_param_count(model)
    cheapest = min((a.num_params(1) for _, a in adapters(model)), default=0)
    if budget >= start:
        raise ConfigError(
            f"budget {budget:,} is at or above the {start:,} adapter parameters at insertion: nothing to prune; "
            "lower --budget-params / --budget-dim, raise --adapter-dim, or train with --method adapter"
        )
    if budget < cheapest:
        raise ConfigError(
            f"budget {budget:,} is below the cheapest adapter neuron ({cheapest:,} parameters): every adapter would "
            "be removed; raise the budget, or train only the head with --method linear"
        )


def probe_out(out: Path) -> None:
    """Raise if the output folder cannot be created; leave nothing behind."""
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out} is a file; pick a folder")
        return
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:
        Path(tempfile.mkdtemp(prefix=".mimi-probe-", dir=ancestor)).rmdir()
    except OSError as e:
        raise ConfigError(
            f"--out {out}: cannot create the output folder in {ancestor} ({e.strerror}); pick a folder you can write to"
        ) from e


def build_run(cfg: TrainConfig, *, sizes: dict[str, int] | None = None, device: torch.device | None = None) -> Run:
    """Create the backbone, load the task with the backbone's preprocessing, and apply the method."""
    if not cfg.data:
        raise ConfigError("no dataset given: pass --data (e.g. vtab1k:TASK with --data-root DIR)")
    method = get_method(cfg.method)  # cheap checks first: fail before loading a backbone or decoding data
    torch.manual_seed(cfg.seed)
    model, source = create_backbone(
        cfg.model, weights=cfg.weights, img_size=cfg.img_size, model_kwargs=cfg.model_kwargs
    )
    img_size = model_img_size(model)
    mean, std = preprocessing(model)
    task = build_task(
        cfg.data,
        root=cfg.data_root,
        img_size=img_size,
        mean=mean,
        std=std,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        trainval=cfg.trainval,
        progress=cfg.progress,
    )
    backbone_params = backbone_param_count(model)
    torch.manual_seed(cfg.seed)  # the head and the adapters start the same whatever the data loading did
    model.reset_classifier(task.num_classes)
    total_steps = cycle_epochs(cfg, 0) * steps_per_epoch(cfg, task)
    model = method.prepare(model, cfg, total_steps=max(1, total_steps))
    layout = [{"name": n, "role": r} for n, r in adapter_roles(model).items()]
    head = model.get_classifier()
    # trainable head parameters only: PEFT keeps a frozen copy of the head beside the trained one
    head_params = sum(p.numel() for p in head.parameters() if p.requires_grad) if isinstance(head, nn.Module) else 0
    if sizes is not None:
        apply_plan(model, {n: list(range(h)) for n, h in sizes.items()})
    device = device or resolve_device(cfg.device)  # under torchrun: this rank's device
    model.to(device)
    info = {
        "model": cfg.model,
        "method": cfg.method,
        "weights_source": source,
        "img_size": img_size,
        "mean": mean,
        "std": std,
        "backbone_params": backbone_params,
        "head_params": head_params,
        "num_classes": task.num_classes,
        "data": task.name,
        "n_train": len(task.train),
        "n_val": len(task.val),
        "n_test": len(task.test),
        "layout": layout,
        "device": str(device),
    }
    return Run(cfg, model, task, method, device, autocast_dtype(device, cfg.precision), backbone_params, info)


def resolve_budget(cfg: TrainConfig, model: nn.Module) -> int | None:
    """The adapter parameter budget: given directly, or as uniform adapters of ``budget_dim``."""
    if cfg.budget_dim is not None:
        return uniform_adapter_params(model, cfg.budget_dim)
    return cfg.budget_params


# ---------------------------------------------------------------- the run


class Trainer:
    """Runs the cycles of one training run; owns the run folder."""

    def __init__(self, run: Run, *, log=print, world: World | None = None) -> None:
        self.world = world or World()
        self.run, self.cfg = run, run.cfg
        self.log = log if self.world.main else (lambda *a, **k: None)  # only rank 0 speaks
        if self.world.enabled and self.cfg.batch_size % self.world.size:
            raise ConfigError(
                f"--batch-size {self.cfg.batch_size} is the global batch: make it a multiple of the "
                f"{self.world.size} processes"
            )
        self.net = self._wrap()
        self.budget = resolve_budget(self.cfg, run.model)
        self.pruner: MiMiPruner | None = None
        if run.method.prunes:
            if self.budget is None:
                raise ConfigError(f"method {self.cfg.method} needs a budget: pass --budget-params N or --budget-dim H")
            rho = 1.0 if self.cfg.method == "mimi-oneshot" else self.cfg.rho
            self.pruner = MiMiPruner(budget=self.budget, rho=rho, method=self.cfg.score, seed=self.cfg.seed)
        self.acc = GradientAccumulator(run.model) if self.cfg.score == "gradient" and self.pruner else None
        self.summary: list[dict] = []
        self.best: dict | None = None  # --select best-val: {"val_acc", "epoch", "state"} of this cycle
        self.position = {"cycle": 0, "epoch": 0, "cycle_done": False, "elapsed": 0.0}
        self.writer = None  # TensorBoard, opened by fit() once the run folder exists
        self.last_val: dict | None = None  # the last epoch's validation result (reused when the cycle ends)

    def _wrap(self) -> nn.Module:
        """The module the loop trains: the model itself, or under torchrun a DDP wrapper (rebuilt after a prune,
        since pruning makes new Parameters)."""
        if not self.world.enabled:
            return self.run.model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.run.device.index] if self.run.device.type == "cuda" else None
        return DistributedDataParallel(self.run.model, device_ids=ids)

    def _save_checkpoint(self, opt, step: int) -> None:
        if self.world.main:
            save_checkpoint(self.run, opt, step, self.position, self.pruner, self.acc, self.best)

    # -- optimiser per cycle: rebuilt after every physical prune (new Parameters)
    def _optimizer(self, cycle: int, step: int = 0, state: dict | None = None):
        opt = make_optimizer(self.run.model, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if state is not None:
            opt.load_state_dict(state)
            for group in opt.param_groups:  # the schedule scales cfg.lr, which --resume --lr may have changed
                group["initial_lr"] = self.cfg.lr
        total = max(1, cycle_epochs(self.cfg, cycle) * steps_per_epoch(self.cfg, self.run.task))
        factor = warmup_cosine(total, self.cfg.warmup)
        if step > 0:
            # last_epoch=step-1 then the constructor's own step() lands on `step`, as in an unbroken run.
            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor, last_epoch=step - 1)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return opt, sched

    def _context(self, opt, sched) -> StepContext:
        def after_backward(step: int) -> None:
            self.run.method.after_backward(self.run.model, step)
            if self.acc is not None:
                self.acc.update()

        return StepContext(
            optimizer=opt,
            scheduler=sched,
            device=self.run.device,
            amp_dtype=self.run.amp_dtype,
            label_smoothing=self.cfg.label_smoothing,
            grad_clip=self.cfg.grad_clip,
            after_backward=after_backward,
        )

    def _eval(self, split: str) -> dict:
        ds = getattr(self.run.task, split)
        reduce = None
        if self.world.enabled:  # each rank evaluates its share; the confusion matrix is summed over ranks
            ds = torch.utils.data.Subset(ds, distributed.shard_indices(len(ds), self.world))
            reduce = lambda t: distributed.all_reduce_sum(self.world, t)  # noqa: E731
        return evaluate(
            self.run.model,
            ds,
            reduce=reduce,
            num_classes=self.run.task.num_classes,
            device=self.run.device,
            batch_size=self.cfg.eval_batch_size,
            amp_dtype=self.run.amp_dtype,
            progress=self.cfg.progress,
            desc=split,
        )

    def _params(self) -> dict:
        trainable = count_trainable(self.run.model)
        return {
            "adapter_params": adapter_param_count(self.run.model),
            "trainable_params": trainable,
            "pct_of_backbone": 100.0 * trainable / max(1, self.run.backbone_params),
        }

    def _log_epoch(self, cycle: int, epoch: int, n_epochs: int, stats: dict) -> None:
        if not self.world.main:
            return
        line = {"cycle": cycle, "epoch": epoch, **stats}
        with open(self.run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        if self.writer is not None:
            for k in ("train_loss", "train_acc", "val_acc", "val_loss", "lr"):
                self.writer.add_scalar(k, stats[k], stats["global_epoch"])
        self.log(
            f"cycle {cycle} epoch {epoch}/{n_epochs} | loss {stats['train_loss']:.4f} acc {stats['train_acc']:.3f} "
            f"| val {stats['val_acc']:.3f} | adapter params {stats['adapter_params']:,} | {stats['seconds']:.1f}s"
        )

    def _train_cycle(self, cycle: int, start_epoch: int, opt, sched, t0: float) -> None:
        n_epochs = cycle_epochs(self.cfg, cycle)
        ctx = self._context(opt, sched)
        self.last_val = None  # set by each epoch's validation pass
        for epoch in range(start_epoch, n_epochs):
            # Every source of randomness is a function of (seed, cycle, epoch): a resumed run is the same run.
            torch.manual_seed(self.cfg.seed * 1_000_003 + cycle * 10_007 + epoch)
            data = loader(
                self.run.task.train,
                batch_size=self.cfg.batch_size,
                shuffle=True,
                seed=self.cfg.seed * 100_003 + cycle * 1009 + epoch,
                rank=self.world.rank,
                world=self.world.size,
            )
            te = time.perf_counter()
            try:
                stats = train_epoch(
                    self.net, data, ctx, progress=self.cfg.progress and self.world.main, desc=f"c{cycle} e{epoch + 1}"
                )
            except TrainingError as e:
                raise TrainingError(
                    f"{e} (cycle {cycle}, epoch {epoch + 1}); the last good checkpoint is kept: continue with a "
                    f"lower learning rate, `mimi train --resume {self.run.out} --lr {self.cfg.lr / 10:g}`"
                ) from e
            val = self.last_val = self._eval("val")
            stats.update(
                val_acc=val["acc"],
                val_loss=val["loss"],
                lr=opt.param_groups[0]["lr"],
                seconds=time.perf_counter() - te,
                step=sched.last_epoch,
                global_epoch=sum(e["epochs"] for e in self.summary) + epoch + 1,
                **self._params(),
            )
            self._log_epoch(cycle, epoch + 1, n_epochs, stats)
            if self.cfg.select == "best-val" and (self.best is None or val["acc"] > self.best["val_acc"]):
                self.best = {
                    "val_acc": val["acc"],
                    "epoch": epoch + 1,
                    "state": {n: t.clone() for n, t in ckpt.trained_state(self.run.model).items()},
                }
            self.position = {
                "cycle": cycle,
                "epoch": epoch + 1,
                "cycle_done": False,
                "elapsed": time.perf_counter() - t0,
            }
            self._save_checkpoint(opt, sched.last_epoch)

    def _finish_cycle(self, cycle: int, opt, sched, t0: float) -> None:
        # the last epoch's validation pass already scored these very weights, unless best-val swapped them in
        same = self.cfg.select == "last" and self.last_val is not None
        val = self.last_val if same else self._eval("val")
        test = self._eval("test") if self._tests(cycle) else {"acc": None, "loss": None}
        entry = {
            "cycle": cycle,
            **self._params(),
            "sizes": {n: a.hidden_dim for n, a in adapters(self.run.model)},
            "val_acc": val["acc"],
            "test_acc": test["acc"],
            "val_loss": val["loss"],
            "test_loss": test["loss"],
            "epochs": cycle_epochs(self.cfg, cycle),
            "target": self.pruner.history[-1]["target"] if self.pruner and self.pruner.history else None,
            "seconds": time.perf_counter() - t0,
        }
        if self.best is not None:
            entry["selected_epoch"] = self.best["epoch"]
        entry.update(self.run.method.extra_info(self.run.model))
        self.summary.append(entry)
        self.position = {"cycle": cycle, "epoch": entry["epochs"], "cycle_done": True, "elapsed": entry["seconds"]}
        if not self.world.main:
            return
        out = self.run.out
        if self.cfg.save_cycles:
            ckpt.save_adapters(
                self.run.model, out / "cycles" / f"cycle_{cycle}.safetensors", metadata=task_metadata(self.run)
            )
        atomic_write_json(out / "summary.json", self.summary)
        self._save_checkpoint(opt, sched.last_epoch)
        self.log(
            f"== cycle {cycle}: adapter params {entry['adapter_params']:,} | trainable {entry['trainable_params']:,} "
            f"({entry['pct_of_backbone']:.3f}% of backbone) | val {entry['val_acc']:.4f} | test "
            + (f"{test['acc']:.4f}" if test["acc"] is not None else "not evaluated (--test-every last)")
        )
        _plots(out, self.summary, self.run.info)

    def _tests(self, cycle: int) -> bool:
        """Whether the test split is evaluated after ``cycle``: every cycle, or with ``--test-every last`` only
        the one after which the loop stops (budget met, no schedule, or the --max-cycles cap)."""
        if self.cfg.test_every == "cycle" or self.pruner is None:
            return True
        return self.pruner.done(self.run.model) or cycle + 1 > self.cfg.max_cycles

    def _restore_best(self) -> None:
        """--select best-val: end the cycle with the weights of its best validation epoch."""
        if self.best is None:
            return
        params = dict(self.run.model.named_parameters())
        with torch.no_grad():
            for name, t in self.best["state"].items():
                params[name].copy_(t.to(params[name].device))
        self.log(f"   selected epoch {self.best['epoch']} (val {self.best['val_acc']:.4f})")

    def fit(self, *, resume_state: dict | None = None) -> list[dict]:
        """Train cycle 0, then prune -> retrain until the budget is met (MiMi), or train once (other methods).

        Raises:
            TrainingError: the loss became NaN/inf, or a file could not be written (disk full); every file is
                written atomically, so the last good checkpoint is intact and the run resumes from it.
        """
        try:
            return self._fit(resume_state)
        except OSError as e:
            raise TrainingError(
                f"cannot write to {self.run.out} ({e.strerror or e}); the last good checkpoint is kept: free some "
                f"space, then `mimi train --resume {self.run.out}`"
            ) from e

    def _fit(self, resume_state: dict | None) -> list[dict]:
        self.writer = _tensorboard(self.run.out) if self.cfg.tensorboard and self.world.main else None
        cycle, start_epoch, opt_state, step, elapsed = 0, 0, None, 0, 0.0
        if resume_state is not None:
            cycle, start_epoch = resume_state["position"]["cycle"], resume_state["position"]["epoch"]
            opt_state, step, elapsed = (
                resume_state["optimizer"],
                resume_state["step"],
                resume_state["position"]["elapsed"],
            )
            if resume_state["position"]["cycle_done"]:
                self.best = None  # the finished cycle's selection is already in the weights
                cycle, start_epoch, opt_state, step, elapsed = cycle + 1, 0, None, 0, 0.0
        while True:
            if cycle > 0 and start_epoch == 0 and opt_state is None:
                if self.pruner is None or self.pruner.done(self.run.model):
                    break
                if cycle > self.cfg.max_cycles:
                    self.log(f"warning: stopped after --max-cycles {self.cfg.max_cycles} above the budget")
                    break
                sizes = self.pruner.step(self.run.model, accumulator=self.acc)
                if self.acc is not None:
                    self.acc.reset()
                # every rank planned the same cut from the same weights; make sure, then re-wrap the new Parameters
                distributed.check_same(self.world, "the adapters after the prune", ckpt.trained_state(self.run.model))
                self.net = self._wrap()
                self.log(
                    f"== prune {cycle}: target {self.pruner.history[-1]['target']:,} -> "
                    f"{adapter_param_count(self.run.model):,} adapter params in {len(sizes)} adapters"
                )
            t0 = time.perf_counter() - elapsed
            opt, sched = self._optimizer(cycle, step, opt_state)
            if start_epoch == 0 and opt_state is None:
                self.position = {"cycle": cycle, "epoch": 0, "cycle_done": False, "elapsed": 0.0}
                self._save_checkpoint(opt, 0)
            self._train_cycle(cycle, start_epoch, opt, sched, t0)
            self._restore_best()
            self._finish_cycle(cycle, opt, sched, t0)
            self.best = None
            cycle, start_epoch, opt_state, step, elapsed = cycle + 1, 0, None, 0, 0.0
            if self.pruner is None:
                break
        if self.world.main:
            ckpt.save_adapters(self.run.model, self.run.out / "adapters.safetensors", metadata=task_metadata(self.run))
        distributed.barrier(self.world)  # no rank returns before the final files exist
        if self.writer is not None:
            self.writer.close()
        return self.summary


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _plots(out: Path, summary: list[dict], info: dict) -> None:
    from .report import write_run_report

    write_run_report(out, summary, info)


# ---------------------------------------------------------------- entry points


def train(cfg: TrainConfig, *, log=print) -> list[dict]:
    """Start a new run in ``cfg.out`` (which must not hold a run already)."""
    out = Path(cfg.out)
    if (out / "config.yaml").exists():
        raise ConfigError(
            f"{out} already holds a run; continue it with `mimi train --resume {out}` or pick another --out"
        )
    preflight(cfg)  # names, flags, data listing, budget, output folder: before any weights load or image decodes
    world, device = distributed.init(cfg.device)
    run = build_run(cfg, device=device)
    trainer = Trainer(run, log=log, world=world)  # validates the budget before anything is written
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
        info = {**run.info, "budget": trainer.budget, "world_size": world.size, "config_sha256": _sha(out)}
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


def resume(run_dir: str | Path, *, lr: float | None = None, log=print) -> list[dict]:
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
    log = log if world.main else (lambda *a, **k: None)
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
    meta = ckpt.read_metadata(path)
    tensors = ckpt.load_tensors(path)
    sizes = json.loads(meta["sizes"]) if json.loads(meta["adapter_config"]) else None
    run = build_run(cfg, sizes=sizes, device=device)
    ckpt.restore_trained(run.model, path, meta=meta, tensors=tensors)
    trainer = Trainer(run, log=log, world=world)
    pruner_state = json.loads(meta["pruner"])
    if pruner_state is not None:
        trainer.pruner = MiMiPruner.from_state_dict(pruner_state)
    if trainer.acc is not None:
        for name, _ in adapters(run.model):
            if f"__gradacc__.{name}.down" in tensors:
                trainer.acc.grads[name] = (tensors[f"__gradacc__.{name}.down"], tensors[f"__gradacc__.{name}.up"])
        trainer.acc.steps = int(meta["gradacc_steps"])
    best = json.loads(meta.get("best", "null"))
    if best is not None:
        best["state"] = {k.removeprefix("__best__."): v for k, v in tensors.items() if k.startswith("__best__.")}
        trainer.best = best
    position = json.loads(meta["position"])
    summary_path = out / "summary.json"
    done_cycles = position["cycle"] + (1 if position["cycle_done"] else 0)
    trainer.summary = [e for e in read_json(summary_path, []) if e["cycle"] < done_cycles]
    if world.main:
        truncate_metrics(out / "metrics.jsonl", position)
    opt_state = optimizer_state({k: v.to(run.device) for k, v in tensors.items()}, json.loads(meta["optimizer"]))
    log(
        f"resuming {out} at cycle {position['cycle']} epoch {position['epoch']}"
        + (" (cycle complete)" if position["cycle_done"] else "")
    )
    return trainer.fit(resume_state={"position": position, "optimizer": opt_state, "step": int(meta["step"])})


def load_run(run_dir: str | Path, *, weights: str = "adapters.safetensors") -> Run:
    """Rebuild a finished (or interrupted) run's model from its folder, for evaluation."""
    out = Path(run_dir)
    if not (out / "config.yaml").is_file():
        raise CheckpointError(f"{out}: not a run folder (no config.yaml)")
    path = out / weights if not Path(weights).is_absolute() else Path(weights)
    cfg = TrainConfig.load(out / "config.yaml")
    cfg.progress = False
    meta = ckpt.read_metadata(path)
    run = build_run(cfg, sizes=json.loads(meta["sizes"]) if json.loads(meta["adapter_config"]) else None)
    ckpt.restore_trained(run.model, path, meta=meta)
    return run


def evaluate_run(run_dir: str | Path, *, split: str = "test", weights: str = "adapters.safetensors") -> dict:
    """Accuracy of a run's saved adapters on one split (``val`` or ``test``)."""
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test, got {split!r}")
    run = load_run(run_dir, weights=weights)
    res = evaluate(
        run.model,
        getattr(run.task, split),
        num_classes=run.task.num_classes,
        device=run.device,
        batch_size=run.cfg.eval_batch_size,
        amp_dtype=run.amp_dtype,
    )
    return {"run": str(run_dir), "split": split, "weights": weights, **res}
