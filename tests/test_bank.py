"""The adapter bank: per-task logits equal each task's own model, one backbone pass per mixed batch, safe refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_swin, tiny_vit
from PIL import Image

import mimi
from mimi.core.adapters import AdapterConfig, adapters, add_adapters, freeze_backbone
from mimi.core.lora import apply_lora_layout, lora_targets
from mimi.core.shrink import apply_plan
from mimi.deploy.routing import BankSite

ARCHS = {"vit": tiny_vit, "swin": tiny_swin}
MIMI_SIZES = [5, 0, 2, 6, 0, 1, 3, 4]  # per adapter in model order (the tiny Swin has 4 adapters, the ViT 4)


def bare(arch: str) -> torch.nn.Module:
    """The same frozen backbone every time (weights drawn from seed 0), without a head."""
    torch.manual_seed(0)
    return ARCHS[arch](num_classes=0).eval()


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def make_task(arch: str, kind: str, num_classes: int, path, *, seed: int = 1, **save_kw) -> None:
    """A task file as training would leave it, with non-zero trained tensors."""
    model = bare(arch)
    model.reset_classifier(num_classes)
    if kind == "mimi":  # uneven sizes, two adapters removed
        add_adapters(model, AdapterConfig(hidden_dim=6, init_seed=seed))
        names = [n for n, _ in adapters(model)]
        apply_plan(model, {n: list(range(k)) for n, k in zip(names, MIMI_SIZES)})
    elif kind == "adapter":
        add_adapters(model, AdapterConfig(hidden_dim=3, init_seed=seed))
    elif kind == "adaptformer":
        add_adapters(model, AdapterConfig(hidden_dim=4, placement="parallel", scale=0.1, targets=("mlp",)))
    elif kind == "lora":  # uneven ranks, one layer left without LoRA
        layers = [n for n, _ in lora_targets(model)]
        apply_lora_layout(model, {n: {"rank": 1 + i % 3, "alpha": 2.0} for i, n in enumerate(layers[1:])}, seed=seed)
    elif kind == "mimi-lora":  # linear adapters (LoRA written as adapters), ranks pruned unevenly, one layer removed
        add_adapters(
            model,
            AdapterConfig(
                hidden_dim=4,
                placement="parallel",
                act="identity",
                bias=False,
                targets=("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
                init_seed=seed,
            ),
        )
        names = [n for n, _ in adapters(model)]
        apply_plan(model, {n: list(range((i * 3) % 5)) for i, n in enumerate(names)})
    elif kind == "linear":
        freeze_backbone(model)
    _randomize(model, seed)
    mimi.save_adapters(model, path, **save_kw)


def reference(arch: str, path) -> torch.nn.Module:
    """The task's own model: a fresh backbone restored by load_adapters."""
    return mimi.load_adapters(bare(arch), path).eval()


TASKS = {
    "a": ("mimi", 3),
    "b": ("linear", 5),
    "c": ("lora", 4),
    "d": ("adaptformer", 2),
    "e": ("adapter", 7),
    "f": ("mimi-lora", 6),
}


@pytest.fixture(params=sorted(ARCHS))
def setup(request, tmp_path):
    arch = request.param
    files = {}
    for i, (task, (kind, c)) in enumerate(TASKS.items()):
        files[task] = tmp_path / f"{task}.safetensors"
        make_task(arch, kind, c, files[task], seed=10 + i)
    bank = mimi.AdapterBank(bare(arch), device="cpu")
    for task, f in files.items():
        bank.add(task, f)
    torch.manual_seed(3)
    x = torch.randn(7, 3, 32, 32)
    return arch, bank, files, x


def test_single_task_logits_equal_own_model(setup):
    arch, bank, files, x = setup
    assert bank.tasks == list(TASKS)
    for task, f in files.items():
        got = bank.logits(x, task)
        want = reference(arch, f)(x)
        assert got.shape == (7, TASKS[task][1])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert not torch.allclose(want, reference(arch, files["b"])(x)[:, :1].expand_as(want))


def test_mixed_batch_equals_own_models_in_one_pass(setup):
    arch, bank, files, x = setup
    order = ["c", "a", "f", "a", "d", "e", "b"]
    refs = {t: reference(arch, f)(x) for t, f in files.items()}
    calls = []
    hook = bank.model.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    try:
        rows = bank.logits(x, order)
    finally:
        hook.remove()
    assert len(calls) == 1  # the frozen backbone ran once for the whole mixed batch
    assert len(rows) == 7
    for i, (t, row) in enumerate(zip(order, rows)):
        assert row.shape == (TASKS[t][1],)
        torch.testing.assert_close(row, refs[t][i], atol=1e-5, rtol=0)


