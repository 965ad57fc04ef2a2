"""Knowledge distillation (``--distill``): the teacher of a run, its logits, and the loss.

The teacher is a frozen model on the same backbone with the same classes: a finished run's weights (``--teacher
RUN[:WEIGHTS]``, for any method), or a pruning run's own model at the end of cycle 0 (then every later cycle is
distilled from it). Where the train split has no random augmentation (every source today), the teacher's logits are
computed once per training image, in the split's order, and looked up by image index at every step, so that a
distilled step costs what a plain one does; otherwise the teacher runs on every batch. Under torchrun each rank
computes the logits of its own share of the images, and the shares are summed into one table on every rank.

The teacher is part of the run state. ``teacher.safetensors`` (its trained tensors, with its config in the
metadata) and, where cached, ``teacher_logits.safetensors`` are written to the run folder before any step uses
them, so a resumed run reads back exactly what the unbroken one used and never goes back to the teacher's run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset, Subset

from mimi.backbones import create_backbone
from mimi.config import DistillOptions, TrainConfig
from mimi.core import taskfile as ckpt
from mimi.core.device import autocast
from mimi.core.errors import CheckpointError, ConfigError
from mimi.core.files import atomic_write
from mimi.methods import get_method
from mimi.training import distributed
from mimi.training.distributed import World
from mimi.training.engine import Criterion, loader

TEACHER_FILE = "teacher.safetensors"  # the teacher's trained tensors; its TrainConfig in the metadata
LOGITS_FILE = "teacher_logits.safetensors"  # (N, C) float32: the teacher's logits of training image i in row i
LOGITS_FORMAT = "mimi-teacher-logits/1"


def distillation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha: float,
    temp: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``(1 - alpha) CE(logits, labels) + alpha T^2 KL(softmax(teacher / T) || softmax(logits / T))``.

    The KL term is averaged over the batch (``batchmean``: the true KL per sample); ``T^2`` keeps its gradients on
    the scale of the cross-entropy's whatever the temperature (Hinton et al., 2015).
    """
    ce = nn.functional.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    student = nn.functional.log_softmax(logits / temp, dim=-1)  # (B, C)
    teacher = nn.functional.log_softmax(teacher_logits.float() / temp, dim=-1)  # (B, C)
    kl = nn.functional.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return (1.0 - alpha) * ce + alpha * temp**2 * kl


