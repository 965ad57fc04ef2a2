"""Typed run configuration. The CLI is generated from these fields; YAML only saves and loads them."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mimi.core.errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class DistillOptions:
    """Knowledge distillation of a run (``--distill``): the loss ``(1 - alpha) CE + alpha T^2 KL(teacher || student)``
    on logits softened by the temperature ``T``.

    Attributes:
        alpha: weight of the distillation term, in [0, 1] (0: plain cross-entropy; 1: the teacher alone).
        temp: temperature ``T`` > 0 of both softmaxes; the ``T^2`` keeps the term's gradients at CE's scale.
        teacher: ``RUN[:WEIGHTS]``: a finished run folder (its ``adapters.safetensors``) or one of its files
            (``RUN:cycles/cycle_0.safetensors``); None: a pruning method's own model at the end of cycle 0.
    """

    alpha: float = 0.5
    temp: float = 2.0
    teacher: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"config: distill_alpha must be in [0, 1], got {self.alpha!r}")
        if isinstance(self.temp, bool) or not isinstance(self.temp, int | float) or not self.temp > 0:
            raise ConfigError(f"config: distill_temp must be > 0, got {self.temp!r}")
        if self.teacher is not None and not (isinstance(self.teacher, str) and self.teacher.strip()):
            raise ConfigError(f"config: teacher must be RUN[:WEIGHTS], got {self.teacher!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig:
    """Everything one training run needs: backbone, data, method, budget, optimisation, output."""

    # backbone
    model: str = _f("vit_small_patch14_dinov2", "any timm model name")
    weights: str = _f("auto", "auto | hub | none | imgfocus | path to .safetensors/.pth/.bin/.npz")
    img_size: int | None = _f(None, "input resolution (position embeddings are resampled)")
    model_kwargs: dict = _f({}, "extra timm.create_model keyword arguments, as JSON")
    # data
    data: str = _f("", "dataset spec: vtab1k:TASK, domainnet:DOMAIN, cifar10, cifar100, svhn, flowers102, folder:PATH")
    data_root: str | None = _f(None, "folder holding the dataset files")
    trainval: bool = _f(False, "train on train+val (VTAB-1k train800val200); val is then no longer held out")
    val_fraction: float = _f(0.1, "fraction of train carved out as validation where a source has no val split")
    # method
    method: str = _f("mimi", "training method (see `mimi methods`)")
    adapter_dim: int | None = _f(None, "hidden size of the adapters at insertion (default: width / reduction)")
    reduction: float | None = _f(None, "adapter hidden size = width / reduction (default 4 when no --adapter-dim)")
    placement: str = _f("sequential", "adapter placement: sequential (after each branch) or parallel")
    method_kwargs: dict = _f({}, 'method-specific options as JSON, e.g. {"rank": 4} for lora')
    # MiMi schedule
    budget_params: int | list[int] | None = _f(
        None,
        "adapter parameter budget of the last cycle (head excluded); several, e.g. 32000,16000,8000: a pruning run "
        "lands a cut on each, retrains, and keeps each as a finished task (budgets/<params>.safetensors)",
    )
    budget_dim: int | list[int] | None = _f(
        None, "budget = adapter parameters of uniform adapters of this hidden size (several: comma-separated)"
    )
    rho: float = _f(0.5, "fraction of adapter parameters removed per cycle (1.0 = one-shot)")
    score: str = _f("mimi", "neuron score: mimi, mimi-weighted, magnitude, global-l1, random, gradient, lora-norm")
    max_cycles: int = _f(20, "safety cap on pruning cycles")
    # distillation
    distill: bool = _f(
        False,
        "add a teacher's soft labels to the loss: (1-a) CE + a T^2 KL; the teacher is --teacher, or a pruning "
        "method's own model at the end of cycle 0 (distilled into every later cycle)",
    )
    teacher: str | None = _f(
        None,
        "RUN[:WEIGHTS] teacher of --distill (implies it): a finished run folder (its adapters.safetensors) or one "
        "of its files, e.g. RUN:cycles/cycle_0.safetensors; same backbone and classes as this run",
    )
    distill_alpha: float = _f(0.5, "weight a of the distillation term, in [0, 1]")
    distill_temp: float = _f(2.0, "temperature T of the distillation term (> 0)")
    # optimisation
    epochs: int = _f(10, "epochs per cycle")
    first_epochs: int | None = _f(None, "epochs of cycle 0 (the large adapters); default: --epochs")
    batch_size: int = _f(64, "training batch size")
    eval_batch_size: int = _f(256, "evaluation batch size")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.05, "AdamW weight decay (not applied to biases and norms)")
    warmup: float = _f(0.1, "fraction of each cycle's steps spent in linear warmup")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy")
    grad_clip: float | None = _f(None, "clip the gradient norm to this value")
    select: str = _f(
        "last", "weights kept at the end of each cycle: last (epoch) or best-val (best validation accuracy)"
    )
    test_every: str = _f(
        "cycle",
        "test evaluation: after every cycle (the accuracy-vs-parameters curve) or only after the last (cycle | last)",
    )
    # system
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    precision: str = _f("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16")
    seed: int = _f(0, "seed of initialisation, data order and random scores")
    out: str = _f("runs/run", "output folder of the run")
    save_cycles: bool = _f(True, "keep the adapters of every cycle")
    progress: bool = _f(True, "show progress bars")
    tensorboard: bool = _f(True, "log to TensorBoard when it is installed")

    def __post_init__(self) -> None:
        self.budget_params = _budgets("budget_params", self.budget_params)
        self.budget_dim = _budgets("budget_dim", self.budget_dim)
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
            (self.epochs >= 0, "epochs must be >= 0"),
            (self.first_epochs is None or self.first_epochs >= 0, "first_epochs must be >= 0"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0.0 <= self.warmup < 1.0, "warmup must be in [0, 1)"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip must be > 0"),
            (0.0 < self.rho <= 1.0, "rho must be in (0, 1]"),
            (all(b >= 0 for b in budget_list(self.budget_params)), "budget_params must be >= 0"),
            (all(b >= 0 for b in budget_list(self.budget_dim)), "budget_dim must be >= 0"),
            (
                not (self.budget_params is not None and self.budget_dim is not None),
                "give budget_params or budget_dim, not both",
            ),
            (0.0 < self.val_fraction < 1.0, "val_fraction must be in (0, 1)"),
            (self.precision in ("auto", "fp32", "bf16"), "precision must be auto, fp32 or bf16"),
            (self.img_size is None or self.img_size >= 1, "img_size must be >= 1"),
            (self.max_cycles >= 1, "max_cycles must be >= 1"),
            (self.select in ("last", "best-val"), "select must be last or best-val"),
            (self.test_every in ("cycle", "last"), "test_every must be cycle or last"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"config: {msg}")
        if self.teacher is not None:
            self.distill = True  # naming a teacher is asking for distillation
        DistillOptions(alpha=self.distill_alpha, temp=self.distill_temp, teacher=self.teacher)  # its checks

    def distill_options(self) -> DistillOptions | None:
        """The run's :class:`DistillOptions`; None when it does not distill."""
        if not self.distill:
            return None
        return DistillOptions(alpha=self.distill_alpha, temp=self.distill_temp, teacher=self.teacher)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"config: unknown keys {unknown}; see `mimi train --help`")
        return cls(**{k: _typed(k, v) for k, v in d.items()})

    def save(self, path: str | Path) -> None:
        from mimi.core.files import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(load_yaml(path))


