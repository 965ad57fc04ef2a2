import pytest
import torch
from conftest import image_size, randomize_adapters, tiny_dinov2, tiny_vit

import mimi
from mimi.core.adapters import AdaptedBranch, find_blocks


def test_zero_init_leaves_outputs_unchanged(any_model):
    x = torch.randn(2, 3, image_size(any_model), image_size(any_model))
    before = any_model(x)
    mimi.add_adapters(any_model, mimi.AdapterConfig(hidden_dim=8))
    assert torch.equal(any_model(x), before)


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_two_adapters_per_block_and_only_adapters_and_head_train(any_model, placement):
    n_blocks = len(find_blocks(any_model))
    mimi.add_adapters(any_model, mimi.AdapterConfig(hidden_dim=8, placement=placement))
    ads = mimi.adapters(any_model)
    assert len(ads) == 2 * n_blocks
    head = {id(p) for p in any_model.get_classifier().parameters()}
    adapter_params = {id(p) for _, a in ads for p in a.parameters()}
    for name, p in any_model.named_parameters():
        assert p.requires_grad == (id(p) in head or id(p) in adapter_params), name
    assert mimi.count_trainable(any_model) == sum(p.numel() for _, a in ads for p in a.parameters()) + sum(
        p.numel() for p in any_model.get_classifier().parameters()
    )


def test_one_step_changes_only_adapters_and_head_and_every_trainable_gets_grad(any_model):
    mimi.add_adapters(any_model, mimi.AdapterConfig(hidden_dim=8))
    randomize_adapters(any_model)  # with W_up = 0 the down-projection's gradient is exactly zero
    any_model.train()
    before = {n: p.detach().clone() for n, p in any_model.named_parameters()}
    opt = torch.optim.AdamW([p for p in any_model.parameters() if p.requires_grad], lr=1e-2)
    s = image_size(any_model)
    loss = torch.nn.functional.cross_entropy(any_model(torch.randn(4, 3, s, s)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for n, p in any_model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
    opt.step()
    for n, p in any_model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == p.requires_grad, n


def test_parameter_count_matches_hand_computation():
    model = tiny_vit()
    mimi.add_adapters(model, mimi.AdapterConfig(hidden_dim=8))
    d, h, blocks = 64, 8, 2
    per_adapter = d * h + h + h * d + d  # W_down, b_down, W_up, b_up
    assert mimi.adapter_param_count(model) == 2 * blocks * per_adapter
    assert mimi.count_trainable(model) == 2 * blocks * per_adapter + 64 * 5 + 5


def test_reduction_sets_hidden_from_width():
    model = tiny_vit()
    mimi.add_adapters(model, mimi.AdapterConfig(reduction=4))
    assert {a.hidden_dim for _, a in mimi.adapters(model)} == {16}


def test_sequential_adapter_sees_layerscaled_branch():
    """DINOv2-style blocks: the adapter reads ls1(attn(.)), i.e. it wraps the LayerScale module."""
    model = tiny_dinov2()
    mimi.add_adapters(model, mimi.AdapterConfig(hidden_dim=4))
    block = model.blocks[0]
    assert isinstance(block.ls1, AdaptedBranch) and isinstance(block.ls2, AdaptedBranch)
    seen = {}
    block.ls1.adapter.register_forward_hook(lambda m, i, o: seen.setdefault("in", i[0]))
    block.ls1.branch.register_forward_hook(lambda m, i, o: seen.setdefault("ls_out", o))
    model(torch.randn(1, 3, 28, 28))
    assert torch.equal(seen["in"], seen["ls_out"])


def test_parallel_adapter_matches_formula():
    torch.manual_seed(0)
    model = tiny_vit().eval()
    mimi.add_adapters(model, mimi.AdapterConfig(hidden_dim=4, placement="parallel", scale=0.5, targets=("mlp",)))
    randomize_adapters(model)
    block = model.blocks[0]
    x = torch.randn(1, 5, 64)
    wrapped = block.mlp
    expected = wrapped.branch(x) + 0.5 * wrapped.adapter.up(torch.nn.functional.gelu(wrapped.adapter.down(x)))
    assert torch.allclose(wrapped(x), expected, atol=1e-6)
    assert len(mimi.adapters(model)) == 2  # mlp only, two blocks


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(hidden_dim=0),
        dict(hidden_dim=4, reduction=2),
        dict(placement="middle"),
        dict(act="tanhh"),
        dict(targets=("norm",)),
        dict(reduction=-1.0),
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(mimi.ConfigError):
        mimi.AdapterConfig(**kwargs)


def test_non_transformer_model_is_rejected():
    import timm

    cnn = timm.create_model("test_resnet", pretrained=False)
    with pytest.raises(mimi.ModelError, match="no transformer block"):
        mimi.add_adapters(cnn, mimi.AdapterConfig(hidden_dim=4))


def test_adding_twice_is_rejected():
    model = tiny_vit()
    mimi.add_adapters(model, mimi.AdapterConfig(hidden_dim=4))
    with pytest.raises(mimi.ModelError, match="already holds adapters"):
        mimi.add_adapters(model, mimi.AdapterConfig(hidden_dim=4))
