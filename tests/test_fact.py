"""FacT-TT (``fact-tt``): the start at the backbone, parameter counts by hand, gradients, rank from a budget, reloads,
the side path against the dense update, LoRA conversion for a bank, and the CLI end to end."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from conftest import tiny_dinov2, tiny_swin, tiny_vit
from safetensors.torch import load_file, save_file
from test_bank import bare, make_task, reference
from torch import nn
from vtab_fixture import write_vtab_task

import mimi
from mimi.cli import main
from mimi.config import TrainConfig
from mimi.core.errors import CheckpointError, ConfigError, ModelError
from mimi.core.lora import LoRALinear
from mimi.core.taskfile import byte_breakdown, read_metadata, restore_trained, save_adapters
from mimi.methods import PrepareContext, get_method, method_traits
from mimi.methods.fact import (
    META,
    FacTLinear,
    FacTOptions,
    add_fact,
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


def fact_task(path, *, arch: str = "vit", rank: int = 2, scale: float = 2.0, meta: bool = True, **save_kw):
    """(trained FacT model in eval mode, its task file) on the bank's backbone; ``meta=False``: the file lacks the
    ``fact`` entry (a file from before it)."""
    model = bare(arch)  # the bank tests' backbone: the same weights every time
    model.reset_classifier(3)
    method = get_method("fact-tt")
    method.prepare(model, FacTOptions(rank=rank, scale=scale), PrepareContext(seed=1))
    randomize(model, seed=4)
    model.eval()
    extra = method.task_metadata(model) if meta else {}
    return model, save_adapters(model, path, metadata={"method": "fact-tt", **extra}, **save_kw)


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_a_bank_serves_the_fact_file_as_lora(arch, tmp_path):
    """The FacT file itself (U, V, Sigmas, head: no LoRA tensor) is served as the equal LoRA layers: the trained
    model's logits; its entry records the scale (and on Swin which width each layer has)."""
    assert method_traits("fact-tt").servable
    model, fact_file = fact_task(tmp_path / "fact.safetensors", arch=arch)
    stored = load_file(str(fact_file))
    assert set(stored) == set(trainable(model)) and not any(".lora_" in n for n in stored)
    entry = json.loads(read_metadata(fact_file)[META])
    assert entry == ({"s": 2} if arch == "vit" else {"s": 2, "w": [[32, 4], [64, 4]]})
    bank = mimi.AdapterBank(bare(arch), device="cpu")
    bank.add("fact", fact_file)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(bank.logits(x, "fact"), expected, atol=1e-5, rtol=0)
    info = bank.info()["fact"]
    n_fact = sum(t.numel() for n, t in stored.items() if not n.startswith("head."))
    assert info["method"] == "fact-tt" and info["adapter_params"] == n_fact  # what the file stores, not the LoRA
    assert len(info["sizes"]) == len(fact_layers(model)) and set(info["sizes"].values()) == {2}  # LoRA ranks
    # fact_to_lora on the live model: the same LoRA, whose own file serves the same (as any LoRA file)
    with torch.no_grad():
        fact_to_lora(model)
        assert not fact_layers(model) and all(m.rank == 2 for m in model.modules() if isinstance(m, LoRALinear))
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    lora_file = save_adapters(model, tmp_path / "as_lora.safetensors", metadata={"method": "fact-tt"})
    bank.add("lora", lora_file)  # recorded as fact-tt but holding LoRA layers: served as they are
    torch.testing.assert_close(bank.logits(x, "lora"), expected, atol=1e-5, rtol=1e-5)


def test_a_mixed_batch_of_a_fact_task_and_an_adapter_task_equals_each_alone(tmp_path):
    _, fact_file = fact_task(tmp_path / "fact.safetensors")
    make_task("vit", "mimi", 4, tmp_path / "mimi.safetensors", seed=5)
    bank = mimi.AdapterBank(bare("vit"), device="cpu")
    bank.add("f", fact_file)
    bank.add("m", tmp_path / "mimi.safetensors")
    x = torch.randn(6, 3, 32, 32)
    order = ["f", "m", "m", "f", "f", "m"]
    with torch.no_grad():
        alone = {t: bank.logits(x, t) for t in ("f", "m")}
        rows = bank.logits(x, order)
        torch.testing.assert_close(alone["m"], reference("vit", tmp_path / "mimi.safetensors")(x), atol=1e-5, rtol=0)
    for i, (t, row) in enumerate(zip(order, rows)):
        torch.testing.assert_close(row, alone[t][i], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.int8, 0.03), ("int4", 0.12)])
