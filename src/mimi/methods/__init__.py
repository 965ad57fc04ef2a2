"""Training methods by name: MiMi, adapters, baselines and external peers behind one small interface.

A method of your own is a :class:`Method` subclass with an ``Options`` dataclass and :class:`Traits`, made available
with :func:`register` (or, from an installed package, an entry point of the group ``mimi.methods``).
"""

# Importing a method module registers its methods: adapters and simple baselines, LoRA, SSF, VPT, the PEFT peers.
from mimi.methods import adapter_methods, fact, lora, peft_methods, peft_vera, ssf, vpt  # noqa: F401
from mimi.methods.base import (
    METHODS,
    Method,
    MethodOptions,
    NoOptions,
    PrepareContext,
    Traits,
    get_method,
    method_class,
    method_names,
    method_traits,
    option,
    parameter_budget,
    parameter_budgets,
    register,
    run_flag,
    servable_methods,
    unregister,
)

__all__ = [
    "METHODS",
    "Method",
    "MethodOptions",
    "NoOptions",
    "PrepareContext",
    "Traits",
    "get_method",
    "method_class",
    "method_names",
    "method_traits",
    "option",
    "parameter_budget",
    "parameter_budgets",
    "register",
    "run_flag",
    "servable_methods",
    "unregister",
]
