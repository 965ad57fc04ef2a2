"""The interface every training method implements, what a method declares about itself, and the registry by name.

A method is a :class:`Method` subclass with

* ``Options``: a dataclass of its options, each field with a default and ``metadata={"help": ...}``; most are set
  with ``--method-kwargs`` JSON, a few (:func:`run_flag` fields) are read from generic run flags such as
  ``--adapter-dim``. Validation lives in the dataclass's ``__post_init__``.
* ``traits``: a :class:`Traits` saying whether the trainer prunes it, whether a bank can serve its task files, what
  its units are called; code outside :mod:`mimi.methods` reads these instead of comparing method names.
* ``prepare(model, options, ctx)``: inserts modules and sets ``requires_grad``.

Methods are registered with :func:`register`; installed packages add theirs as entry points of the group
``mimi.methods`` (read on the first lookup, see :mod:`mimi.core.plugins`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn

from mimi.core import plugins
from mimi.core.adapters import uniform_adapter_params
from mimi.core.errors import ConfigError

if TYPE_CHECKING:
    from mimi.config import TrainConfig

#: The run flags (TrainConfig fields) an option may be read from, and how the command line spells them.
RUN_FLAGS: dict[str, str] = {"adapter_dim": "--adapter-dim", "reduction": "--reduction", "placement": "--placement"}

#: What the units a method sizes (and possibly prunes) are called in reports and plots.
SIZE_UNITS = ("hidden size", "rank")


@dataclass(frozen=True)
class Traits:
    """What a method is, for the code outside :mod:`mimi.methods` (trainer, bank, reports).

    Attributes:
        prunes: the trainer runs MiMi cycles with it (prune, retrain) down to the run's budget.
        one_shot: a pruning method that cuts straight to the budget (rho = 1) instead of by ``--rho``.
        servable: its task files leave the backbone untouched, so an :class:`~mimi.AdapterBank` can serve them.
        size_unit: what its units are called in reports: ``"hidden size"`` (adapter neurons) or ``"rank"``.
        budget_sets: the option that the run's budget (``--budget-params`` / ``--budget-dim``) sets, e.g.
            ``"rank"``; None where the budget is a pruning target (``prunes``) or unused.
    """

    prunes: bool = False
    one_shot: bool = False
    servable: bool = False
    size_unit: str = "hidden size"
    budget_sets: str | None = None

    def __post_init__(self) -> None:
        if self.size_unit not in SIZE_UNITS:
            raise ConfigError(f"Traits: size_unit must be one of {SIZE_UNITS}, got {self.size_unit!r}")
        if self.one_shot and not self.prunes:
            raise ConfigError("Traits: one_shot is a kind of pruning; set prunes=True too")


@dataclass(frozen=True)
class PrepareContext:
    """What a method's ``prepare`` gets from the run besides its options.

    Attributes:
        seed: the run's seed (initialisation of what the method adds).
        budget: the run's adapter-parameter budget (``--budget-params``, or ``--budget-dim`` as the parameters of
            uniform adapters of that size on this backbone, see :func:`parameter_budget`); None when not given.
        total_steps: optimizer steps of the first cycle (schedules such as AdaLoRA's need it).
    """

    seed: int = 0
    budget: int | None = None
    total_steps: int = 1


def option(default: Any, help: str) -> Any:
    """A ``--method-kwargs`` option of an ``Options`` dataclass (lists are copied per instance)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def run_flag(default: Any, help: str) -> Any:
    """An ``Options`` field read from the run flag of the same name (see :data:`RUN_FLAGS`), not from
    ``--method-kwargs``: :meth:`Method.options_from` copies ``TrainConfig.<name>`` into it."""
    return field(default=default, metadata={"help": help, "run_flag": True})


def is_run_flag(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("run_flag"))


def _type_name(tp: Any) -> str:
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool | None:
    """Whether ``value`` fits ``tp``; None for a type this check does not know (it is then not checked)."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # JSON writes 1.0 as 1: ints are floats here, as in TrainConfig
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple) or tp in (list, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            return False
        return all(_matches(v, args[0]) is not False for v in value) if args and origin is list else True
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    return None


class MethodOptions:
    """Base of the built-in ``Options`` dataclasses: checks every field against its annotation.

    Subclasses that define ``__post_init__`` call ``super().__post_init__()`` first. A plugin's ``Options`` need not
    derive from it: any dataclass whose fields all have defaults will do.
    """

    def __post_init__(self) -> None:
        try:
            hints = typing.get_type_hints(type(self))
        except Exception:  # annotations naming what the module cannot resolve (e.g. a class local to a function)
            hints = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name not in hints:
                continue
            tp, value = hints[f.name], getattr(self, f.name)
            union = typing.get_origin(tp) in (typing.Union, types.UnionType)
            allowed = typing.get_args(tp) if union else (tp,)
            verdicts = [_matches(value, t) for t in allowed]
            if True in verdicts or None in verdicts:
                continue
            names = " or ".join(_type_name(t) for t in allowed)
            raise ConfigError(f"option {f.name} must be {names}, got {value!r} ({type(value).__name__})")


@dataclass
class NoOptions(MethodOptions):
    """The options of a method that has none."""


class Method:
    """A way to make a frozen backbone trainable for a task.

    Subclasses set ``description``, ``traits`` and ``Options`` and implement :meth:`prepare`; :func:`register`
    sets ``name``. ``after_backward`` is called after every backward pass (e.g. AdaLoRA's rank allocation).
    :meth:`task_metadata` and :meth:`lora_task` let a bank serve a method whose trained tensors are no adapters or
    LoRA layers (FacT-TT): its file records what the conversion needs, and is read as the equal LoRA layers.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    traits: ClassVar[Traits] = Traits()
    Options: ClassVar[type] = NoOptions

    @property
    def prunes(self) -> bool:
        """Same as ``traits.prunes`` (the attribute methods had before traits)."""
        return self.traits.prunes

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        """The fields of ``Options`` set with ``--method-kwargs`` (run-flag fields excluded)."""
        return [f for f in dataclasses.fields(cls.Options) if not is_run_flag(f)]

    @classmethod
    def options_from(cls, cfg: TrainConfig) -> Any:
        """The method's ``Options`` for a run: ``cfg.method_kwargs`` plus the run flags its options read.

        This is the one place where run configuration turns into method options.

        Raises:
            ConfigError: one line naming the method, for an unknown key (listing the valid ones) or a bad value.
        """
        valid = sorted(f.name for f in cls.option_fields())
        kwargs = dict(cfg.method_kwargs or {})
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ConfigError(f"method {cls.name}: unknown option(s) {unknown}; valid: {', '.join(valid) or 'none'}")
        flags = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls.Options) if is_run_flag(f)}
        try:
            return cls.Options(**flags, **kwargs)
        except ConfigError as e:
            raise ConfigError(f"method {cls.name}: {e}") from e

    @staticmethod
    def context_from(cfg: TrainConfig, model: nn.Module, *, total_steps: int) -> PrepareContext:
        """The :class:`PrepareContext` of a run on ``model`` (the backbone, before :meth:`prepare`)."""
        budget = parameter_budget(model, budget_params=cfg.budget_params, budget_dim=cfg.budget_dim)
        return PrepareContext(seed=cfg.seed, budget=budget, total_steps=total_steps)

    def prepare(self, model: nn.Module, options: Any, ctx: PrepareContext) -> nn.Module:
        """Make ``model`` (a frozen-to-be backbone with its new head) trainable the method's way; returns it.

        Args:
            model: the backbone, head already reset to the task's classes.
            options: an instance of ``self.Options``.
            ctx: seed, budget and step count of the run.
        """
        raise NotImplementedError

    def prepare_from_config(self, model: nn.Module, cfg: TrainConfig, *, total_steps: int) -> nn.Module:
        """:meth:`prepare` with the options and context of the run ``cfg`` (what ``mimi train`` does)."""
        return self.prepare(model, self.options_from(cfg), self.context_from(cfg, model, total_steps=total_steps))

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Hook called after each backward pass, before the optimizer step."""

    def extra_info(self, model: nn.Module) -> dict[str, Any]:
        """Method-specific facts to record in the run summary (e.g. per-layer ranks)."""
        return {}

    def task_metadata(self, model: nn.Module) -> dict[str, str]:
        """Extra metadata entries a task file of this method needs to be served (beside its tensors), e.g. a scale
        the trained tensors do not hold; ``{}`` for most methods. Keep them short: every byte is in the file."""
        return {}

    def lora_task(
        self, meta: dict[str, str], tensors: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict]] | None:
        """A task file of this method rewritten, at read time, as LoRA layers a bank serves; None (the default)
        where its tensors are served as they are.

        Args:
            meta: the file's metadata (long keys, as :func:`mimi.core.taskfile.read_metadata` gives it).
            tensors: its trained tensors, dequantised, by the names they were trained under.

        Returns:
            ``(tensors, layout)``: every trained tensor of the task in the new form (``<layer>.lora_a.weight``,
            ``<layer>.lora_b.weight``; the head and any other tensor passed on unchanged) and the per-layer LoRA
            layout ``{layer: {"rank", "alpha"}}`` (update ``alpha / rank * B A``); or None to leave the file as is.

        Raises:
            CheckpointError: the file lacks what the conversion needs (naming the fix).
        """
        return None


def parameter_budget(
    model: nn.Module, *, budget_params: int | list[int] | None = None, budget_dim: int | list[int] | None = None
) -> int | None:
    """The adapter-parameter budget of a run: ``budget_params``, or the parameters of uniform sequential adapters of
    hidden size ``budget_dim`` on ``model``'s blocks (the one rule behind ``--budget-params`` / ``--budget-dim``).
    Where several budgets are given, the smallest: the run's last."""
    budgets = parameter_budgets(model, budget_params=budget_params, budget_dim=budget_dim)
    return budgets[-1] if budgets else None


