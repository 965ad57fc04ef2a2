import warnings

import pytest
import torch
from conftest import randomize_adapters, tiny_vit

import mimi


def test_targets_halve_and_land_exactly_on_budget():
    pruner = mimi.MiMiPruner(budget=1000, rho=0.5)
    assert pruner.planned_targets(10_000) == [5000, 2500, 1250, 1000]
    assert pruner.next_target(1000) is None
    assert mimi.MiMiPruner(budget=1000, rho=1.0).planned_targets(10_000) == [1000]  # one-shot


def test_steps_shrink_monotonically_to_budget():
    torch.manual_seed(0)
    model = tiny_vit()
    mimi.add_adapters(model, mimi.AdapterConfig(hidden_dim=16))
    randomize_adapters(model)
    budget = 2000
    pruner = mimi.MiMiPruner(budget=budget, rho=0.5)
    counts = [mimi.adapter_param_count(model)]
    while not pruner.done(model):
        pruner.step(model)
        counts.append(mimi.adapter_param_count(model))
        assert counts[-1] <= pruner.history[-1]["target"]
    assert counts == sorted(counts, reverse=True)
    assert counts[-1] <= budget
    assert budget - counts[-1] < 2 * 64 + 1 + 64  # within one neuron (+ an up-bias) of the budget
    assert pruner.cycle == len(counts) - 1
    restored = mimi.MiMiPruner.from_state_dict(pruner.state_dict())
    assert restored.state_dict() == pruner.state_dict()


@pytest.mark.parametrize(
    "kwargs", [dict(budget=-1), dict(budget=10, rho=0.0), dict(budget=10, rho=1.5), dict(budget=10, score="nope")]
)
def test_bad_pruner_config(kwargs):
    with pytest.raises(mimi.ConfigError):
        mimi.MiMiPruner(**kwargs)


def test_the_old_method_keyword_warns_and_still_works():
    with pytest.warns(DeprecationWarning, match=r"MiMiPruner\(method=...\) is deprecated") as record:
        pruner = mimi.MiMiPruner(budget=1000, method="random")
    assert record[0].filename == __file__  # the warning points at the caller
    assert pruner.score == "random" and pruner.state_dict()["score"] == "random"
    with pytest.warns(DeprecationWarning, match="read .score"):
        assert pruner.method == "random"


def test_states_saved_before_the_rename_resume_without_a_warning():
    old = {"budget": 1000, "rho": 0.5, "method": "magnitude", "seed": 3, "cycle": 2, "history": [{"cycle": 1}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner = mimi.MiMiPruner.from_state_dict(old)
    assert (pruner.score, pruner.seed, pruner.cycle, pruner.history) == ("magnitude", 3, 2, [{"cycle": 1}])
    assert "method" not in pruner.state_dict() and old["method"] == "magnitude"  # the caller's dict is untouched
