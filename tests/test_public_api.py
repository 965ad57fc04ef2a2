"""The public names of mimi exist, are the right kind, and a task file round-trips through them.

Guards the reorganisation into mimi.core/..., and the lazy loading of mimi/__init__.py: a name moved or lost
breaks user code that only ever wrote ``import mimi``.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from conftest import randomize_adapters, tiny_vit

import mimi

FUNCTIONS = (
    "add_adapters",
    "adapters",
    "adapter_config",
    "adapter_param_count",
    "score_neurons",
    "prune",
    "count_trainable",
    "remove_adapter",
    "save_adapters",
    "load_adapters",
    "read_metadata",
)
ERRORS = ("MimiError", "BackboneError", "CheckpointError", "ConfigError", "DataError", "ModelError")


@pytest.mark.parametrize("name", FUNCTIONS)
def test_functions(name):
    obj = getattr(mimi, name)
    assert inspect.isfunction(obj), f"mimi.{name} is {type(obj).__name__}, not a function"
    assert not inspect.ismodule(obj)


def test_adapters_is_the_function_not_a_module():
    # mimi.adapters was once also a module name (mimi/adapters.py); the public name must be the function.
    assert inspect.isfunction(mimi.adapters) and mimi.adapters.__module__ == "mimi.core.adapters"


def test_classes_and_tables():
    assert dataclasses.is_dataclass(mimi.AdapterConfig) and isinstance(mimi.AdapterConfig, type)
    assert issubclass(mimi.Adapter, torch.nn.Module)
    assert inspect.isclass(mimi.MiMiPruner) and inspect.isclass(mimi.GradientAccumulator)
    assert isinstance(mimi.SCORES, dict) and mimi.SCORES and all(isinstance(k, str) for k in mimi.SCORES)
    assert inspect.isclass(mimi.AdapterBank) and mimi.AdapterBank.__module__ == "mimi.deploy.bank"
    assert inspect.ismethod(mimi.AdapterBank.from_task_files)  # a classmethod, bound to the class
    for name in ERRORS:
        err = getattr(mimi, name)
        assert issubclass(err, Exception) and issubclass(err, mimi.MimiError), name


def test_submodules():
    # Reached as attributes of the package after a bare ``import mimi`` (loaded lazily).
    assert inspect.isfunction(mimi.trainer.train) and inspect.isfunction(mimi.trainer.load_run)
    assert dataclasses.is_dataclass(mimi.config.TrainConfig)
    assert inspect.isfunction(mimi.shrink.apply_plan)


def test_all_is_complete_and_star_import_works():
    assert len(set(mimi.__all__)) == len(mimi.__all__)
    for name in mimi.__all__:
        assert getattr(mimi, name) is not None, name
        assert name in dir(mimi), name
    ns: dict = {}
    exec("from mimi import *", ns)
    assert set(mimi.__all__) <= set(ns)
    assert mimi.__version__
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = mimi.no_such_name


def test_task_file_round_trip(tmp_path):
    torch.manual_seed(0)
    model = tiny_vit().eval()
    mimi.add_adapters(model, mimi.AdapterConfig(hidden_dim=8))
    randomize_adapters(model)  # adapters start as the identity; give them an effect on the logits
    (first, _), (second, _) = mimi.adapters(model)[:2]
    mimi.shrink.apply_plan(model, {first: [0, 2, 5], second: []})  # uneven sizes, one adapter removed
    assert mimi.count_trainable(model) > 0
    path = mimi.save_adapters(model, tmp_path / "task.safetensors")
    assert mimi.read_metadata(path)["format"]

    torch.manual_seed(0)  # the same random backbone, as a pretrained one would be the same
    fresh = mimi.load_adapters(tiny_vit().eval(), path)
    assert dict((n, a.hidden_dim) for n, a in mimi.adapters(fresh)) == {
        n: a.hidden_dim for n, a in mimi.adapters(model)
    }
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