class Teacher:
    """The teacher's logits of a batch: looked up in a table computed once (``logits``), or from a frozen model."""

    def __init__(self, *, logits: torch.Tensor | None = None, model: nn.Module | None = None) -> None:
        if (logits is None) == (model is None):
            raise ValueError("Teacher: give the cached logits or the model, one of the two")
        self.logits, self.model = logits, model

    @property
    def cached(self) -> bool:
        """Looked up by image index: the training loader must then yield indices (``engine.Indexed``)."""
        return self.logits is not None

    def __call__(self, x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        if self.logits is not None:
            if index is None:
                raise ValueError("cached teacher logits need the batch's image indices (wrap the data in Indexed)")
            return self.logits[index.to(self.logits.device)].to(x.device)  # (B, C)
        with torch.no_grad():
            return self.model(x).float()  # (B, C)


def criterion(teacher: Teacher, opts: DistillOptions, *, label_smoothing: float = 0.0) -> Criterion:
    """The training loss of a distilled step (see :func:`distillation_loss`)."""

    def loss(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        return distillation_loss(
            logits, y, teacher(x, index), alpha=opts.alpha, temp=opts.temp, label_smoothing=label_smoothing
        )

    return loss


# ---------------------------------------------------------------- naming and checking a teacher


def parse_teacher(spec: str) -> tuple[Path, Path]:
    """``RUN[:WEIGHTS]`` -> (run folder, weights file); WEIGHTS defaults to the run's final ``adapters.safetensors``
    and is relative to RUN unless absolute."""
    run, weights = spec, "adapters.safetensors"
    if ":" in spec and not Path(spec).is_dir():
        run, _, weights = spec.rpartition(":")
    run_dir = Path(run).expanduser()
    path = Path(weights).expanduser()
    return run_dir, path if path.is_absolute() else run_dir / path


def teacher_config(spec: str) -> tuple[TrainConfig, Path]:
    """The teacher run's own config and its weights file; a one-line :class:`ConfigError` if either is missing."""
    run_dir, path = parse_teacher(spec)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--teacher {spec}: {run_dir} is not a run folder (no config.yaml); name a finished run")
    if not path.is_file():
        raise ConfigError(
            f"--teacher {spec}: no file {path} (a finished run has adapters.safetensors; name another of its files "
            "as RUN:cycles/cycle_K.safetensors)"
        )
    return TrainConfig.load(run_dir / "config.yaml"), path


def check_teacher(cfg: TrainConfig, num_classes: int) -> None:
    """Refuse, in one line and before any weights load, a distilled run that has no teacher or one that cannot teach
    it: another backbone (model, image size, model kwargs, weights) or another number of classes."""
    opts = cfg.distill_options()
    if opts is None:
        return
    if opts.teacher is None:
        if not get_method(cfg.method).traits.prunes:
            raise ConfigError(
                f"--distill with --method {cfg.method}: name the teacher with --teacher RUN[:WEIGHTS] (only a "
                "pruning method has one of its own, its model at the end of cycle 0)"
            )
        return
    theirs, path = teacher_config(opts.teacher)
    keys = ("model", "img_size", "model_kwargs", "weights")
    differ = [k for k in keys if getattr(theirs, k) != getattr(cfg, k)]
    if differ:
        them = ", ".join(f"{k} {getattr(theirs, k)!r}" for k in differ)
        me = ", ".join(f"{getattr(cfg, k)!r}" for k in differ)
        raise ConfigError(f"--teacher {opts.teacher}: trained on another backbone ({them}; this run: {me})")
    try:
        meta = ckpt.read_metadata(path)
    except CheckpointError as e:
        raise ConfigError(f"--teacher {opts.teacher}: {e}") from e
    classes = meta.get("num_classes", "")
    if classes.isdigit() and int(classes) != num_classes:
        raise ConfigError(
            f"--teacher {opts.teacher}: its head has {classes} classes, this task {num_classes}; a teacher must "
            "share the task's classes"
        )


# ---------------------------------------------------------------- building a teacher, its logits, its files


def teacher_model(cfg: TrainConfig, path: Path, *, device: torch.device) -> nn.Module:
    """The model of ``cfg`` with the trained tensors of ``path``, frozen, in eval mode.

    Built with the global random state left as it was: making a teacher never changes the student's run.
    """
    meta = ckpt.read_metadata(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # as the teacher's own run did: a random-init backbone comes out the same
        model, _ = create_backbone(cfg.model, weights=cfg.weights, img_size=cfg.img_size, model_kwargs=cfg.model_kwargs)
        if json.loads(meta["adapter_config"]) is not None or "lora" in meta:
            ckpt.load_adapters(model, path)  # adapter sizes / LoRA ranks from the file itself
        else:
            model.reset_classifier(int(meta["num_classes"]))
            model = get_method(cfg.method).prepare_from_config(model, cfg, total_steps=1)
            ckpt.restore_trained(model, path, meta=meta)
    model.requires_grad_(False)
    return model.to(device).eval()


def check_same_backbone(teacher: nn.Module, student: nn.Module, spec: str) -> None:
    """Refuse a teacher whose frozen backbone weights differ from the student's (another pretrained checkpoint)."""
    mine, theirs = ckpt.backbone_fingerprint(student), ckpt.backbone_fingerprint(teacher)
    if mine and theirs and mine != theirs:
        raise ConfigError(f"--teacher {spec}: its backbone has other pretrained weights than this run's")


@torch.inference_mode()
def compute_logits(
    model: nn.Module,
    dataset: Dataset,
    *,
    num_classes: int,
    device: torch.device,
    batch_size: int,
    amp_dtype: torch.dtype | None,
    world: World,
) -> torch.Tensor:
    """``(N, C)`` float32 logits of ``model`` on every item of ``dataset``, row i for item i.

    Under torchrun each rank computes its own share (every ``size``-th item), and the table is summed over ranks:
    each row is filled by one rank and zero on every other, so the sum is exact and the same on every rank.
    """
    model.eval()
    mine = distributed.shard_indices(len(dataset), world)  # type: ignore[arg-type]
    table = torch.zeros(len(dataset), num_classes)  # type: ignore[arg-type]
    rows = []
    for x, _ in loader(Subset(dataset, mine), batch_size=batch_size, shuffle=False):
        with autocast(device, amp_dtype):
            rows.append(model(x.to(device)).float().cpu())  # (B, C)
    if rows:
        table[mine] = torch.cat(rows)
    return distributed.all_reduce_sum(world, table)


def save_teacher(
    out: Path, *, cfg: TrainConfig, spec: str, model: nn.Module | None = None, path: Path | None = None
) -> None:
    """Write ``teacher.safetensors``: the trained tensors of ``model`` (a run's own model at the end of cycle 0) or
    of the task file ``path`` (a ``--teacher``), with the config that rebuilds the teacher (``cfg``) and ``spec``
    in the metadata."""
    extra = {"teacher": spec, "teacher_config": json.dumps(cfg.to_dict())}
    if model is not None:
        ckpt.save_adapters(model, out / TEACHER_FILE, metadata=extra)
        return
    tensors, meta = ckpt.load_tensors(path), {**ckpt.read_metadata(path), **extra}
    atomic_write(out / TEACHER_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def save_logits(out: Path, logits: torch.Tensor, spec: str) -> None:
    meta = {"format": LOGITS_FORMAT, "teacher": spec, "rows": str(len(logits))}
    atomic_write(out / LOGITS_FILE, lambda tmp: save_file({"logits": logits.contiguous()}, str(tmp), metadata=meta))


def saved(out: Path, *, cached: bool) -> bool:
    """Whether the run folder holds the teacher a step of this run needs."""
    return (out / (LOGITS_FILE if cached else TEACHER_FILE)).is_file()


def load_teacher(out: Path, *, cached: bool, n_train: int, device: torch.device) -> Teacher:
    """The teacher saved in a run folder: its cached logits, or (not ``cached``) its model rebuilt."""
    if cached:
        path = out / LOGITS_FILE
        logits = ckpt.load_tensors(path)["logits"]
        if len(logits) != n_train:
            raise CheckpointError(f"{path}: {len(logits)} rows of teacher logits for {n_train} training images")
        return Teacher(logits=logits.to(device))
    path = out / TEACHER_FILE
    cfg = TrainConfig.from_dict(json.loads(ckpt.read_metadata(path)["teacher_config"]))
    return Teacher(model=teacher_model(cfg, path, device=device))


def remove_saved(out: Path) -> None:
    """Forget a teacher left by an earlier attempt of the run (a new run starts from its ``--teacher`` again)."""
    for name in (TEACHER_FILE, LOGITS_FILE):
        (out / name).unlink(missing_ok=True)