def test_a_site_without_the_task_costs_it_nothing(setup):
    """A linear-probe task runs no adapter: its rows never enter a site's gather."""
    _, bank, _, x = setup
    seen = []
    for m in bank.model.modules():
        if isinstance(m, BankSite):
            m.register_forward_pre_hook(lambda mod, args: seen.append(mod))
    sizes = []
    for m in bank.model.modules():
        if isinstance(m, BankSite):
            for a in m.adapters.values():
                a.register_forward_hook(lambda mod, args, out: sizes.append(args[0].shape[0]))
    bank.logits(x[:2], ["b", "b"])
    assert sizes == []  # task b (linear probe) has no adapters: none ran
    assert seen  # the wrapped sites themselves still ran the frozen branch


def test_fp16_file_and_info(setup, tmp_path):
    arch, bank, files, x = setup
    half = tmp_path / "half.safetensors"
    model = reference(arch, files["a"])
    mimi.save_adapters(model, half, dtype=torch.float16, metadata={"classes": json.dumps(["x", "y", "z"])})
    bank.add("half", half)
    torch.testing.assert_close(bank.logits(x, "half"), reference(arch, half)(x), atol=1e-5, rtol=0)
    info = bank.info()
    assert info["half"]["stored_dtype"] == "float16"
    assert info["half"]["bytes"] < info["a"]["bytes"]
    assert info["a"]["method"] == "adapter" and info["c"]["method"] == "lora" and info["b"]["method"] == "linear"
    used = MIMI_SIZES[: len(info["a"]["sizes"]) + info["a"]["removed_adapters"]]
    assert info["a"]["removed_adapters"] == used.count(0) >= 1
    assert sorted(info["a"]["sizes"].values()) == sorted(k for k in used if k)
    n_adapter = sum(t.numel() for n, t in reference(arch, files["a"]).named_parameters() if ".adapter." in n)
    assert info["a"]["adapter_params"] == n_adapter
    assert info["b"]["adapter_params"] == 0 and info["b"]["classes"] == 5


def test_wrong_architecture_refused_and_bank_unchanged(setup, tmp_path):
    arch, bank, files, x = setup
    other = "swin" if arch == "vit" else "vit"
    before_tasks, before = bank.tasks, bank.logits(x, "a")
    before_modules = [type(m).__name__ for m in bank.model.modules()]
    for kind in ("mimi", "lora", "linear"):
        f = tmp_path / f"other_{kind}.safetensors"
        make_task(other, kind, 3, f)
        with pytest.raises(mimi.CheckpointError, match="another architecture|width|no place|does not exist"):
            bank.add(f"new_{kind}", f)
    wide = tmp_path / "wide.safetensors"
    torch.manual_seed(0)
    m = tiny_vit(num_classes=3, embed_dim=96) if arch == "vit" else tiny_swin(num_classes=3)
    add_adapters(m, AdapterConfig(hidden_dim=2))
    if arch == "swin":  # another width of the same architecture: a ViT of width 96 stands in for it
        m = tiny_vit(num_classes=3, embed_dim=96)
        add_adapters(m, AdapterConfig(hidden_dim=2))
    mimi.save_adapters(m, wide)
    with pytest.raises(mimi.CheckpointError):
        bank.add("wide", wide)
    assert bank.tasks == before_tasks
    assert [type(m).__name__ for m in bank.model.modules()] == before_modules
    torch.testing.assert_close(bank.logits(x, "a"), before, atol=0, rtol=0)


def test_names_replace_and_remove(setup):
    arch, bank, files, x = setup
    with pytest.raises(mimi.ConfigError, match="already in the bank"):
        bank.add("a", files["b"])
    bank.add("a", files["b"], replace=True)
    torch.testing.assert_close(bank.logits(x, "a"), reference(arch, files["b"])(x), atol=1e-5, rtol=0)
    assert bank.tasks == ["b", "c", "d", "e", "f", "a"]
    with pytest.raises(mimi.ConfigError, match="unknown task"):
        bank.logits(x, ["a"] * 6 + ["zz"])
    with pytest.raises(mimi.ConfigError, match="one name per image"):
        bank.logits(x, ["a"] * 3)
    for t in list(bank.tasks):
        bank.remove(t)
    assert bank.tasks == []
    assert not any(isinstance(m, BankSite) for m in bank.model.modules())  # the bare backbone again
    torch.testing.assert_close(bank.model(x), bare(arch)(x), atol=0, rtol=0)


