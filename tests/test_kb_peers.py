"""Peers at very small budgets (issue 29): adapters on chosen blocks / branches, LoRA r=1 on qkv, VPT-deep with 1-2
prompts, PEFT VeRA. Parameter counts by hand, placement, zero init, what trains, save -> load."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import timm
import torch
from conftest import tiny_dinov2, tiny_vit
from torch import nn

import mimi
from mimi.config import TrainConfig
from mimi.core.adapters import (
    AdapterConfig,
    adapter_param_count,
    adapter_roles,
    adapters,
    add_adapters,
    uniform_adapter_params,
)
from mimi.core.errors import ConfigError
from mimi.core.taskfile import load_adapters, restore_trained, save_adapters
from mimi.methods import get_method
from mimi.methods.adapter_methods import select_blocks

# Tiny ViT of conftest with 6 blocks: D=64, MLP 256, 5 classes.
D, DEPTH, C = 64, 6, 5
HEAD = D * C + C
A1 = 1 * (D + D + 1) + D  # one sequential adapter of hidden size 1 on a D-wide branch: 193
SLOT = {"attn": "ls1", "mlp": "ls2"}  # timm ViT blocks end their branches in ls1 / ls2 (Identity without LayerScale)


@functools.cache
def _vit6() -> nn.Module:
    torch.manual_seed(0)
    return tiny_vit(depth=DEPTH).eval()


def vit6() -> nn.Module:
    """A fresh copy of one seeded 6-block tiny ViT (building it costs more than the tests themselves)."""
    return copy.deepcopy(_vit6())


def prepared(method: str, make=vit6, *, seed: int = 0, budget_params=None, budget_dim=None, adapter_dim=None, **kw):
    """(bare backbone copy, prepared model, method object), the method's options as --method-kwargs JSON."""
    if method.startswith("peft"):
        pytest.importorskip("peft")
    torch.manual_seed(0)
    backbone = make().eval()
    reference = copy.deepcopy(backbone)
    cfg = TrainConfig(
        model="x",
        data="y",
        method=method,
        method_kwargs=json.loads(json.dumps(kw)),  # as --method-kwargs hands them over
        budget_params=budget_params,
        budget_dim=budget_dim,
        adapter_dim=adapter_dim,
        seed=seed,
    )
    m = get_method(method)
    return reference, m.prepare_from_config(backbone, cfg, total_steps=10).eval(), m


def trained_without_head(model: nn.Module) -> int:
    head = {id(p) for p in model.get_classifier().parameters()}
    return sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in head)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def inputs(model: nn.Module, n: int = 3) -> torch.Tensor:
    size = model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else 32
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------- block selection


def test_block_forms_as_documented():
    assert select_blocks(None, 4) == [0, 1, 2, 3]
    assert select_blocks("last:3", 12) == [9, 10, 11]
    assert select_blocks("spread:1", 12) == [11]
    assert select_blocks("spread:2", 12) == [0, 11]
    assert select_blocks("spread:3", 12) == [0, 6, 11]  # 5.5 rounds half up
    assert select_blocks("spread:4", 12) == [0, 4, 7, 11]
    assert select_blocks("spread:3", 6) == [0, 3, 5]
    assert select_blocks([5, -6, 2], 6) == [0, 2, 5]
    for n in range(1, 15):
        for k in range(1, n + 1):
            s = select_blocks(f"spread:{k}", n)
            assert len(set(s)) == k and s[-1] == n - 1 and (k == 1 or s[0] == 0)
    for bad in ("last:13", "spread:0", [12], [-13]):
        with pytest.raises(ConfigError):
            select_blocks(bad, 12)


@pytest.mark.parametrize("blocks", ["first:2", "last:0", "spread:x", "", [], [1, 1], [True], 3.5])
def test_bad_blocks_are_refused_before_any_model(blocks):
    cfg = TrainConfig(model="x", data="y", method="adapter", method_kwargs={"blocks": blocks})
    with pytest.raises(ConfigError, match="method adapter: .*blocks"):
        get_method("adapter").options_from(cfg)


def test_k_less_blocks_need_a_budget_and_a_block_must_fit():
    with pytest.raises(ConfigError, match="budget"):
        prepared("adapter", adapter_dim=1, blocks="last")
    with pytest.raises(ConfigError, match="below the adapters of one block"):
        prepared("adapter", adapter_dim=1, budget_params=2 * A1 - 1, blocks="spread")
    with pytest.raises(ConfigError, match="out of range"):
        prepared("adapter", adapter_dim=1, blocks=[DEPTH])


# ------------------------------------------------------------------------------------------- adapter designs


