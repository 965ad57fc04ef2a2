"""FacT-TT (``fact-tt``): the start at the backbone, parameter counts by hand, gradients, rank from a budget, reloads,
the side path against the dense update, LoRA conversion for a bank, and the CLI end to end."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from conftest import tiny_dinov2, tiny_swin, tiny_vit
from safetensors.torch import load_file
from torch import nn
from vtab_fixture import write_vtab_task

import mimi
from mimi.cli import main
from mimi.config import TrainConfig
from mimi.core.errors import CheckpointError, ConfigError, ModelError
from mimi.core.lora import LoRALinear
from mimi.core.taskfile import restore_trained, save_adapters
from mimi.methods import PrepareContext, get_method, method_traits
from mimi.methods.fact import (
    FacTLinear,
    FacTOptions,
    fact_layers,
    fact_params_at,
    fact_rank_for_budget,
    fact_shape,
    fact_to_lora,
    merge_fact,
)

MODELS = {"vit": tiny_vit, "dinov2": tiny_dinov2, "swin": tiny_swin}
D, DEPTH, C = 64, 2, 5  # the tiny ViT: MLP 4 D, so 12 d x d matrices per block
N = 12 * DEPTH
HEAD = D * C + C


def prepared(arch: str = "vit", *, seed: int = 0, budget: int | None = None, **kw) -> tuple[nn.Module, nn.Module]:
    """(bare backbone copy, FacT model) from the same seeded backbone, both in eval mode."""
    torch.manual_seed(0)
    backbone = MODELS[arch]().eval()
    reference = copy.deepcopy(backbone)
    model = get_method("fact-tt").prepare(backbone, FacTOptions(**kw), PrepareContext(seed=seed, budget=budget))
    return reference, model.eval()


def inputs(arch: str = "vit", n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    size = 28 if arch == "dinov2" else 32
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, C, (n,), generator=g)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("init", ["code", "sigma-zero"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_the_adapted_model_starts_at_the_backbone(arch, init):
    reference, model = prepared(arch, rank=3, init=init)
    factors = model.fact_tt
    zero = [p for f in factors.values() for p in (f.u,)] if init == "code" else [m.sigma for _, m in fact_layers(model)]
    assert all(not p.any() for p in zero)  # U = 0 (the FacT code), or every Sigma = 0
    drawn = [f.v for f in factors.values()] + ([m.sigma for _, m in fact_layers(model)] if init == "code" else [])
    assert all(p.abs().min() > 0 for p in drawn)
    x, _ = inputs(arch)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_parameter_count_equals_2dr_plus_n_r2_plus_head():
    for r in (1, 2, 4, 7):
        _, model = prepared(rank=r)
        assert fact_shape(model) == ([D], N)
        assert sum(p.numel() for p in trainable(model).values()) == 2 * D * r + N * r * r + HEAD
        assert get_method("fact-tt").extra_info(model) == {
            "fact_rank": r,
            "fact_scale": 1.0,
            "fact_matrices": N,
            "fact_layers": 4 * DEPTH,
            "fact_params": 2 * D * r + N * r * r,
        }
    # Swin: two stages of width 32 and 64, one block each: one (U, V) pair per width, 12 matrices per block
    _, model = prepared("swin", rank=2)
    assert sorted(model.fact_tt) == ["d32", "d64"]
    assert sum(p.numel() for p in trainable(model).values()) == 2 * 2 * (32 + 64) + 24 * 4 + 64 * C + C


def test_vit_s14_counts_match_method_md():
    """ViT-S/14 (d=384, 12 blocks, N=144): 5.4k at r=4, 9.8k at r=6, 15.4k at r=8 (shared/METHOD.md)."""
    with torch.device("meta"):
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56)
    widths, n = fact_shape(model)
    assert (widths, n) == ([384], 144)
    counts = {r: fact_params_at(widths, n, r) for r in range(2, 11)}
    assert counts == {r: 2 * 384 * r + 144 * r * r for r in range(2, 11)}
    assert (counts[4], counts[6], counts[8]) == (5376, 9792, 15360)


def test_only_factors_and_head_train_and_every_one_gets_a_gradient():
    """The code's init (U = 0): step 1 moves U (and the head) only, from step 2 everything moves."""
    _, model = prepared(rank=3)
    params = trainable(model)
    head = {f"head.{k}" for k in ("weight", "bias")}
    fact = {"fact_tt.d64.u", "fact_tt.d64.v"} | {f"{n}.sigma" for n, _ in fact_layers(model)}
    assert set(params) == head | fact
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.0)
    model.train()
    x, y = inputs()
    got_grad = set()
    for step in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        got_grad |= {n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}
        if step == 0:
            assert got_grad == head | {"fact_tt.d64.u"}  # U = 0 blocks the gradient of V and every Sigma
        opt.step()
    assert got_grad == set(params)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name