def test_model_name_mismatch_refused(tmp_path):
    f = tmp_path / "t.safetensors"
    make_task("vit", "linear", 3, f, metadata={"architecture": "deit_tiny_patch16_224"})
    bank = mimi.AdapterBank(bare("vit"), device="cpu")  # a timm vit_tiny_patch16_224 module
    with pytest.raises(mimi.CheckpointError, match="made for deit_tiny_patch16_224.*another architecture"):
        bank.add("t", f)
    assert bank.tasks == []


def test_predict_images_and_paths(tmp_path):
    f = tmp_path / "t.safetensors"
    make_task("vit", "mimi", 3, f, metadata={"classes": json.dumps(["cat", "dog", "eel"])})
    bank = mimi.AdapterBank(bare("vit"), device="cpu")
    bank.add("pets", f)
    bank.add("plain", f)
    imgs = [Image.new("RGB", (40, 30), (i * 40, 100, 200 - i * 30)) for i in range(3)]
    imgs[1].save(tmp_path / "one.png")
    preds = bank.predict([imgs[0], tmp_path / "one.png", imgs[2]], ["pets", "plain", "pets"], topk=2)
    assert [p["task"] for p in preds] == ["pets", "plain", "pets"]
    assert preds[1]["image"] == str(tmp_path / "one.png") and "image" not in preds[0]
    for p in preds:
        assert len(p["ids"]) == 2 and p["probs"][0] >= p["probs"][1]
        assert p["names"] == [["cat", "dog", "eel"][i] for i in p["ids"]]
    x = bank.preprocess(imgs)
    with torch.no_grad():
        want = reference("vit", f)(x).softmax(-1)
    assert preds[0]["ids"][0] == int(want[0].argmax())
    assert abs(preds[2]["probs"][0] - float(want[2].max())) < 1e-5
    with pytest.raises(mimi.DataError, match="cannot read image"):
        bank.predict([tmp_path / "missing.png"], "pets")


def test_pixels_normalised_as_one_batch_equal_preprocess():
    """A server decodes each request to uint8 pixels and normalises the batch at once: the same floats, bit for bit,
    whether the batch is all pixels or pixels mixed with already preprocessed images."""
    bank = mimi.AdapterBank(bare("vit"), device="cpu")
    imgs = [Image.new("RGB", (40, 30), (i * 40, 100, 200 - i * 30)) for i in range(3)] + [Image.new("L", (9, 70), 77)]
    want = bank.preprocess(imgs)
    pixels = [bank.pixels([img])[0] for img in imgs]
    assert all(p.dtype == torch.uint8 and p.shape == want.shape[1:] for p in pixels)
    assert torch.equal(bank.stack(pixels), want)
    mixed = [pixels[0], want[1], pixels[2], want[3]]
    assert torch.equal(bank.stack(mixed), want)
    with pytest.raises(mimi.ConfigError, match="uint8"):
        bank.normalize(want)


def test_files_that_train_the_backbone_are_refused(tmp_path):
    model = bare("vit")
    model.reset_classifier(3)
    freeze_backbone(model)
    model.blocks[0].norm1.weight.requires_grad_(True)  # e.g. BitFit / trained norms, changed by training
    with torch.no_grad():
        model.blocks[0].norm1.weight.mul_(1.1)
    f = tmp_path / "t.safetensors"
    mimi.save_adapters(model, f)
    bank = mimi.AdapterBank(bare("vit"), device="cpu")
    with pytest.raises(mimi.CheckpointError, match="backbone itself"):
        bank.add("t", f)


def test_untouched_backbone_tensors_in_a_file_are_accepted(tmp_path):
    """A linear probe saved without freezing the backbone: its backbone tensors equal the bank's, so it serves."""
    model = bare("vit")
    model.reset_classifier(3)
    _randomize(model, 0)  # everything is trainable: the backbone too
    f = tmp_path / "changed.safetensors"
    mimi.save_adapters(model, f)
    model = bare("vit")
    model.reset_classifier(3)  # all trainable, only the head differs from the backbone
    with torch.no_grad():
        model.head.weight.normal_()
    g = tmp_path / "probe.safetensors"
    mimi.save_adapters(model, g)
    bank = mimi.AdapterBank(bare("vit"), device="cpu")
    with pytest.raises(mimi.CheckpointError, match="backbone itself"):
        bank.add("changed", f)
    bank.add("probe", g)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(bank.logits(x, "probe"), reference("vit", g)(x), atol=1e-5, rtol=0)


