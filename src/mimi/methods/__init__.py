"""Training methods by name: MiMi, adapters, baselines and external peers behind one small interface."""

from . import adapter_methods  # noqa: F401  (registers the adapter methods and simple baselines)
from .base import METHODS, Method, get_method, register

__all__ = ["METHODS", "Method", "get_method", "register"]
