"""The cycle loop of one run: train a cycle, evaluate, prune, retrain until the budget is met; owns the run folder."""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mimi.core import taskfile as ckpt
from mimi.core.adapters import adapter_param_count, adapters, count_trainable
from mimi.core.errors import CheckpointError, ConfigError, TrainingError
from mimi.core.files import atomic_write_json
from mimi.core.modules import trainable_without_head
from mimi.core.schedule import MiMiPruner
from mimi.core.scores import GradientAccumulator
from mimi.training import distill, distributed
from mimi.training.distributed import World
from mimi.training.engine import (
    Indexed,
    StepContext,
    evaluate,
    loader,
    make_optimizer,
    train_epoch,
    warmup_cosine,
)
from mimi.training.run import Run, cycle_epochs, resolve_budgets, steps_per_epoch, task_metadata
from mimi.training.state import Cursor, save_checkpoint

logger = logging.getLogger(__name__)


class Trainer:
    """Runs the cycles of one training run; owns the run folder."""

    def __init__(self, run: Run, *, log: Callable[[str], None] | None = None, world: World | None = None) -> None:
        """``log`` receives one line per epoch, cut and cycle (default: the ``mimi.training.loop`` logger at INFO)."""
        self.world = world or World()
        self.run, self.cfg = run, run.cfg
        self.log = (log or logger.info) if self.world.main else (lambda *a, **k: None)  # only rank 0 speaks
        if self.world.enabled and self.cfg.batch_size % self.world.size:
            raise ConfigError(
                f"--batch-size {self.cfg.batch_size} is the global batch: make it a multiple of the "
                f"{self.world.size} processes"
            )
        self.net = self._wrap()
        self.budgets = resolve_budgets(self.cfg, run.model)  # largest first; the last is the run's final budget
        self.budget = self.budgets[-1] if self.budgets else None
        self.pruner: MiMiPruner | None = None
        if run.method.traits.prunes:
            if self.budget is None:
                raise ConfigError(f"method {self.cfg.method} needs a budget: pass --budget-params N or --budget-dim H")
            rho = 1.0 if run.method.traits.one_shot else self.cfg.rho
            self.pruner = MiMiPruner(
                budget=self.budget, rho=rho, score=self.cfg.score, seed=self.cfg.seed, stops=self.budgets[:-1]
            )
        self.grad_acc = GradientAccumulator(run.model) if self.cfg.score == "gradient" and self.pruner else None
        self.summary: list[dict] = []
        self.best: dict | None = None  # --select best-val: {"val_acc", "epoch", "state"} of this cycle
        self.position = {"cycle": 0, "epoch": 0, "cycle_done": False, "elapsed": 0.0}
        self.writer = None  # TensorBoard, opened by fit() once the run folder exists
        self.last_val: dict | None = None  # the last epoch's validation result (reused when the cycle ends)
        self.distill = self.cfg.distill_options()
        self.teacher: distill.Teacher | None = None  # made or read back when the first distilled cycle starts

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
            save_checkpoint(self.run, opt, step, self.position, self.pruner, self.grad_acc, self.best)

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

    def _context(self, opt, sched, teacher: distill.Teacher | None = None) -> StepContext:
        def after_backward(step: int) -> None:
            self.run.method.after_backward(self.run.model, step)
            if self.grad_acc is not None:
                self.grad_acc.update()

        return StepContext(
            optimizer=opt,
            scheduler=sched,
            device=self.run.device,
            amp_dtype=self.run.amp_dtype,
            label_smoothing=self.cfg.label_smoothing,
            grad_clip=self.cfg.grad_clip,
            after_backward=after_backward,
            criterion=None
            if teacher is None
            else distill.criterion(teacher, self.distill, label_smoothing=self.cfg.label_smoothing),
        )

    # -- distillation: the teacher is made once, saved in the run folder, and read back from there on resume
    def _distilled(self, cycle: int) -> bool:
        """Whether ``cycle`` learns from a teacher: with --distill, every cycle of a run given --teacher, and every
        cycle after the first of a pruning run (its own model at the end of cycle 0 teaches)."""
        return self.distill is not None and (self.distill.teacher is not None or cycle > 0)

    def _teacher(self, cycle: int) -> distill.Teacher | None:
        """The teacher of ``cycle`` (None: cross-entropy alone)."""
        if not self._distilled(cycle):
            return None
        if self.teacher is None:
            cached = not self.run.task.train_augmented
            if distill.saved(self.run.out, cached=cached):
                n = len(self.run.task.train)
                self.teacher = distill.load_teacher(self.run.out, cached=cached, n_train=n, device=self.run.device)
            elif self.distill.teacher is not None:
                self.teacher = self._teacher_from_run(self.distill.teacher)
            else:
                raise CheckpointError(
                    f"{self.run.out}: {distill.TEACHER_FILE} (the model of cycle 0, the teacher of later cycles) is "
                    "missing; the run cannot go on distilled: start it again"
                )
        return self.teacher

    def _teacher_from_run(self, spec: str) -> distill.Teacher:
        cfg, path = distill.teacher_config(spec)
        model = distill.teacher_model(cfg, path, device=self.run.device)
        distill.check_same_backbone(model, self.run.model, spec)
        if self.world.main:
            distill.save_teacher(self.run.out, cfg=cfg, spec=spec, path=path)
        return self._teach_with(model, spec)

    def _own_teacher(self) -> distill.Teacher:
        """The model as it stands at the end of cycle 0, frozen: the teacher of every later cycle."""
        if self.world.main:
            distill.save_teacher(self.run.out, cfg=self.cfg, spec="cycle 0", model=self.run.model)
        if self.run.task.train_augmented:  # asked per batch: a frozen copy, since the model itself goes on training
            return self._teach_with(copy.deepcopy(self.run.model).requires_grad_(False).eval(), "cycle 0")
        return self._teach_with(self.run.model, "cycle 0")  # its logits are all that is kept

    def _teach_with(self, model: nn.Module, spec: str) -> distill.Teacher:
        if self.run.task.train_augmented:
            distributed.barrier(self.world)
            return distill.Teacher(model=model)
        logits = distill.compute_logits(
            model,
            self.run.task.train,
            num_classes=self.run.task.num_classes,
            device=self.run.device,
            batch_size=self.cfg.eval_batch_size,
            amp_dtype=self.run.amp_dtype,
            world=self.world,
        )
        if self.world.main:
            distill.save_logits(self.run.out, logits, spec)
        distributed.barrier(self.world)  # every rank sees the files before any of them goes on
        self.log(f"   teacher ({spec}): logits of the {len(logits)} training images cached")
        return distill.Teacher(logits=logits.to(self.run.device))  # looked up where the student's logits are

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
        if stats["adapter_params"]:
            size = f"adapter params {stats['adapter_params']:,}"
        else:  # a method without adapters (prompts, LoRA, FacT, ...): what it trains, besides the head
            size = f"trained params {trainable_without_head(self.run.model):,} (no head)"
        self.log(
            f"cycle {cycle} epoch {epoch}/{n_epochs} | loss {stats['train_loss']:.4f} acc {stats['train_acc']:.3f} "
            f"| val {stats['val_acc']:.3f} | {size} | {stats['seconds']:.1f}s"
        )

    def _train_cycle(self, cycle: int, start_epoch: int, opt, sched, t0: float) -> None:
        n_epochs = cycle_epochs(self.cfg, cycle)
        teacher = self._teacher(cycle)
        ctx = self._context(opt, sched, teacher)
        # a cached teacher is looked up by image index; the seeded order of the batches is the same either way
        train = Indexed(self.run.task.train) if teacher is not None and teacher.cached else self.run.task.train
        self.last_val = None  # set by each epoch's validation pass
        for epoch in range(start_epoch, n_epochs):
            # Every source of randomness is a function of (seed, cycle, epoch): a resumed run is the same run.
            torch.manual_seed(self.cfg.seed * 1_000_003 + cycle * 10_007 + epoch)
            data = loader(
                train,
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
        if self.distill is not None:
            entry["distilled"] = self._distilled(cycle)
        kept = self._kept_budget()
        if kept is not None:
            entry["budget"] = kept
        entry.update(self.run.method.extra_info(self.run.model))
        self.summary.append(entry)
        if self.distill is not None and self.distill.teacher is None and cycle == 0 and self.pruner is not None:
            # before this cycle's checkpoint: a run resumed past cycle 0 finds the teacher in its folder
            self.teacher = self._own_teacher()
        self.position = {"cycle": cycle, "epoch": entry["epochs"], "cycle_done": True, "elapsed": entry["seconds"]}
        if not self.world.main:
            return
        out = self.run.out
        if self.cfg.save_cycles:
            ckpt.save_adapters(
                self.run.model, out / "cycles" / f"cycle_{cycle}.safetensors", metadata=task_metadata(self.run)
            )
        if kept is not None:  # a finished task of its own (before the checkpoint: a resumed run never lacks it)
            ckpt.save_adapters(self.run.model, budget_file(out, kept), metadata=task_metadata(self.run))
        atomic_write_json(out / "summary.json", self.summary)
        self._save_checkpoint(opt, sched.last_epoch)
        self.log(
            f"== cycle {cycle}: adapter params {entry['adapter_params']:,} | trainable {entry['trainable_params']:,} "
            f"({entry['pct_of_backbone']:.3f}% of backbone) | val {entry['val_acc']:.4f} | test "
            + (f"{test['acc']:.4f}" if test["acc"] is not None else "not evaluated (--test-every last)")
        )
        _plots(out, self.summary, self.run.info)

    def _kept_budget(self) -> int | None:
        """The budget this cycle ends on, in a run of several budgets (each kept as a task of its own); else None."""
        if self.pruner is None or not self.pruner.stops:
            return None
        return self.pruner.landed()

    def _tests(self, cycle: int) -> bool:
        """Whether the test split is evaluated after ``cycle``: every cycle, or with ``--test-every last`` only
        the ones whose model is kept as a task (a budget of several, the end: budget met, no schedule, or the
        --max-cycles cap)."""
        if self.cfg.test_every == "cycle" or self.pruner is None:
            return True
        return self.pruner.done(self.run.model) or cycle + 1 > self.cfg.max_cycles or self._kept_budget() is not None

    def _restore_best(self) -> None:
        """--select best-val: end the cycle with the weights of its best validation epoch."""
        if self.best is None:
            return
        params = dict(self.run.model.named_parameters())
        with torch.no_grad():
            for name, t in self.best["state"].items():
                params[name].copy_(t.to(params[name].device))
        self.log(f"   selected epoch {self.best['epoch']} (val {self.best['val_acc']:.4f})")

    def fit(self, *, resume_from: Cursor | None = None) -> list[dict]:
        """Train cycle 0, then prune -> retrain until the budget is met (MiMi), or train once (other methods).

        Raises:
            TrainingError: the loss became NaN/inf, or a file could not be written (disk full); every file is
                written atomically, so the last good checkpoint is intact and the run resumes from it.
        """
        try:
            return self._fit(resume_from or Cursor())
        except OSError as e:
            raise TrainingError(
                f"cannot write to {self.run.out} ({e.strerror or e}); the last good checkpoint is kept: free some "
                f"space, then `mimi train --resume {self.run.out}`"
            ) from e

    def _fit(self, at: Cursor) -> list[dict]:
        self.writer = _tensorboard(self.run.out) if self.cfg.tensorboard and self.world.main else None
        while True:
            if at.cycle > 0 and at.fresh:
                if self.pruner is None or self.pruner.done(self.run.model):
                    break
                if at.cycle > self.cfg.max_cycles:
                    if self.world.main:
                        warnings.warn(
                            f"stopped after --max-cycles {self.cfg.max_cycles} above the budget; raise --max-cycles "
                            "or --rho to reach it",
                            stacklevel=2,
                        )
                    break
                sizes = self.pruner.step(self.run.model, accumulator=self.grad_acc)
                if self.grad_acc is not None:
                    self.grad_acc.reset()
                # every rank planned the same cut from the same weights; make sure, then re-wrap the new Parameters
                distributed.check_same(self.world, "the adapters after the prune", ckpt.trained_state(self.run.model))
                self.net = self._wrap()
                self.log(
                    f"== prune {at.cycle}: target {self.pruner.history[-1]['target']:,} -> "
                    f"{adapter_param_count(self.run.model):,} adapter params in {len(sizes)} adapters"
                )
            t0 = time.perf_counter() - at.elapsed
            opt, sched = self._optimizer(at.cycle, at.step, at.optimizer)
            if at.fresh:
                self.position = {"cycle": at.cycle, "epoch": 0, "cycle_done": False, "elapsed": 0.0}
                self._save_checkpoint(opt, 0)
            self._train_cycle(at.cycle, at.epoch, opt, sched, t0)
            self._restore_best()
            self._finish_cycle(at.cycle, opt, sched, t0)
            self.best = None
            at = at.next_cycle()
            if self.pruner is None:
                break
        if self.world.main:
            ckpt.save_adapters(self.run.model, self.run.out / "adapters.safetensors", metadata=task_metadata(self.run))
        distributed.barrier(self.world)  # no rank returns before the final files exist
        if self.writer is not None:
            self.writer.close()
        return self.summary


def budget_file(out: Path, budget: int) -> Path:
    """Where a run of several budgets keeps the task it finished at ``budget`` (adapter parameters)."""
    return Path(out) / "budgets" / f"{budget}.safetensors"


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _plots(out: Path, summary: list[dict], info: dict) -> None:
    from mimi.reporting.run_report import write_run_report

    write_run_report(out, summary, info)