def test_info_lists_lora_ranks(tmp_path, capsys):
    from mimi.cli import main

    f = tmp_path / "lora.safetensors"
    make_task("vit", "lora", 3, f)
    assert main(["info", str(f)]) == 0
    out = capsys.readouterr().out
    assert "LoRA layer" in out and "rank" in out
    layers = [n for n, _ in lora_targets(bare("vit"))][1:]  # make_task leaves the first layer without LoRA
    for i, name in enumerate(layers):
        assert any(line.split()[:2] == [name, str(1 + i % 3)] for line in out.splitlines())


# ---------------------------------------------------------------- mixed-batch strategies (gather, grouped, padded)

STRATEGIES = ("gather", "grouped", "padded")


def _mixed_rows(bank, x, order, refs, strategy: str) -> None:
    bank.mixed = strategy
    calls = []
    hook = bank.model.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    try:
        rows = bank.logits(x, order)
    finally:
        hook.remove()
    assert len(calls) == 1  # one backbone pass whatever the strategy
    assert len(rows) == len(order)
    for i, (t, row) in enumerate(zip(order, rows)):
        assert row.shape == (TASKS[t][1],)
        torch.testing.assert_close(row, refs[t][i], atol=1e-5, rtol=0, msg=f"{strategy}: row {i} ({t})")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_equals_own_models(setup, strategy):
    """Unsorted, repeated tasks of every kind, uneven counts (padded pads rows) and even ones (no padding)."""
    arch, bank, files, _ = setup
    torch.manual_seed(5)
    x = torch.randn(12, 3, 32, 32)
    refs = {t: reference(arch, f)(x) for t, f in files.items()}
    uneven = ["f", "a", "c", "a", "d", "e", "b", "c", "a", "f", "d", "a"]  # a x4, c/d/f x2, e/b x1
    even = ["e", "c", "a", "f", "b", "d", "a", "d", "c", "b", "f", "e"]  # every task twice, not sorted
    for order in (uneven, even, uneven):  # the third pass reuses the stacked weights of the first
        _mixed_rows(bank, x, order, refs, strategy)
    _mixed_rows(bank, x[:3], ["a", "c", "a"], {t: r[:3] for t, r in refs.items()}, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_follow_added_replaced_and_removed_tasks(setup, strategy):
    arch, bank, files, x = setup
    order = ["c", "a", "f", "a", "d", "e", "b"]
    refs = {t: reference(arch, f)(x) for t, f in files.items()}
    _mixed_rows(bank, x, order, refs, strategy)
    f = files["a"].parent / "a_new.safetensors"  # same name, other adapters: stacked weights must not be reused
    make_task(arch, "adapter", 3, f, seed=99)
    bank.add("a", f, replace=True)
    refs["a"] = reference(arch, f)(x)
    _mixed_rows(bank, x, order, refs, strategy)
    bank.remove("f")
    order = ["c", "a", "e", "a", "d", "e", "b"]
    _mixed_rows(bank, x, order, refs, strategy)
    bank.add("f", files["f"])
    _mixed_rows(bank, x, ["f", "a", "e", "a", "f", "c", "b"], refs, strategy)


def test_strategy_choice_and_default(setup):
    from mimi.deploy.routing import DEFAULT_STRATEGY

    arch, bank, files, x = setup
    assert bank.mixed == DEFAULT_STRATEGY in STRATEGIES
    assert mimi.AdapterBank(bare(arch), device="cpu", mixed="grouped").mixed == "grouped"
    with pytest.raises(mimi.ConfigError, match="strategy"):
        mimi.AdapterBank(bare(arch), device="cpu", mixed="fast")
    with pytest.raises(mimi.ConfigError, match="strategy"):
        bank.mixed = "fast"
    assert bank.mixed == DEFAULT_STRATEGY


def test_padded_falls_back_to_grouped_where_it_cannot_pad(setup):
    """An activation with act(0) != 0 would make padded neurons speak: that site runs grouped instead."""
    _, bank, _, x = setup
    order = ["a", "e", "a", "c", "e", "a", "e"]
    site = next(m for m in bank.model.modules() if isinstance(m, BankSite) and len(m.adapters) >= 2)
    for a in site.adapters.values():
        a.act = torch.nn.Sigmoid()  # on every task there, so that both strategies compute the same function
    want = []
    for strategy in ("grouped", "padded"):
        bank.mixed = strategy
        want.append(bank.logits(x, order))
    for g, p in zip(*want):
        torch.testing.assert_close(p, g, atol=1e-5, rtol=0)
