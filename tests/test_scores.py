import pytest
import torch
from conftest import randomize_adapters, tiny_swin, tiny_vit

import mimi


def _known_weights(model):
    """Adapter i, neuron j gets W_down[j, :] = (i + 1) * (j + 1) and W_up[:, j] = -(j + 1)."""
    with torch.no_grad():
        for i, (_, a) in enumerate(mimi.adapters(model)):
            for j in range(a.hidden_dim):
                a.down.weight[j].fill_((i + 1) * (j + 1))
                a.up.weight[:, j].fill_(-(j + 1))


def test_mimi_score_equals_hand_computation():
    model = tiny_vit()
    mimi.add_adapters(model, mimi.AdapterConfig(hidden_dim=3))
    _known_weights(model)
    scores = mimi.score_neurons(model, "mimi")
    d = 64
    for i, (name, _) in enumerate(mimi.adapters(model)):
        expected = torch.tensor([(d * (i + 1) * (j + 1) + d * (j + 1)) / (2 * d) for j in range(3)])
        assert torch.allclose(scores[name], expected), name
    weighted = mimi.score_neurons(model, "mimi-weighted")
    for name, s in scores.items():
        assert torch.allclose(weighted[name], s / s.max())
        assert weighted[name].max() == 1.0


def test_unnormalised_scores_equal_l1_sum():
    model = tiny_vit()
    mimi.add_adapters(model, mimi.AdapterConfig(hidden_dim=3))
    randomize_adapters(model)
    for method in ("global-l1", "magnitude"):
        for name, a in mimi.adapters(model):
            expected = a.down.weight.abs().sum(1) + a.up.weight.abs().sum(0)
            assert torch.allclose(mimi.score_neurons(model, method)[name], expected)


def test_swin_scores_are_fan_normalised_across_widths():
    """Swin adapters have widths 32 and 64: equal mean |w| must give equal MiMi scores, unequal L1 sums."""
    model = tiny_swin()
    mimi.add_adapters(model, mimi.AdapterConfig(hidden_dim=4))
    widths = {a.in_dim for _, a in mimi.adapters(model)}
    assert widths == {32, 64}
    with torch.no_grad():
        for _, a in mimi.adapters(model):
            a.down.weight.fill_(0.5)
            a.up.weight.fill_(-0.5)
    mimi_scores = torch.cat(list(mimi.score_neurons(model, "mimi").values()))
    l1_scores = torch.cat(list(mimi.score_neurons(model, "global-l1").values()))
    assert torch.allclose(mimi_scores, torch.full_like(mimi_scores, 0.5))
    assert l1_scores.unique().numel() == 2


def tiny_vit_with(h):
    m = tiny_vit()
    mimi.add_adapters(m, mimi.AdapterConfig(hidden_dim=h))
    return m


def test_random_scores_are_nested_across_prunes():
    """Two successive random prunes keep a neuron only if it outranks every neuron removed so far."""
    model = tiny_vit_with(16)
    first = mimi.score_neurons(model, "random", seed=3)
    assert len(first) == 4 and all(s.numel() == 16 for s in first.values())
    for budget in (mimi.adapter_param_count(model) // 2, mimi.adapter_param_count(model) // 4):
        sizes = mimi.prune(model, budget=budget, score="random", seed=3)
        now = mimi.score_neurons(model, "random", seed=3)
        alive = dict(mimi.adapters(model))
        assert sizes == {n: a.hidden_dim for n, a in alive.items()}
        for name, a in alive.items():
            assert torch.equal(now[name], first[name][a.neuron_ids])  # same neuron, same score after shrinking
        kept = {(n, int(i)) for n, a in alive.items() for i in a.neuron_ids}
        removed = [float(first[n][i]) for n in first for i in range(16) if (n, i) not in kept]
        assert removed and max(removed) <= min(float(s.min()) for s in now.values())
    other_seed = mimi.score_neurons(tiny_vit_with(16), "random", seed=4)
    assert not torch.equal(first["blocks.0.ls1.adapter"], other_seed["blocks.0.ls1.adapter"])


def test_gradient_score_uses_accumulated_gradients():
    torch.manual_seed(0)
    model = tiny_vit()
    mimi.add_adapters(model, mimi.AdapterConfig(hidden_dim=4))
    randomize_adapters(model)
    acc = mimi.GradientAccumulator(model)
    with pytest.raises(mimi.ConfigError, match="GradientAccumulator"):
        mimi.score_neurons(model, "gradient")
    total = {n: (torch.zeros_like(a.down.weight), torch.zeros_like(a.up.weight)) for n, a in mimi.adapters(model)}
    for step in range(3):
        model.zero_grad()
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(step))
        model(x).sum().backward()
        acc.update()
        for n, a in mimi.adapters(model):
            total[n][0].add_(a.down.weight.grad)
            total[n][1].add_(a.up.weight.grad)
    scores = mimi.score_neurons(model, "gradient", accumulator=acc)
    for n, a in mimi.adapters(model):
        expected = (a.down.weight * total[n][0]).abs().sum(1) + (a.up.weight * total[n][1]).abs().sum(0)
        assert torch.allclose(scores[n], expected.detach(), rtol=1e-5)
    assert acc.steps == 3


def test_unknown_score_is_rejected():
    model = tiny_vit_with(2)
    with pytest.raises(mimi.ConfigError, match="unknown score"):
        mimi.score_neurons(model, "entropy")


def test_the_old_method_keyword_warns_and_still_works():
    model = tiny_vit_with(4)
    randomize_adapters(model)
    want = mimi.score_neurons(model, score="magnitude")
    with pytest.warns(DeprecationWarning, match=r"score_neurons\(method=...\) is deprecated") as record:
        got = mimi.score_neurons(model, method="magnitude")
    assert record[0].filename == __file__  # the warning points at the caller, not at mimi
    assert all(torch.equal(got[n], want[n]) for n in want)
    with pytest.warns(DeprecationWarning), pytest.raises(mimi.ConfigError, match="give score= only"):
        mimi.score_neurons(model, score="random", method="magnitude")
    budget = mimi.adapter_param_count(model) // 2
    pruned = tiny_vit_with(4)
    randomize_adapters(pruned)
    with pytest.warns(DeprecationWarning, match=r"prune\(method=...\) is deprecated") as record:
        sizes = mimi.prune(pruned, budget=budget, method="magnitude")
    assert record[0].filename == __file__
    randomize_adapters(model)
    assert mimi.prune(model, budget=budget, score="magnitude") == sizes