def parameter_budgets(
    model: nn.Module, *, budget_params: int | list[int] | None = None, budget_dim: int | list[int] | None = None
) -> list[int]:
    """Every budget of a run in adapter parameters, largest first (one for most runs; several when a pruning run
    keeps a task at each); ``[]`` when none is given."""
    if budget_dim is not None:
        dims = budget_dim if isinstance(budget_dim, list) else [budget_dim]
        return sorted({uniform_adapter_params(model, d) for d in dims}, reverse=True)
    if budget_params is None:
        return []
    return sorted(set(budget_params if isinstance(budget_params, list) else [budget_params]), reverse=True)


METHODS: dict[str, type[Method]] = {}

MethodT = TypeVar("MethodT", bound=Method)


def _check_method_class(name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"method {name!r}: {cls!r} is not a mimi.methods.Method subclass")
    if not dataclasses.is_dataclass(cls.Options) or not isinstance(cls.Options, type):
        raise ConfigError(f"method {name!r}: {cls.__name__}.Options must be a dataclass")
    if not isinstance(cls.traits, Traits):
        raise ConfigError(f"method {name!r}: {cls.__name__}.traits must be a mimi.methods.Traits")
    for f in dataclasses.fields(cls.Options):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"method {name!r}: option {f.name} needs a default")
        if is_run_flag(f) and f.name not in RUN_FLAGS:
            raise ConfigError(f"method {name!r}: option {f.name} is no run flag; run flags: {', '.join(RUN_FLAGS)}")