def test_quantised_fact_files_serve_close_to_the_trained_model(dtype, tol, tmp_path):
    model, path = fact_task(tmp_path / "q.safetensors", dtype=dtype)
    assert json.loads(read_metadata(path)[META]) == {"s": 2}  # the compact header keeps the entry as it is
    bank = mimi.AdapterBank(bare("vit"), device="cpu")
    bank.add("q", path)
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = model(x), bank.logits(x, "q")
    assert (got - want).abs().max() < tol * want.abs().max()
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.8


def test_a_fact_file_without_its_entry_is_refused_in_one_line(tmp_path):
    _, path = fact_task(tmp_path / "old.safetensors", meta=False)
    bank = mimi.AdapterBank(bare("vit"), device="cpu")
    with pytest.raises(CheckpointError, match="without its 'fact' metadata entry.*export it again with this") as e:
        bank.add("old", path)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(path)) and not bank.tasks
    model, _ = fact_task(tmp_path / "new.safetensors")
    damaged = save_adapters(model, tmp_path / "bad.safetensors", metadata={"method": "fact-tt", META: '{"s":-1}'})
    with pytest.raises(CheckpointError, match="'fact' metadata entry is damaged"):
        bank.add("bad", damaged)


def test_the_fact_entry_costs_a_few_header_bytes(tmp_path):
    """The entry is '{"s":1}' on a ViT (one width): about 20 bytes of a compact int8 header, kept as written."""
    _, model = prepared(rank=2, scale=1.0)
    meta = get_method("fact-tt").task_metadata(model)
    assert meta == {META: '{"s":1}'}
    entry_bytes = len(json.dumps(meta, separators=(",", ":"))) - 2 + 1  # '"fact":"{\"s\":1}"' and a comma
    assert entry_bytes < 100, entry_bytes
    with torch.device("meta"):  # ViT-S/14 (12 blocks): the same one-width entry
        big = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56)
        add_fact(big, rank=4, scale=0.1)
    assert len(get_method("fact-tt").task_metadata(big)[META]) < 100
    plain = save_adapters(model, tmp_path / "plain.safetensors", dtype=torch.int8, metadata={"method": "fact-tt"})
    tagged = save_adapters(
        model, tmp_path / "tagged.safetensors", dtype=torch.int8, metadata={"method": "fact-tt", **meta}
    )
    grew = byte_breakdown(tagged)["header"] - byte_breakdown(plain)["header"]
    assert 0 <= grew <= entry_bytes + 7, grew  # safetensors pads its header to 8 bytes


def test_cli_train_then_eval_reloads_the_same_model(tmp_path, capsys):
    root = write_vtab_task(tmp_path / "data", sizes={"train800": 16, "val200": 8, "test": 8})
    out = tmp_path / "run"
    torch.manual_seed(0)
    weights = tmp_path / "backbone.safetensors"  # a weight file: `mimi predict` serves on the weights it records
    save_file(timm.create_model("test_vit", img_size=32, num_classes=0).state_dict(), str(weights))
    args = "--model test_vit --img-size 32 --data vtab1k:toy --batch-size 8 --device cpu --seed 0 --no-progress"
    args += f" --weights {weights}"
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
    # the run's own file serves: it records the scale; a bank on the backbone it records gives the run's logits
    fact_file = out / "adapters.safetensors"
    assert read_metadata(fact_file)[META] == '{"s":1}'
    images = sorted((root / "toy" / "images").glob("*.png"))
    bank = mimi.AdapterBank.from_task_files({"f": fact_file}, device="cpu")
    x = bank.preprocess(images[:6])
    with torch.no_grad():
        want = run.model.eval()(x)
        torch.testing.assert_close(bank.logits(x, "f"), want, atol=1e-5, rtol=0)
    i8 = tmp_path / "i8.safetensors"
    assert main(["export", str(out), "--out", str(i8), "--dtype", "int8"]) == 0
    assert main(["info", str(i8)]) == 0
    printed = capsys.readouterr().out
    assert "trained: fact-tt" in printed
    # the factors are listed by module (shared U, V; each layer's Sigmas), their parameters adding up
    rows = [ln.split() for ln in printed.splitlines() if ln.startswith(("fact_tt.", "blocks."))]
    assert any(r[0].startswith("fact_tt.") for r in rows) and any(r[0].endswith("attn.qkv") for r in rows)
    n_fact = sum(t.numel() for n, t in saved.items() if "head" not in n)
    assert sum(int(r[2].replace(",", "")) for r in rows) == n_fact
    pred = tmp_path / "p.jsonl"
    tasks = ["--task", f"f={fact_file}", "--task", f"q={i8}"]
    assert main(["predict", *tasks, "--images", *map(str, images[:6]), "--out", str(pred), "--no-progress"]) == 0
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    top1 = {r["image"]: r["ids"][0] for r in rows if r["task"] == "f"}
    assert [top1[str(f)] for f in images[:6]] == want.argmax(1).tolist()
    assert {r["task"] for r in rows} == {"f", "q"} and len(rows) == 12
