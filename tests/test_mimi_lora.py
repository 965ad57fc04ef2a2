"""mimi-lora: MiMi's cycles over LoRA's rank-1 components (LoRA written as linear adapters)."""

from __future__ import annotations

import copy
import json

import torch
from conftest import tiny_vit
from vtab_fixture import write_vtab_task

import mimi
from mimi.cli import main
from mimi.config import TrainConfig
from mimi.core.adapters import AdaptedBranch, adapters, merge_linear_adapters
from mimi.core.lora import DEFAULT_TARGETS, lora_params_per_rank
from mimi.core.scores import score_neurons
from mimi.methods import get_method

LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def prepared(rank: int = 4, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_vit(num_classes=3).eval()
    cfg = TrainConfig(model="x", data="x", method="mimi-lora", adapter_dim=rank, **kw)
    return get_method("mimi-lora").prepare_from_config(model, cfg, total_steps=1)


def test_a_lora_update_per_linear_layer_starting_at_zero():
    model = prepared(rank=4)
    names = [n for n, _ in adapters(model)]
    assert len(names) == 2 * len(LAYERS)  # two blocks
    assert all(n.endswith(tuple(f"{t}.adapter" for t in LAYERS)) for n in names)
    # exactly LoRA's parameter count at rank 4: r * (in + out) per layer, no biases
    assert mimi.adapter_param_count(model) == 4 * lora_params_per_rank(model, DEFAULT_TARGETS)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    plain = tiny_vit(num_classes=3).eval()
    state = {k.replace(".branch.", "."): v for k, v in model.state_dict().items() if ".adapter." not in k}
    plain.load_state_dict(state)
    torch.testing.assert_close(model(x), plain(x))  # B = 0: the model starts as the backbone


def test_merged_logits_equal_unmerged_and_rank_zero_layers_unwrapped():
    model = prepared(rank=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, a in adapters(model):
            a.up.weight.copy_(torch.randn(a.up.weight.shape, generator=g) * 0.2)
    names = [n for n, _ in adapters(model)]
    mimi.prune(model, budget=mimi.adapter_param_count(model) // 3, score="lora-norm")
    sizes = {n: a.hidden_dim for n, a in adapters(model)}
    assert len(set(sizes.values())) > 1 or len(sizes) < len(names)  # uneven ranks
    # a layer pruned to rank 0 is a plain nn.Linear again
    mimi.prune(model, budget=0, score="mimi")
    assert adapters(model) == [] and not any(isinstance(m, AdaptedBranch) for m in model.modules())
    model = prepared(rank=4)
    with torch.no_grad():
        for _, a in adapters(model):
            a.up.weight.copy_(torch.randn(a.up.weight.shape, generator=g) * 0.2)
    mimi.prune(model, budget=mimi.adapter_param_count(model) // 2, score="mimi")
    x = torch.randn(3, 3, 32, 32)
    merged = merge_linear_adapters(copy.deepcopy(model))
    assert not any(isinstance(m, AdaptedBranch) for m in merged.modules())
    assert sum(p.numel() for p in merged.parameters()) == sum(
        p.numel() for n, p in model.named_parameters() if ".adapter." not in n
    )
    torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=0)


def test_lora_norm_score_by_hand():
    model = prepared(rank=3)
    name, a = adapters(model)[0]
    with torch.no_grad():
        a.up.weight.copy_(torch.arange(a.up.weight.numel(), dtype=torch.float32).view_as(a.up.weight) / 100)
    s = score_neurons(model, "lora-norm")[name]
    for j in range(3):
        want = float(a.down.weight[j].detach().norm() * a.up.weight[:, j].detach().norm())
        assert abs(float(s[j]) - want) < 1e-6


def test_mimi_lora_run_lands_on_budget_with_uneven_ranks(tmp_path):
    root = write_vtab_task(tmp_path / "data")
    out = tmp_path / "run"
    budget = 3000
    argv = "--model test_vit --img-size 32 --data vtab1k:toy --batch-size 16 --device cpu --seed 0 --no-progress"
    argv += f" --method mimi-lora --adapter-dim 8 --budget-params {budget} --rho 0.5 --epochs 1 --first-epochs 2"
    argv += " --lr 3e-3 --score lora-norm"
    assert main(["train", *argv.split(), "--data-root", str(root), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) >= 3  # at least two cuts, each retrained
    params = [e["adapter_params"] for e in summary]
    assert params == sorted(params, reverse=True) and params[-1] <= budget < params[-2]
    sizes = summary[-1]["sizes"]
    layers = len(json.loads((out / "run.json").read_text())["layout"])
    ranks = list(sizes.values()) + [0] * (layers - len(sizes))  # a layer pruned to rank 0 is gone from sizes
    assert sizes and max(ranks) <= 8 and len(set(ranks)) > 1  # each layer ends with its own rank
    # the task file loads wherever a LoRA task does: on a fresh backbone, and in a bank
    meta = mimi.read_metadata(out / "adapters.safetensors")
    assert meta["method"] == "mimi-lora"
    from mimi.trainer import load_run

    run = load_run(out)
    bank = mimi.AdapterBank(copy.deepcopy(_bare(run.model)), device="cpu")
    bank.add("t", out / "adapters.safetensors")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bank.logits(x, "t"), run.model.eval()(x), atol=1e-5, rtol=0)


def _bare(model: torch.nn.Module) -> torch.nn.Module:
    """The frozen backbone of a trained model: adapters removed, head dropped."""
    bare = copy.deepcopy(model)
    for name, _ in adapters(bare):
        mimi.remove_adapter(bare, name)
    bare.reset_classifier(0)
    return bare
