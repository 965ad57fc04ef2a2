"""Invariants of every registered training method on tiny timm ViT, DINOv2 (LayerScale) and Swin backbones."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import tiny_dinov2, tiny_swin, tiny_vit
from torch import nn

from mimi.config import TrainConfig
from mimi.core.errors import ConfigError, ModelError
from mimi.core.lora import LoRALinear, lora_params_per_rank, merge_lora
from mimi.core.taskfile import restore_trained, save_adapters
from mimi.methods import METHODS, get_method
from mimi.methods.lora import lora_rank_for_budget

MODELS = {"vit": tiny_vit, "dinov2": tiny_dinov2, "swin": tiny_swin}
ADAPTERS = {"mimi", "mimi-oneshot", "adapter", "adaptformer", "mimi-lora"}
PEFT = {"peft-lora", "peft-adalora", "peft-vera"}
VIT_ONLY = {"vpt-deep"}
NOT_ZERO_INIT = {"vpt-deep"}  # prompts change the attention of every block from the start

# Which parameter names each method may train (besides the classifier head).
METHOD_PARAM = {
    **{m: lambda n: ".adapter." in n for m in ADAPTERS},
    "lora": lambda n: ".lora_a." in n or ".lora_b." in n,
    "fact-tt": lambda n: n.startswith("fact_tt.") or n.endswith(".sigma"),
    "peft-lora": lambda n: ".lora_A." in n or ".lora_B." in n,
    "peft-adalora": lambda n: any(f".lora_{k}." in n for k in "ABE"),
    "peft-vera": lambda n: ".vera_lambda_" in n,
    "ssf": lambda n: n.endswith((".scale", ".shift")),
    "vpt-deep": lambda n: n.endswith(".prompts"),
    "linear": lambda n: False,
    "bitfit": lambda n: n.endswith(".bias"),
    "full": lambda n: True,
}

CASES = [(m, a) for m in sorted(METHODS) for a in MODELS if not (m in VIT_ONLY and a == "swin")]


def make_cfg(method: str, **method_kwargs) -> TrainConfig:
    extra = {"adapter_dim": 4} if method in ADAPTERS else {}
    return TrainConfig(model="x", data="y", method=method, method_kwargs=method_kwargs, **extra)


def prepared(method: str, arch: str = "vit", *, total_steps: int = 10, **method_kwargs):
    """(bare backbone copy, prepared model, method object), all from the same seeded backbone."""
    if method in PEFT:
        pytest.importorskip("peft")
    torch.manual_seed(0)
    backbone = MODELS[arch]().eval()
    reference = copy.deepcopy(backbone)
    m = get_method(method)
    model = m.prepare_from_config(backbone, make_cfg(method, **method_kwargs), total_steps=total_steps)
    return reference, model.eval(), m


def inputs(model: nn.Module, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    size = 28 if any(isinstance(m, nn.Conv2d) and m.kernel_size == (14, 14) for m in model.modules()) else 32
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 5, (n,), generator=g)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def head_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.get_classifier().parameters() if p.requires_grad)


def test_every_method_is_tested():
    assert set(METHODS) == set(METHOD_PARAM)


@pytest.mark.parametrize("method", sorted(VIT_ONLY))
def test_vit_only_methods_reject_swin(method):
    with pytest.raises(ModelError, match="VisionTransformer"):
        prepared(method, "swin")


@pytest.mark.parametrize(("method", "arch"), [c for c in CASES if c[0] not in NOT_ZERO_INIT])
def test_zero_init_keeps_the_backbone_output(method, arch):
    reference, model, _ = prepared(method, arch)
    x, _ = inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_one_step_trains_only_method_and_head_and_every_trainable_param_gets_a_gradient(method, arch):
    _, model, m = prepared(method, arch)
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    params = trainable(model)
    assert any(id(p) in head_ids for p in params.values()), "the head must train"
    if method != "linear":
        assert any(id(p) not in head_ids for p in params.values()), "the method must add trainable parameters"
    for name, p in params.items():
        assert id(p) in head_ids or METHOD_PARAM[method](name), f"{method} should not train {name}"
    with torch.no_grad():  # zero-initialised parts (up-projections, LoRA B, AdaLoRA E) would block other gradients
        g = torch.Generator().manual_seed(2)
        for p in params.values():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.0)
    model.train()
    x, y = inputs(model)
    nn.functional.cross_entropy(model(x), y).backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name
    json.dumps(m.extra_info(model))  # the run summary must be able to store it


# Hand counts for the tiny ViT: depth 2, D=64, MLP 256, 5 classes.
D, HID, DEPTH, C = 64, 256, 2, 5
HEAD = D * C + C
IN_OUT = (D + 3 * D) + (D + D) + (D + HID) + (HID + D)  # qkv, proj, fc1, fc2: 1024 per block
VIT_COUNTS = {
    ("lora", "rank=4"): DEPTH * 4 * IN_OUT + HEAD,
    ("peft-lora", "rank=4"): DEPTH * 4 * IN_OUT + HEAD,  # the frozen original head is not counted
    ("peft-adalora", "init_r=6"): DEPTH * 6 * (IN_OUT + 4) + HEAD,  # A, B and one singular value per rank
    ("ssf", ""): 2 * (DEPTH * (3 * D + D + HID + D + D + D) + D + D) + HEAD,  # block linears+norms, final norm, patches
    ("vpt-deep", ""): DEPTH * 10 * D + HEAD,
    ("adapter", ""): DEPTH * 2 * (D * 4 + 4 + 4 * D + D) + HEAD,  # adapter_dim 4 after attn and mlp
    ("adaptformer", ""): DEPTH * (D * 4 + 4 + 4 * D + D) + HEAD,  # beside the MLP only
    ("linear", ""): HEAD,
    ("bitfit", ""): DEPTH * (3 * D + D + HID + D + D + D) + D + D + HEAD,  # + patch-embed and final-norm biases
}


@pytest.mark.parametrize(("method", "kw"), sorted(VIT_COUNTS))
def test_trainable_count_matches_hand_computation(method, kw):
    kwargs = {k: int(v) for k, v in (item.split("=") for item in kw.split(",") if item)}
    _, model, _ = prepared(method, **kwargs)
    assert sum(p.numel() for p in trainable(model).values()) == VIT_COUNTS[method, kw]


def test_swin_counts_match_hand_computation():
    # Two stages of width 32 and 64 (one block each); PatchMerging has norm(4*32) and reduction 128 -> 64.
    head = 64 * C + C
    block = {d: (d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d) for d in (32, 64)}
    _, model, _ = prepared("lora", "swin", rank=2)
    assert sum(p.numel() for p in trainable(model).values()) == 2 * (block[32] + block[64]) + head
    ssf_block = {d: 3 * d + d + 4 * d + d + d + d for d in (32, 64)}
    expected = 2 * (ssf_block[32] + ssf_block[64] + (128 + 64) + 64 + 32) + head  # + merging, final norm, patches
    _, model, _ = prepared("ssf", "swin")
    assert sum(p.numel() for p in trainable(model).values()) == expected


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_peft_regex_targets_block_linears_only(arch):
    peft = pytest.importorskip("peft")
    _, model, _ = prepared("peft-lora", arch, rank=2)
    rx = model.peft_config["default"].target_modules
    inner = model.base_model.model
    assert re.fullmatch(rx, "patch_embed.proj") is None
    assert type(inner.patch_embed.proj) is nn.Conv2d
    tuned = sorted(n for n, m in inner.named_modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer))
    per_block = ["attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2"]
    blocks = ["blocks.0", "blocks.1"] if arch == "vit" else ["layers.0.blocks.0", "layers.1.blocks.0"]
    assert tuned == [f"{b}.{t}" for b in blocks for t in per_block]
    if arch == "vit":
        assert rx == r"(?:blocks\.\d+)\.(?:attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
    x, _ = inputs(model)
    assert model(x).shape == (4, C)
    assert isinstance(model.get_classifier(), peft.utils.ModulesToSaveWrapper)


def test_adalora_allocates_ranks_and_final_masks_are_exact():
    steps = 12
    _, model, m = prepared("peft-adalora", total_steps=steps, init_r=6, target_r=2, deltaT=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = inputs(model)
    model.train()
    for step in range(steps):  # the engine's order: forward, zero_grad, backward, after_backward, step
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        m.after_backward(model, step)
        opt.step()
    info = m.extra_info(model)
    assert info["adalora_final"] and len(info["adalora_ranks"]) == 2 * DEPTH * 2
    assert 0 < info["adalora_total_rank"] <= info["adalora_target_total_rank"] == 2 * 8
    model.eval()
    with torch.no_grad():
        model(x)  # the forward pre-hook re-applies the final pattern the last optimizer step moved
    live = {
        n.removeprefix("base_model.model.").removesuffix(".lora_E.default"): int((p != 0).sum())
        for n, p in model.named_parameters()
        if n.endswith(".lora_E.default")
    }
    assert live == info["adalora_ranks"]


def test_lora_rank_for_budget_is_within_half_a_rank_step():
    model = tiny_vit()
    per_rank = lora_params_per_rank(model)
    assert per_rank == DEPTH * IN_OUT
    for budget in (3000, 5000, 7000, 20_000, 33_000):
        r = lora_rank_for_budget(model, budget)
        assert abs(r * per_rank - budget) <= per_rank / 2
    assert lora_rank_for_budget(model, 10) == 1
    for method in ("lora", "peft-lora"):
        _, prepared_model, _ = prepared(method, budget_params=5000)
        assert sum(p.numel() for p in trainable(prepared_model).values()) - head_params(prepared_model) == 2 * per_rank


def test_lora_merge_keeps_outputs():
    _, model, _ = prepared("lora", "dinov2", rank=3)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_b.weight.normal_(0, 0.1)
    x, _ = inputs(model)
    with torch.no_grad():
        before = model(x)
        merge_lora(model)
        assert not any(isinstance(mod, LoRALinear) for mod in model.modules())
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_vpt_blocks_see_prompts_and_the_head_does_not():
    _, model, _ = prepared("vpt-deep", num_prompts=3)
    seen = []
    model.blocks[1].block.register_forward_hook(lambda mod, args, out: seen.append(out.shape[1]))
    x, _ = inputs(model)
    with torch.no_grad():
        tokens = model.forward_features(x)
    assert seen == [1 + 3 + 16] and tokens.shape[1] == 1 + 16


@pytest.mark.parametrize("method", ["lora", "ssf", "vpt-deep", "peft-lora", "peft-adalora"])
def test_save_then_restore_gives_identical_logits(method, tmp_path):
    _, model, _ = prepared(method)
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    path = save_adapters(model, tmp_path / "m.safetensors")
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == set(trainable(model))
    _, fresh, _ = prepared(method)
    restore_trained(fresh, path)
    x, _ = inputs(model)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


def test_unknown_method_kwargs_are_rejected():
    with pytest.raises(
        ConfigError,
        match=r"method lora: unknown option\(s\) \['rnk'\]; valid: alpha, budget_params, dropout, rank, targets$",
    ):
        prepared("lora", rnk=4)
    with pytest.raises(ConfigError, match="not both"):
        prepared("lora", rank=4, budget_params=1000)