def test_sigma_zero_init_moves_every_sigma_on_the_first_step():
    _, model = prepared(rank=3, init="sigma-zero", dropout=0.0)
    params = trainable(model)
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.0)
    model.train()
    x, y = inputs()
    nn.functional.cross_entropy(model(x), y).backward()
    for name, p in params.items():
        moved = p.grad is not None and p.grad.abs().sum() > 0
        assert moved == (not name.startswith("fact_tt.")), name  # Sigma = 0 blocks U's and V's gradient
    opt.step()
    assert all(m.sigma.abs().min() > 0 for _, m in fact_layers(model))


def test_rank_from_a_budget_is_the_nearest_count():
    _, model = prepared(rank=1)
    widths, n = fact_shape(model)
    count = lambda r: fact_params_at(widths, n, r)  # noqa: E731
    for budget in (0, 10, 200, 700, 1000, 1500, 2000, 5000, 20_000, 10**9):
        r = fact_rank_for_budget(model, budget)
        assert abs(count(r) - budget) == min(abs(count(k) - budget) for k in range(1, D + 1)), budget
    assert fact_rank_for_budget(model, 10**9) == D  # at most the width
    tie = (count(3) + count(4)) // 2 if (count(3) + count(4)) % 2 == 0 else None
    if tie is not None:
        assert fact_rank_for_budget(model, tie) == 4
    for kw, budget in (({"budget_params": 1500}, None), ({}, 1500)):  # the option, or the run's budget
        _, m = prepared(budget=budget, **kw)
        assert get_method("fact-tt").extra_info(m)["fact_rank"] == fact_rank_for_budget(model, 1500)
    _, m = prepared(rank=2, budget=1500)  # an explicit rank wins over the run's budget
    assert m.fact_tt.d64.u.shape == (D, 2)
    _, m = prepared()
    assert m.fact_tt.d64.u.shape == (D, 8)  # no rank, no budget: 8
    cfg = TrainConfig(model="x", data="y", method="fact-tt", budget_dim=2)  # --budget-dim: uniform adapters of 2
    ctx = get_method("fact-tt").context_from(cfg, MODELS["vit"](), total_steps=1)
    assert ctx.budget == DEPTH * 2 * (2 * (2 * D + 1) + D)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"rank": 4, "budget_params": 1000}, "not both"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": -1}, "rank must be a positive integer"),
        ({"rank": 2.0}, "rank must be int or None"),
        ({"scale": 0.0}, "scale must be a positive number"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"init": "xavier"}, "init must be"),
        ({"budget_params": -5}, "budget_params must be >= 0"),
    ],
)
def test_bad_options_are_refused(kw, match):
    cfg = TrainConfig(model="x", data="y", method="fact-tt", method_kwargs=kw)
    with pytest.raises(ConfigError, match=match):
        get_method("fact-tt").options_from(cfg)