def test_defaults_unchanged_same_adapters_as_add_adapters():
    """No blocks / targets option: the same adapter names, sizes, counts and initial weights as before."""
    _, model, m = prepared("adapter", adapter_dim=4)
    torch.manual_seed(0)
    direct = add_adapters(vit6(), AdapterConfig(hidden_dim=4, init_seed=0))
    assert adapter_roles(model) == adapter_roles(direct)
    assert [n for n, _ in adapters(model)] == [f"blocks.{i}.{s}.adapter" for i in range(DEPTH) for s in ("ls1", "ls2")]
    assert adapter_param_count(model) == DEPTH * 2 * (4 * (D + D + 1) + D)
    sd = dict(direct.named_parameters())
    assert all(torch.equal(p, sd[n]) for n, p in model.named_parameters())
    assert m.extra_info(model) == {}


def test_r1_everywhere_is_the_smallest_uniform_design():
    _, model, _ = prepared("adapter", adapter_dim=1)
    assert trained_without_head(model) == DEPTH * 2 * A1 == uniform_adapter_params(vit6(), 1)
    assert all(a.hidden_dim == 1 for _, a in adapters(model))


@pytest.mark.parametrize(
    ("blocks", "targets", "expected_blocks"),
    [
        ("last:2", ["attn", "mlp"], [4, 5]),
        ("spread:3", ["attn", "mlp"], [0, 3, 5]),
        ([1, -1], ["mlp"], [1, 5]),
        ("spread:2", ["attn"], [0, 5]),
    ],
)
def test_blocks_and_targets_place_adapters_only_where_asked(blocks, targets, expected_blocks):
    _, model, m = prepared("adapter", adapter_dim=1, blocks=blocks, targets=targets)
    names = [n for n, _ in adapters(model)]
    assert names == [f"blocks.{i}.{SLOT[t]}.adapter" for i in expected_blocks for t in targets]
    assert set(adapter_roles(model).values()) == set(targets)
    assert trained_without_head(model) == len(expected_blocks) * len(targets) * A1
    assert m.extra_info(model)["adapter_blocks"] == expected_blocks
    json.dumps(m.extra_info(model))
    # every other branch is the plain timm module again
    for i, block in enumerate(model.blocks):
        for t in ("attn", "mlp"):
            wrapped = f"blocks.{i}.{SLOT[t]}.adapter" in names
            assert (type(getattr(block, SLOT[t])).__name__ == "AdaptedBranch") == wrapped


def test_kept_adapters_start_as_in_the_full_insertion():
    _, full, _ = prepared("adapter", adapter_dim=2)
    _, part, _ = prepared("adapter", adapter_dim=2, blocks="spread:2")
    full_params = dict(full.named_parameters())
    for name, p in part.named_parameters():
        assert torch.equal(p, full_params[name]), name


def test_layerscale_slots_keep_their_names_and_roles():
    """DINOv2: sequential adapters sit after LayerScale, ls1 (attn) / ls2 (mlp), whatever the selection."""
    _, model, _ = prepared("adapter", tiny_dinov2, adapter_dim=1, blocks="last:1", targets=["mlp"])
    assert adapter_roles(model) == {"blocks.1.ls2.adapter": "mlp"}
    assert trained_without_head(model) == 48 + 48 + 1 + 48


@pytest.mark.parametrize(
    ("budget", "k"), [(2 * A1, 1), (4 * A1 - 1, 1), (4 * A1, 2), (1000, 2), (6 * A1, 3), (10**6, 6)]
)
@pytest.mark.parametrize("form", ["last", "spread"])
def test_budget_sets_k_to_the_largest_that_fits(form, budget, k):
    _, model, m = prepared("adapter", adapter_dim=1, budget_params=budget, blocks=form)
    assert m.extra_info(model)["adapter_blocks"] == select_blocks(f"{form}:{k}", DEPTH)
    assert trained_without_head(model) == k * 2 * A1 <= budget


def test_budget_dim_and_an_explicit_k_ignores_the_budget():
    _, model, m = prepared("adapter", adapter_dim=1, budget_dim=1, blocks="last")  # budget = r=1 everywhere
    assert m.extra_info(model)["adapter_blocks"] == list(range(DEPTH))
    _, model, m = prepared("adapter", adapter_dim=1, budget_params=10**6, blocks="last:1")
    assert trained_without_head(model) == 2 * A1


