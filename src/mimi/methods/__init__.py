"""Training methods by name: MiMi, adapters, baselines and external peers behind one small interface."""

# Importing a method module registers its methods: adapters and simple baselines, LoRA, SSF, VPT, the PEFT peers.
from mimi.methods import adapter_methods, lora, peft_methods, ssf, vpt  # noqa: F401
from mimi.methods.base import METHODS, Method, get_method, register

__all__ = ["METHODS", "Method", "get_method", "register"]