def test_rank_above_the_width_and_a_second_fact_are_refused():
    with pytest.raises(ConfigError, match="above the backbone's width 64"):
        prepared(rank=65)
    _, model = prepared(rank=2)
    with pytest.raises(ModelError, match="already holds FacT"):
        get_method("fact-tt").prepare(model, FacTOptions(rank=2), PrepareContext())


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_save_then_restore_gives_identical_logits(arch, tmp_path):
    _, model = prepared(arch, rank=3)
    randomize(model)
    path = save_adapters(model, tmp_path / "fact.safetensors")
    assert set(load_file(str(path))) == set(trainable(model))
    _, fresh = prepared(arch, rank=3, seed=7)  # another draw: everything must come from the file
    restore_trained(fresh, path)
    x, _ = inputs(arch)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_side_path_equals_the_dense_update():
    _, model = prepared("dinov2", rank=3, scale=0.7)
    randomize(model, seed=3)
    torch.manual_seed(0)
    f = model.fact_tt.d48
    u, v, r = f.u.detach(), f.v.detach(), 3
    for name, layer in fact_layers(model):
        x = torch.randn(2, 5, layer.in_features)
        dense = nn.functional.linear(x, layer.base.weight + layer.delta_weight(), layer.base.bias)
        torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)
        a, b = layer.lora_factors()
        torch.testing.assert_close(b @ a, layer.delta_weight(), atol=1e-6, rtol=1e-5)
        assert a.shape[0] == r  # every layer of a ViT is a rank-r LoRA
        # block (j, i) is s U Sigma_ji V^T: the paper's per-matrix form, written out
        sigma = layer.sigma.detach()
        for j in range(layer.n_out):
            for i in range(layer.n_in):
                block = 0.7 * u @ sigma[j * r : (j + 1) * r, i * r : (i + 1) * r] @ v.t()
                got = layer.delta_weight()[j * 48 : (j + 1) * 48, i * 48 : (i + 1) * 48]
                torch.testing.assert_close(got, block, atol=1e-6, rtol=1e-5, msg=name)
    x, _ = inputs("dinov2")
    with torch.no_grad():
        before = model(x)
        merge_fact(model)
        assert not fact_layers(model) and not hasattr(model, "fact_tt")
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_runs():
    _, model = prepared(rank=2)
    x, _ = inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).shape == (4, C)


def _bare() -> nn.Module:
    torch.manual_seed(0)
    return tiny_vit(num_classes=0).eval()


def test_a_bank_refuses_the_fact_file_and_serves_it_converted_to_lora(tmp_path):
    assert not method_traits("fact-tt").servable
    model = _bare()
    model.reset_classifier(3)
    get_method("fact-tt").prepare(model, FacTOptions(rank=2, scale=2.0), PrepareContext(seed=1))
    randomize(model, seed=4)
    model.eval()
    fact_file = save_adapters(model, tmp_path / "fact.safetensors", metadata={"method": "fact-tt"})
    bank = mimi.AdapterBank(_bare(), device="cpu")
    with pytest.raises(CheckpointError, match="'fact-tt' cannot be served by a bank"):
        bank.add("fact", fact_file)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        fact_to_lora(model)
        assert not fact_layers(model) and all(m.rank == 2 for m in model.modules() if isinstance(m, LoRALinear))
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    lora_file = save_adapters(model, tmp_path / "as_lora.safetensors")
    bank.add("fact", lora_file)
    torch.testing.assert_close(bank.logits(x, "fact"), expected, atol=1e-5, rtol=1e-5)


def test_cli_train_then_eval_reloads_the_same_model(tmp_path, capsys):
    root = write_vtab_task(tmp_path / "data", sizes={"train800": 16, "val200": 8, "test": 8})
    out = tmp_path / "run"
    args = "--model test_vit --img-size 32 --data vtab1k:toy --batch-size 8 --device cpu --seed 0 --no-progress"
    extra = ["--method", "fact-tt", "--method-kwargs", '{"rank": 2}', "--epochs", "1", "--lr", "3e-3"]
    assert main(["train", *args.split(), *extra, "--data-root", str(root), "--out", str(out)]) == 0
    # test_vit: width 64, 6 blocks, MLP 3 D: 3 + 1 + 3 + 3 = 10 matrices per block
    summary = json.loads((out / "summary.json").read_text())
    assert summary[-1]["trainable_params"] == 2 * 64 * 2 + 60 * 4 + 64 * 3 + 3
    saved = load_file(str(out / "adapters.safetensors"))
    assert {"fact_tt.d64.u", "fact_tt.d64.v", "blocks.5.mlp.fc2.sigma", "head.weight"} <= set(saved)
    assert saved["fact_tt.d64.u"].abs().sum() > 0  # trained away from its zero start
    from mimi.trainer import load_run

    run = load_run(out)
    state = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
    assert set(state) == set(saved) and all(torch.equal(state[n], saved[n]) for n in saved)
    assert isinstance(run.model.blocks[0].attn.qkv, FacTLinear)
    capsys.readouterr()
    assert main(["eval", str(out), "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["acc"] == pytest.approx(summary[-1]["test_acc"], abs=1e-9)