def budget_list(value: int | list[int] | None) -> list[int]:
    """A budget field as a list: ``None`` -> ``[]``, ``8000`` -> ``[8000]``, ``[32000, 8000]`` as it is."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _budgets(key: str, value: Any) -> int | list[int] | None:
    """A budget field in its one form: an int, or a list of two or more distinct ints in decreasing order.

    Accepts ``"32000,16000"`` (the command line and bench specs) and lists in any order; one value is an int, so a
    single-budget run's config reads as before."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    items = value.split(",") if isinstance(value, str) else value
    try:
        if not isinstance(items, list | tuple) or not items:
            raise ValueError
        ints = [int(x) if isinstance(x, str) else x for x in items]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in ints):
            raise ValueError
    except ValueError:
        raise ConfigError(f"config: {key} must be an integer or comma-separated integers, got {value!r}") from None
    ints = sorted(set(ints), reverse=True)
    return ints[0] if len(ints) == 1 else ints


def _typed(key: str, value: Any) -> Any:
    """``value`` checked against the field's type (ints accepted where floats are expected)."""
    hints = typing.get_type_hints(TrainConfig)
    tp = hints[key]
    allowed = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if value is None and type(None) in allowed:
        return value
    if key in ("budget_params", "budget_dim"):
        return _budgets(key, value)
    for t in allowed:
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool, dict, list) and isinstance(value, t):
            return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"config: {key} must be {names}, got {value!r} ({type(value).__name__})")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    return d
