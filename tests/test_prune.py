import pytest
import torch
from conftest import image_size, randomize_adapters, tiny_swin, tiny_vit

import mimi


def _adapted(factory=tiny_vit, h=8, seed=0):
    torch.manual_seed(seed)
    model = factory().eval()
    mimi.add_adapters(model, mimi.AdapterConfig(hidden_dim=h))
    randomize_adapters(model, seed)
    return model


def _count(model):
    """Hand count: sum over adapters of d_in*h + h (down) + h*d_out + d_out (up)."""
    return sum(
        a.in_dim * a.hidden_dim + a.hidden_dim + a.hidden_dim * a.out_dim + a.out_dim for _, a in mimi.adapters(model)
    )


@pytest.mark.parametrize("factory", [tiny_vit, tiny_swin])
def test_prune_keeps_exactly_the_global_top_k(factory):
    model = _adapted(factory)
    scores = mimi.score_neurons(model, "mimi")
    budget = mimi.adapter_param_count(model) // 3
    sizes = mimi.prune(model, budget=budget, score="mimi")
    kept = {(n, int(i)) for n, a in mimi.adapters(model) for i in a.neuron_ids}
    ranked = sorted(((float(s), n, j) for n, v in scores.items() for j, s in enumerate(v)), key=lambda t: -t[0])
    top = {(n, j) for _, n, j in ranked[: len(kept)]}
    assert kept == top
    assert mimi.adapter_param_count(model) == _count(model) <= budget
    assert sum(p.numel() for _, a in mimi.adapters(model) for p in a.parameters()) == _count(model)
    assert sizes == {n: a.hidden_dim for n, a in mimi.adapters(model)}
    # As close as possible: adding the next-ranked neuron would exceed the budget.
    n_next = ranked[len(kept)][1]
    d_in = dict(mimi.adapters(_adapted(factory)))[n_next].in_dim
    cost = 2 * d_in + 1 + (d_in if n_next not in sizes else 0)
    assert mimi.adapter_param_count(model) + cost > budget


def test_pruning_inert_neurons_keeps_outputs():
    model = _adapted(h=8)
    with torch.no_grad():
        for _, a in mimi.adapters(model):
            a.down.weight[4:] = 0.0  # neurons 4..7: zero in, zero out
            a.down.bias[4:] = 0.0
            a.up.weight[:, 4:] = 0.0
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    budget = sum(a.num_params(4) for _, a in mimi.adapters(model))
    sizes = mimi.prune(model, budget=budget, score="mimi")
    assert set(sizes.values()) == {4}
    assert torch.allclose(model(x), before, atol=1e-6)


def test_adapter_with_no_neuron_is_removed_and_outputs_follow():
    model = _adapted(h=4)
    names = [n for n, _ in mimi.adapters(model)]
    with torch.no_grad():
        dead = dict(mimi.adapters(model))[names[0]]
        dead.down.weight.zero_()
        dead.down.bias.zero_()
        dead.up.weight.zero_()
        dead.up.bias.zero_()
    x = torch.randn(1, 3, 32, 32)
    before = model(x)
    budget = mimi.adapter_param_count(model) - dead.num_params()
    sizes = mimi.prune(model, budget=budget, score="mimi")
    assert names[0] not in sizes and len(sizes) == len(names) - 1
    assert names[0] not in dict(mimi.adapters(model))
    assert torch.allclose(model(x), before, atol=1e-6)


def test_magnitude_removes_the_same_fraction_everywhere():
    model = _adapted(h=8)
    scores = mimi.score_neurons(model, "magnitude")
    budget = sum(a.num_params(3) for _, a in mimi.adapters(model))
    sizes = mimi.prune(model, budget=budget, score="magnitude")
    assert set(sizes.values()) == {3}
    for n, a in mimi.adapters(model):
        assert set(a.neuron_ids.tolist()) == set(torch.topk(scores[n], 3).indices.tolist())


def test_budget_larger_than_model_is_a_no_op_and_zero_removes_all():
    model = _adapted(h=4)
    full = mimi.adapter_param_count(model)
    assert set(mimi.prune(model, budget=full + 10).values()) == {4}
    assert mimi.prune(model, budget=0) == {}
    assert mimi.adapters(model) == []
    s = image_size(model)
    assert model(torch.randn(1, 3, s, s)).shape == (1, 5)


def test_prune_slices_the_right_weights():
    model = _adapted(h=6)
    before = {n: (a.down.weight.detach().clone(), a.up.weight.detach().clone()) for n, a in mimi.adapters(model)}
    mimi.prune(model, budget=mimi.adapter_param_count(model) // 2)
    alive = mimi.adapters(model)
    assert alive
    for name, a in alive:
        ids = a.neuron_ids
        assert torch.equal(a.down.weight, before[name][0][ids]) and torch.equal(a.up.weight, before[name][1][:, ids])


@pytest.mark.parametrize("budget", [-1, 1.5, "10"])
def test_bad_budget(budget):
    with pytest.raises(mimi.ConfigError, match="budget"):
        mimi.prune(_adapted(h=2), budget=budget)
