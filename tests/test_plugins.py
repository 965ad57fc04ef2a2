"""Methods and scores from outside the package: registered by user code, or installed as entry points.

Nothing here touches src/: a test plugin is defined in this file (and, for entry points, written to a temporary
folder as an installed distribution), trained end to end, listed by `mimi methods` and served by a bank.
"""

from __future__ import annotations

import json
import sys
import textwrap
import warnings
from dataclasses import dataclass, field

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from vtab_fixture import write_vtab_task

import mimi
from mimi.cli import main
from mimi.config import TrainConfig
from mimi.core import plugins
from mimi.core.adapters import AdapterConfig, adapter_param_count, add_adapters
from mimi.core.errors import CheckpointError, ConfigError
from mimi.core.scores import SCORES, check_score, is_global, register_score, score_names
from mimi.methods import METHODS, Method, PrepareContext, Traits, get_method, method_class, method_names, register

CALLS = {"down-norm": 0}


@pytest.fixture(autouse=True)
def registries():
    """Every test leaves the method and score registries, and the plugin loading state, as it found them."""
    methods, scores = dict(METHODS), dict(SCORES)
    yield
    METHODS.clear()
    METHODS.update(methods)
    SCORES.clear()
    SCORES.update(scores)
    plugins.reset()


# ---------------------------------------------------------------- a plugin defined by user code


@dataclass
class TinyOptions:  # a plain dataclass: a plugin's options need not derive from mimi's MethodOptions
    hidden: int = field(default=8, metadata={"help": "hidden size of every MLP adapter at insertion"})
    act: str = field(default="gelu", metadata={"help": "adapter activation"})

    def __post_init__(self) -> None:
        if not isinstance(self.hidden, int) or self.hidden < 1:
            raise ConfigError(f"hidden must be a positive integer, got {self.hidden!r}")


class TinyPruned(Method):
    description = "test plugin: adapters beside nothing but the MLPs, pruned by MiMi's cycles"
    traits = Traits(prunes=True, servable=True)
    Options = TinyOptions

    def prepare(self, model: nn.Module, options: TinyOptions, ctx: PrepareContext) -> nn.Module:
        config = AdapterConfig(hidden_dim=options.hidden, act=options.act, targets=("mlp",), init_seed=ctx.seed)
        return add_adapters(model, config)


class TinyUnservable(TinyPruned):
    description = "test plugin: as tiny-pruned, but its task files are declared unservable"
    traits = Traits(prunes=True, servable=False)


def down_norm(adapter) -> torch.Tensor:
    """A score taking the adapter only (no keywords): the L2 norm of each neuron's down-projection row."""
    CALLS["down-norm"] += 1
    return adapter.down.weight.detach().norm(dim=1)


def _register_tiny() -> None:
    register("tiny-pruned")(TinyPruned)
    register("tiny-unservable")(TinyUnservable)
    register_score("down-norm", down_norm)


def test_registration_checks_and_one_line_errors():
    _register_tiny()
    assert get_method("tiny-pruned").name == "tiny-pruned" and "tiny-pruned" in method_names()
    assert check_score("down-norm") == "down-norm" and is_global("down-norm")
    with pytest.raises(ConfigError, match="already registered"):
        register("tiny-pruned")(TinyUnservable)
    register("tiny-pruned")(TinyPruned)  # the same class again: a no-op
    with pytest.raises(ConfigError, match="already registered"):
        register_score("down-norm", down_norm)
    with pytest.raises(ConfigError, match="not a mimi.methods.Method subclass"):
        register("not-a-method")(TinyOptions)
    cfg = TrainConfig(model="x", data="y", method="tiny-pruned", method_kwargs={"hiden": 4})
    with pytest.raises(ConfigError) as e:
        method_class("tiny-pruned").options_from(cfg)
    assert str(e.value) == "method tiny-pruned: unknown option(s) ['hiden']; valid: act, hidden"
    cfg.method_kwargs = {"hidden": 0}
    with pytest.raises(ConfigError, match=r"^method tiny-pruned: hidden must be a positive integer, got 0$"):
        method_class("tiny-pruned").options_from(cfg)
    with pytest.raises(ConfigError, match="unknown score 'down-nrm'; choose one of .*down-norm"):
        mimi.MiMiPruner(budget=10, score="down-nrm")