def register(name: str, *, replace: bool = False) -> Callable[[type[MethodT]], type[MethodT]]:
    """Class decorator: make a :class:`Method` subclass available as ``--method name``.

    Args:
        name: the method's name; set as the class's ``name``.
        replace: allow replacing a method already registered under ``name`` by another class.

    Raises:
        ConfigError: if the class is no Method with a dataclass ``Options`` and :class:`Traits`, or the name is
            taken by another class (and ``replace`` is False).
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"register: the method name must be a non-empty string, got {name!r}")

    def deco(cls: type[MethodT]) -> type[MethodT]:
        _check_method_class(name, cls)
        existing = METHODS.get(name)
        if existing is not None and existing is not cls and not replace:
            raise ConfigError(
                f"method {name!r} is already registered ({existing.__module__}.{existing.__qualname__}); "
                "pass replace=True to replace it"
            )
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def unregister(name: str) -> None:
    """Remove the method ``name`` from the registry (no error if there is none)."""
    METHODS.pop(name, None)


def _add_plugin(name: str, obj: Any) -> None:
    if METHODS.get(name) is not obj:  # the plugin module may have registered it itself on import
        register(name)(obj)


def _load_plugins() -> None:
    plugins.load_entry_points(plugins.METHODS_GROUP, _add_plugin)


def method_names() -> list[str]:
    """Every registered method name, installed plugins included, sorted."""
    _load_plugins()
    return sorted(METHODS)


def method_class(name: str) -> type[Method]:
    """The class registered as ``name`` (installed plugins included).

    Raises:
        ConfigError: ``unknown method ...; choose one of ...``.
    """
    _load_plugins()
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def get_method(name: str) -> Method:
    """A fresh instance of the method ``name`` (methods may keep per-run state, e.g. AdaLoRA's step)."""
    return method_class(name)()


def method_traits(name: str | None) -> Traits | None:
    """The traits of the method ``name``; None for a name not registered here (e.g. read from an old file)."""
    _load_plugins()
    cls = METHODS.get(name) if isinstance(name, str) else None
    return cls.traits if cls is not None else None


def servable_methods() -> list[str]:
    """The methods whose task files an :class:`~mimi.AdapterBank` can serve, sorted."""
    return [n for n in method_names() if METHODS[n].traits.servable]