def test_block_design_saves_and_loads_from_the_file_alone(tmp_path):
    _, model, _ = prepared("adapter", adapter_dim=1, blocks="spread:2", targets=["mlp"])
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    path = save_adapters(model, tmp_path / "t.safetensors")
    torch.manual_seed(0)
    fresh = load_adapters(vit6().eval(), path)
    assert [n for n, _ in adapters(fresh)] == ["blocks.0.ls2.adapter", "blocks.5.ls2.adapter"]
    x = inputs(model)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    bank = mimi.AdapterBank(vit6(), device="cpu")  # the bank serves it too (the other adapters: removed)
    bank.add("t", path)
    served = torch.stack(bank.logits(x, ["t"] * len(x)))
    with torch.no_grad():
        torch.testing.assert_close(served, model(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- every design

DESIGNS = {
    "adapter r=1": ("adapter", {"adapter_dim": 1}, DEPTH * 2 * A1),
    "adapter last:2": ("adapter", {"adapter_dim": 1, "blocks": "last:2"}, 2 * 2 * A1),
    "adapter spread at budget": ("adapter", {"adapter_dim": 1, "blocks": "spread", "budget_params": 1000}, 2 * 2 * A1),
    "lora r=1 qkv": ("lora", {"rank": 1, "targets": ["attn.qkv"]}, DEPTH * (D + 3 * D) * 1),
    "vpt-deep 1": ("vpt-deep", {"num_prompts": 1}, DEPTH * 1 * D),
    "vpt-deep 2": ("vpt-deep", {"num_prompts": 2}, DEPTH * 2 * D),
    "vera r=16": ("peft-vera", {"rank": 16}, DEPTH * (16 + 3 * D)),  # d (rank) + b (qkv out) per layer
    "vera r=4 proj,fc2": ("peft-vera", {"rank": 4, "targets": ["attn.proj", "mlp.fc2"]}, DEPTH * 2 * (4 + D)),
}
RUN_FLAGS = ("adapter_dim", "budget_params")
TRAINS = {
    "adapter": lambda n: ".adapter." in n,
    "lora": lambda n: ".lora_a." in n or ".lora_b." in n,
    "vpt-deep": lambda n: n.endswith(".prompts"),
    "peft-vera": lambda n: ".vera_lambda_b." in n or ".vera_lambda_d." in n,
}


def design(label: str):
    method, kw, _ = DESIGNS[label]
    flags = {k: v for k, v in kw.items() if k in RUN_FLAGS}
    return prepared(method, **flags, **{k: v for k, v in kw.items() if k not in RUN_FLAGS})


@pytest.mark.parametrize("label", sorted(DESIGNS))
def test_counts_match_hand_computation(label):
    _, model, _ = design(label)
    assert trained_without_head(model) == DESIGNS[label][2]
    assert sum(p.numel() for p in trainable(model).values()) == DESIGNS[label][2] + HEAD


@pytest.mark.parametrize("label", [k for k in sorted(DESIGNS) if not k.startswith("vpt")])
def test_zero_init_leaves_logits_unchanged(label):
    reference, model, _ = design(label)
    x = inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("label", sorted(DESIGNS))
def test_only_the_intended_parameters_train_and_each_gets_a_gradient(label):
    _, model, m = design(label)
    method = DESIGNS[label][0]
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    params = trainable(model)
    for name, p in params.items():
        assert id(p) in head_ids or TRAINS[method](name), f"{label} should not train {name}"
    with torch.no_grad():  # zero-initialised up-projections / LoRA B / VeRA b would block the other gradients
        g = torch.Generator().manual_seed(2)
        for p in params.values():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()
    x = inputs(model, 4)
    y = torch.arange(4) % C
    nn.functional.cross_entropy(model(x), y).backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    json.dumps(m.extra_info(model))


# ------------------------------------------------------------------------------------------- VeRA


def test_vera_projections_are_frozen_buffers_and_not_in_the_task_file(tmp_path):
    _, model, m = design("vera r=16")
    frozen = {n for n, _ in model.named_buffers() if ".vera_A." in n or ".vera_B." in n}
    assert frozen and not any(".vera_A." in n or ".vera_B." in n for n, _ in model.named_parameters())
    tuner = model.base_model
    assert tuner.vera_A["default"].shape == (16, D) and tuner.vera_B["default"].shape == (3 * D, 16)
    info = m.extra_info(model)
    assert info["vera_rank"] == 16 and info["vera_layers"] == DEPTH and info["vera_params"] == DEPTH * (16 + 3 * D)
    from safetensors.torch import load_file

    path = save_adapters(model, tmp_path / "v.safetensors")
    assert set(load_file(str(path))) == set(trainable(model))


def test_vera_save_then_load_gives_identical_logits(tmp_path):
    _, model, m = prepared("peft-vera", seed=7, rank=8, targets=["attn.qkv", "mlp.fc1"])
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    path = save_adapters(model, tmp_path / "v.safetensors")
    x = inputs(model)
    with torch.no_grad():
        logits = model(x)
    torch.manual_seed(123)  # the global RNG state does not matter: A and B come from the key (the run's seed)
    _, fresh, m2 = prepared("peft-vera", seed=7, rank=8, targets=["attn.qkv", "mlp.fc1"])
    restore_trained(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), logits)
    assert m2.extra_info(fresh)["vera_projection_sha256"] == m.extra_info(model)["vera_projection_sha256"]
    # another seed draws other projections: the same trained vectors then give other logits
    _, other, m3 = prepared("peft-vera", seed=8, rank=8, targets=["attn.qkv", "mlp.fc1"])
    restore_trained(other, path)
    assert m3.extra_info(other)["vera_projection_sha256"] != m.extra_info(model)["vera_projection_sha256"]
    with torch.no_grad():
        assert not torch.equal(other.eval()(x), logits)


def test_vpt_tokens_from_a_budget_never_exceed_it():
    per_token = DEPTH * D
    for budget in (per_token, per_token + 1, 3 * per_token - 1, 3 * per_token, 10 * per_token + 7):
        _, model, m = prepared("vpt-deep", budget_params=budget)
        n = m.extra_info(model)["num_prompts"]
        assert n * per_token <= budget < (n + 1) * per_token
        assert trained_without_head(model) == n * per_token
    _, model, m = prepared("vpt-deep")  # no budget: VPT's usual 10
    assert m.extra_info(model)["num_prompts"] == 10
    with pytest.raises(ConfigError, match="below one prompt token per block"):
        prepared("vpt-deep", budget_params=per_token - 1)


def test_vera_rank_from_a_budget_is_the_nearest():
    fixed, per_rank = DEPTH * 3 * D, DEPTH  # b vectors of qkv; one d entry per layer and rank
    for budget in (fixed + 1, fixed + 100, fixed + 1000, fixed + 3 * per_rank + 3):
        _, model, m = prepared("peft-vera", budget_params=budget)
        r = m.extra_info(model)["vera_rank"]
        assert abs(fixed + r * per_rank - budget) <= per_rank / 2 or r == 1
        assert trained_without_head(model) == fixed + r * per_rank
    _, model, m = prepared("peft-vera", budget_params=10**6, rank=3)  # an explicit rank ignores the run budget
    assert m.extra_info(model)["vera_rank"] == 3
    _, model, m = prepared("peft-vera")
    assert m.extra_info(model)["vera_rank"] == 256
    with pytest.raises(ConfigError, match="below the .* vectors b"):
        prepared("peft-vera", budget_params=fixed - 1)
    with pytest.raises(ConfigError, match="not both"):  # the method's own budget_params option with a rank
        cfg = TrainConfig(model="x", data="y", method="peft-vera", method_kwargs={"rank": 2, "budget_params": 10})
        get_method("peft-vera").options_from(cfg)


# ------------------------------------------------------------------------------------------- ViT-S/14 numbers


@pytest.mark.parametrize(
    ("method", "kw", "expected"),
    [
        ("adapter", {"adapter_dim": 1}, 24 * (769 + 384)),  # 27,672: r=1 after every attn and mlp
        ("adapter", {"adapter_dim": 1, "blocks": "last", "budget_params": 8000}, 3 * 2 * (769 + 384)),  # K=3
        ("adapter", {"adapter_dim": 1, "blocks": "spread", "budget_params": 8000}, 3 * 2 * (769 + 384)),
        ("lora", {"rank": 1, "targets": ["attn.qkv"]}, 12 * (384 + 1152)),  # 18,432
        ("vpt-deep", {"num_prompts": 1}, 12 * 1 * 384),  # 4,608
        ("vpt-deep", {"num_prompts": 2}, 12 * 2 * 384),  # 9,216
        ("vpt-deep", {"budget_params": 16000}, 12 * 3 * 384),  # 13,824: the most tokens 16k holds
        ("vpt-deep", {"budget_params": 32000}, 12 * 6 * 384),  # 27,648
        ("vpt-deep", {"budget_params": 4608}, 12 * 1 * 384),  # exactly one token a block
        ("vpt-deep", {"budget_params": 32000, "num_prompts": 1}, 12 * 1 * 384),  # the option wins over the budget
        ("peft-vera", {}, 12 * (256 + 1152)),  # 16,896: rank 256 on attn.qkv
    ],
)
def test_vit_small_14_counts(method, kw, expected):
    """The architecture alone (meta device): the counts the benchmark specs rely on."""
    if method.startswith("peft"):
        pytest.importorskip("peft")
    flags = {k: kw[k] for k in RUN_FLAGS if k in kw}
    options = {k: v for k, v in kw.items() if k not in RUN_FLAGS}
    cfg = TrainConfig(model="x", data="y", method=method, method_kwargs=options, **flags)
    with torch.device("meta"):
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=10)
        model = get_method(method).prepare_from_config(model, cfg, total_steps=1)
    assert trained_without_head(model) == expected