def test_a_plugin_method_and_score_train_prune_list_and_serve(tmp_path, capsys):
    _register_tiny()
    root = write_vtab_task(tmp_path / "data")
    torch.manual_seed(0)
    weights = tmp_path / "backbone.safetensors"  # training and the bank load the same backbone weights
    save_file(timm.create_model("test_vit", img_size=32, num_classes=0).state_dict(), str(weights))
    probe = add_adapters(timm.create_model("test_vit", img_size=32), AdapterConfig(hidden_dim=8, targets=("mlp",)))
    budget = adapter_param_count(probe) // 5  # rho 0.5: 1/2, 1/4, then the budget; three cuts
    out = tmp_path / "run"
    cfg = TrainConfig(
        model="test_vit",
        weights=str(weights),
        img_size=32,
        data="vtab1k:toy",
        data_root=str(root),
        method="tiny-pruned",
        method_kwargs={"hidden": 8},
        budget_params=budget,
        rho=0.5,
        score="down-norm",
        epochs=1,
        batch_size=16,
        lr=3e-3,
        device="cpu",
        seed=0,
        out=str(out),
        progress=False,
        tensorboard=False,
    )
    CALLS["down-norm"] = 0
    summary = mimi.trainer.train(cfg, log=lambda line: None)

    assert CALLS["down-norm"] > 0  # the plugin score chose the neurons of every cut
    assert len(summary) > 2
    params = [e["adapter_params"] for e in summary]
    assert params == sorted(params, reverse=True) and len(set(params)) == len(params) and params[-1] <= budget
    first, last = summary[0]["sizes"], summary[-1]["sizes"]
    assert set(first.values()) == {8} and all(last.get(n, 0) <= 8 for n in first) and last != first
    assert json.loads((out / "run.json").read_text())["method"] == "tiny-pruned"

    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert any(line.split()[0] == "tiny-pruned" and TinyPruned.description in line for line in listing.splitlines())
    assert main(["methods", "tiny-pruned"]) == 0
    detail = capsys.readouterr().out
    assert "prunes       yes" in detail and "servable     yes" in detail and "hidden: int = 8" in detail

    # The task file loads into a bank on the recorded backbone and gives the trained model's logits.
    task = out / "adapters.safetensors"
    bank = mimi.AdapterBank.from_task_files({"t": task}, device="cpu")
    run = mimi.trainer.load_run(out)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(bank.logits(x, "t"), run.model.eval()(x), atol=1e-5, rtol=0)

    # The same tensors recorded as a non-servable plugin method, or a method not installed here: refused, one line.
    tensors, meta = load_file(str(task)), mimi.read_metadata(task)
    for method, says in (("tiny-unservable", "cannot be served by a bank"), ("gone-plugin", "is not installed here")):
        other = tmp_path / f"{method}.safetensors"
        save_file(tensors, str(other), metadata={**meta, "method": method})
        with pytest.raises(CheckpointError, match=f"method '{method}' {says}; servable: .*tiny-pruned") as e:
            mimi.AdapterBank.from_task_files({"u": other}, device="cpu")
        assert "\n" not in str(e.value) and "tiny-unservable" not in str(e.value).split("servable:")[1]


# ---------------------------------------------------------------- a plugin installed as a distribution

PLUGIN = """
from dataclasses import dataclass, field

from mimi.core.adapters import AdapterConfig, add_adapters
from mimi.methods import Method, Traits


@dataclass
class DemoOptions:
    hidden: int = field(default=2, metadata={"help": "adapter size"})


class DemoMethod(Method):
    description = "demo plugin method"
    traits = Traits(servable=True)
    Options = DemoOptions

    def prepare(self, model, options, ctx):
        return add_adapters(model, AdapterConfig(hidden_dim=options.hidden, init_seed=ctx.seed))


def demo_score(adapter, *, name):
    return adapter.down.weight.detach().abs().sum(dim=1)


LOCAL = (demo_score, False)
"""

ENTRY_POINTS = """
[mimi.methods]
demo-method = mimi_plugin_demo:DemoMethod
broken-method = mimi_plugin_demo:DoesNotExist

[mimi.scores]
demo-score = mimi_plugin_demo:demo_score
demo-local = mimi_plugin_demo:LOCAL
"""


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """``mimi_plugin_demo`` as an installed distribution: its module and a dist-info folder on sys.path."""
    (tmp_path / "mimi_plugin_demo.py").write_text(textwrap.dedent(PLUGIN))
    info = tmp_path / "mimi_plugin_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mimi-plugin-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mimi_plugin_demo", raising=False)
    plugins.reset()
    return tmp_path


def test_entry_points_are_found_by_name_once(installed_plugin, capsys):
    with pytest.warns(RuntimeWarning, match="plugin 'broken-method' .* not loaded: AttributeError"):
        cls = method_class("demo-method")
    assert cls.__name__ == "DemoMethod" and cls.name == "demo-method" and "broken-method" not in METHODS
    assert get_method("demo-method").traits.servable
    assert check_score("demo-score") == "demo-score" and {"demo-score", "demo-local"} <= set(score_names())
    assert is_global("demo-score") and not is_global("demo-local")

    model = add_adapters(timm.create_model("test_vit", img_size=32), AdapterConfig(hidden_dim=4))
    local = mimi.prune(model, budget=adapter_param_count(model) // 2, score="demo-local")
    assert len(set(local.values())) == 1 and max(local.values()) < 4  # local: the same cut in every adapter

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the groups are read once: no second warning for the broken entry point
        assert main(["methods"]) == 0
    assert "demo-method" in capsys.readouterr().out
    assert main(["methods", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method 'nope'; choose one of" in err and "demo-method" in err


def test_plugins_are_not_read_until_a_lookup(installed_plugin):
    assert "demo-method" not in METHODS and "demo-score" not in SCORES
    with pytest.warns(RuntimeWarning):
        assert "demo-method" in method_names()
