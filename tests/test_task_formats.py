"""Task files that travel: int8 task files, PEFT LoRA folders out (`mimi export --peft`) and in (bank, CLI), cards."""

from __future__ import annotations

import json

import peft
import pytest
import timm
import torch
import yaml
from conftest import tiny_vit
from safetensors.torch import load_file, save_file
from test_bank import bare, make_task, reference
from vtab_fixture import write_vtab_task

import mimi
from mimi.cli import main
from mimi.core.compact_meta import FORMAT_COMPACT
from mimi.core.errors import CheckpointError
from mimi.core.quant import (
    CODES,
    FLOATS,
    PACKED_CODES,
    PACKED_FLOATS,
    SCALES,
    SCHEME,
    SCHEME_INT8,
    dequantize,
    quantize,
    split_scales,
)
from mimi.core.taskfile import byte_breakdown, load_tensors, read_metadata, trainable_names
from mimi.deploy.peft_folder import read_peft_folder
from mimi.deploy.taskdir import TaskDir
from mimi.trainer import load_run

# ---------------------------------------------------------------------------------------------- int8


@pytest.mark.parametrize(("axis", "bits"), [(0, 8), (1, 8), (0, 4), (1, 4)])
def test_quantised_round_trip_error_is_at_most_half_a_step(axis, bits):
    torch.manual_seed(0)
    w = torch.randn(16, 40) * torch.logspace(-6, 2, 16)[:, None]  # rows of very different magnitudes
    w = w if axis == 0 else w.T.contiguous()  # (40, 16): the columns differ
    zero = (3, slice(None)) if axis == 0 else (slice(None), 3)
    w[zero] = 0.0  # an all-zero channel
    codes, scales = quantize(w, axis=axis, bits=bits)
    qmax = 127 if bits == 8 else 7
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (16,)
    assert codes.abs().max() <= qmax
    assert (scales.float() * qmax >= w.abs().amax(1 - axis)).all()  # no entry clipped
    step = scales.float()[:, None] if axis == 0 else scales.float()[None, :]
    err = (dequantize(codes, scales, axis) - w).abs()
    assert (err <= step / 2 * (1 + 1e-6) + 1e-12).all()
    assert dequantize(codes, scales, axis)[zero].abs().max() == 0


@pytest.mark.parametrize("kind", ["mimi", "lora", "mimi-lora"])
def test_int8_task_file_loads_everywhere_and_is_smaller(kind, tmp_path):
    f32, f16, i8 = (tmp_path / f"{d}.safetensors" for d in ("f32", "f16", "i8"))
    make_task("vit", kind, 4, f32, seed=3)
    make_task("vit", kind, 4, f16, seed=3, dtype=torch.float16)
    make_task("vit", kind, 4, i8, seed=3, dtype=torch.int8)
    # a scale per row or column, whichever are fewer: a code saves 1 byte a value against float16, scales cost 2
    # bytes for every min(rows, columns) values at most
    assert i8.stat().st_size < f16.stat().st_size
    meta, stored, exact = read_metadata(i8), load_tensors(i8, dequantize=False), load_file(str(f32))
    head, scales = set(json.loads(meta["head"])), split_scales(stored, meta)
    assert meta["stored_dtype"] == "int8" and meta["int8"] == SCHEME_INT8
    for name, t in exact.items():
        if t.ndim != 2:  # biases: float16
            assert stored[name].dtype == torch.float16
            continue
        assert stored[name].dtype == torch.int8  # the head's weight too
        s, axis = scales[name]
        assert axis == (0 if name in head or t.shape[0] <= t.shape[1] else 1)
        assert s.numel() == (t.shape[0] if name in head else min(t.shape))
        step = s.float()[:, None] if axis == 0 else s.float()[None, :]
        assert ((load_tensors(i8)[name] - t).abs() <= step / 2 + 1e-7).all()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        want = reference("vit", f32)(x)
        got = mimi.load_adapters(bare("vit"), i8).eval()(x)
    assert (got - want).abs().max() < 0.03 * want.abs().max()  # a few per cent: half a step per weight
    bank = mimi.AdapterBank(bare("vit"), device="cpu")
    bank.add("q", i8)
    assert torch.allclose(bank.logits(x, "q"), got, atol=1e-5)
    assert bank.info()["q"]["stored_dtype"] == "int8" and bank.info()["q"]["bytes"] == i8.stat().st_size


def _header(path) -> dict:
    import struct

    data = path.read_bytes()
    return json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])


@pytest.mark.parametrize("kind", ["mimi", "mimi-lora", "lora"])
def test_int8_file_is_packed_and_names_every_trained_tensor(kind, tmp_path):
    f32, i8 = tmp_path / "f32.safetensors", tmp_path / "i8.safetensors"
    make_task("vit", kind, 4, f32, seed=5)
    make_task("vit", kind, 4, i8, seed=5, dtype=torch.int8)
    header, exact = _header(i8), load_file(str(f32))
    assert set(header) == {"__metadata__", PACKED_CODES, PACKED_FLOATS}  # two tensors, not one entry per tensor
    raw = header["__metadata__"]
    assert raw["format"] == FORMAT_COMPACT and not {"trainable", "int8_layout", "sizes", "head"} & set(raw)
    meta = read_metadata(i8)  # expanded: the long entries every reader knows
    assert trainable_names(meta) == json.loads(read_metadata(f32)["trainable"])
    packed = json.loads(meta["int8_layout"])
    assert [f"{m}.{p}" for m, ps in packed.items() for p in ps] == sorted(exact)
    stored = load_tensors(i8, dequantize=False)  # unpacked: each tensor by name, as stored
    assert {k: tuple(v.shape) for k, v in stored.items() if k != SCALES} == {
        k: tuple(v.shape) for k, v in exact.items()
    }
    n_codes = sum(t.numel() for t in exact.values() if t.ndim == 2)  # the head's weight included
    assert header[PACKED_CODES]["dtype"] == "I8" and header[PACKED_CODES]["shape"] == [n_codes]
    # every entry of the long metadata comes back (JSON values equal), in the order the sizes were written
    long, jsons = read_metadata(f32), ("sizes", "head", "lora", "adapter_config")
    for key, value in long.items():
        if key in ("trainable", "format"):
            continue
        same = json.loads(meta[key]) == json.loads(value) if key in jsons else meta[key] == value
        assert same, key
    assert list(json.loads(meta["sizes"])) == list(json.loads(long["sizes"]))
    assert len(json.dumps(raw)) < 0.8 * len(json.dumps(meta))  # the same entries, long and unfolded


def _v1_file(f32, out, *, packed: bool) -> dict[str, torch.Tensor]:
    """An int8 file as `mimi export --dtype int8` wrote it before the head was quantised: per-row scales, the head
    and biases float16; ``packed``: three tensors and an `int8_layout` entry, else one entry per tensor and a
    `trainable` list (the first layout). Returns the float32 tensors a reader must get from it."""
    meta, exact = dict(read_metadata(f32)), load_file(str(f32))
    head = set(json.loads(meta["head"]))
    meta.update({"int8": SCHEME, "stored_dtype": "int8"})
    stored, scales, want = {}, [], {}
    for name in sorted(exact):
        t = exact[name]
        if t.ndim == 2 and name not in head:
            q, s = quantize(t)
            stored[name], want[name] = q, dequantize(q, s)
            scales.append(s)
        else:
            stored[name] = t.to(torch.float16)
            want[name] = stored[name].float()
    if packed:
        layout: dict[str, dict] = {}
        for name in sorted(exact):
            module, _, param = name.rpartition(".")
            layout.setdefault(module, {})[param] = list(exact[name].shape)
        meta["int8_layout"] = json.dumps(layout)
        del meta["trainable"]
        tensors = {
            CODES: torch.cat([t.reshape(-1) for t in stored.values() if t.dtype == torch.int8]),
            FLOATS: torch.cat([t.reshape(-1) for t in stored.values() if t.dtype == torch.float16]),
        }
    else:
        tensors = dict(stored)
    tensors[SCALES] = torch.cat(scales)
    save_file(tensors, str(out), metadata=meta)
    return want


@pytest.mark.parametrize("packed", [True, False], ids=["v1-packed", "first-layout"])
def test_int8_files_of_earlier_layouts_still_load(packed, tmp_path):
    """Head in float16, one scale per row: what `mimi export --dtype int8` wrote before (both of its layouts)."""
    f32, old = tmp_path / "f32.safetensors", tmp_path / "old.safetensors"
    make_task("vit", "mimi", 4, f32, seed=2)
    want = _v1_file(f32, old, packed=packed)
    loaded = load_tensors(old)
    assert set(loaded) == set(want) and all(torch.equal(loaded[k], want[k]) for k in want)
    assert load_tensors(old, dequantize=False)["head.weight"].dtype == torch.float16
    expected = mimi.load_adapters(bare("vit"), f32).eval()
    with torch.no_grad():
        for name, p in expected.named_parameters():
            if name in want:
                p.copy_(want[name])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = mimi.load_adapters(bare("vit"), old).eval()(x)
        assert torch.allclose(got, expected(x), atol=1e-6, rtol=0)
    bank = mimi.AdapterBank(bare("vit"), device="cpu")
    bank.add("old", old)
    assert torch.allclose(bank.logits(x, "old"), got, atol=1e-5)
    parts = byte_breakdown(old)
    assert parts["other"] == 0 and parts["adapters"] + parts["head"] + parts["header"] == old.stat().st_size


@pytest.mark.parametrize("damage", ["short", "long", "layout"])
def test_damaged_int8_file_is_refused_in_one_line(damage, tmp_path):
    i8, bad = tmp_path / "i8.safetensors", tmp_path / "bad.safetensors"
    make_task("vit", "mimi", 4, i8, seed=2, dtype=torch.int8)
    raw = _header(i8)["__metadata__"]
    tensors = load_file(str(i8))
    if damage == "short":
        tensors[PACKED_FLOATS] = tensors[PACKED_FLOATS][:-1].clone()
    elif damage == "long":
        tensors[PACKED_FLOATS] = torch.cat([tensors[PACKED_FLOATS], tensors[PACKED_FLOATS][:1]])
    else:
        raw["ly"] = raw["ly"][:-5]
    save_file(tensors, str(bad), metadata=raw)
    with pytest.raises(CheckpointError, match="damaged int8 task file") as e:
        mimi.load_adapters(bare("vit"), bad)
    assert "\n" not in str(e.value) and "export it again" in str(e.value)
    bank = mimi.AdapterBank(bare("vit"), device="cpu")
    with pytest.raises(CheckpointError, match="damaged int8 task file"):
        bank.add("bad", bad)
    assert bank.tasks == []


# ---------------------------------------------------------------------------------------------- PEFT in


def _peft_trained(folder, *, depth: int = 2, **lora_kw):
    """A LoRA trained by PEFT itself on the shared tiny backbone for a few steps, saved with save_pretrained."""
    model = bare("vit") if depth == 2 else tiny_vit(num_classes=0, depth=depth).eval()
    model.reset_classifier(3)
    kw = dict(r=2, lora_alpha=3, target_modules=["qkv", "fc2"], modules_to_save=["head"], lora_dropout=0.1)
    kw.update(lora_kw)
    pm = peft.get_peft_model(model, peft.LoraConfig(**kw))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g)
    pm.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(pm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.save_pretrained(str(folder))
    return pm.eval()


def test_peft_folder_served_beside_a_mimi_task(tmp_path):
    pm = _peft_trained(
        tmp_path / "pf", rank_pattern={"blocks.0.attn.qkv": 4}, alpha_pattern={"fc2": 5.0}, use_rslora=True
    )
    (tmp_path / "pf" / "labels.json").write_text(json.dumps(["cat", "dog", "eel"]))
    make_task("vit", "mimi", 5, tmp_path / "m.safetensors", seed=2)
    bank = mimi.AdapterBank(bare("vit"), device="cpu")
    bank.add("m", tmp_path / "m.safetensors")
    bank.add("p", tmp_path / "pf")
    torch.manual_seed(1)
    x = torch.randn(6, 3, 32, 32)
    order = ["p", "m", "p", "p", "m", "p"]
    with torch.no_grad():
        want_p, want_m = pm(x), reference("vit", tmp_path / "m.safetensors")(x)
    rows = bank.logits(x, order)
    for i, t in enumerate(order):
        assert torch.allclose(rows[i], (want_p if t == "p" else want_m)[i], atol=1e-5), (i, t)
    info = bank.info()["p"]
    assert info["class_names"] == ["cat", "dog", "eel"] and info["sizes"]["blocks.0.attn.qkv"] == 4
    assert info["adapter_params"] == sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)


def test_peft_folder_for_another_backbone_refused_and_bank_unchanged(tmp_path):
    _peft_trained(tmp_path / "deep", depth=3)
    _peft_trained(tmp_path / "ok")
    bank = mimi.AdapterBank(bare("vit"), device="cpu")
    bank.add("ok", tmp_path / "ok")
    x = torch.randn(2, 3, 32, 32)
    before = bank.logits(x, "ok")
    with pytest.raises(CheckpointError, match="blocks.2.*does not exist.*depth"):
        bank.add("deep", tmp_path / "deep")
    wide = tmp_path / "wide"  # a folder made for a wider model: the head reads 96 features
    _peft_trained(wide)
    t = load_file(str(wide / "adapter_model.safetensors"))
    t["base_model.model.head.weight"] = torch.zeros(3, 96)
    save_file(t, str(wide / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="96 features"):
        bank.add("wide", wide)
    cfg = json.loads((wide / "adapter_config.json").read_text())
    cfg["auto_mapping"] = {"base_model_class": "SwinTransformer"}
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="SwinTransformer"):
        bank.add("swin", tmp_path / "ok")
    assert bank.tasks == ["ok"] and torch.equal(bank.logits(x, "ok"), before)


def test_peft_folders_mimi_cannot_serve_are_refused_by_name(tmp_path):
    _peft_trained(tmp_path / "dora", use_dora=True)
    with pytest.raises(CheckpointError, match="use_dora"):
        read_peft_folder(tmp_path / "dora")
    _peft_trained(tmp_path / "nohead", modules_to_save=None)
    with pytest.raises(CheckpointError, match="no classifier head in modules_to_save"):
        read_peft_folder(tmp_path / "nohead")
    _peft_trained(tmp_path / "bias", bias="all")
    with pytest.raises(CheckpointError, match="bias"):
        read_peft_folder(tmp_path / "bias")
    pickled = tmp_path / "pickled"
    _peft_trained(pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="never loads"):
        read_peft_folder(pickled)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="without adapter_config.json"):
        mimi.AdapterBank(bare("vit"), device="cpu").add("e", tmp_path / "empty")


def test_task_dir_lists_peft_folders(tmp_path):
    _peft_trained(tmp_path / "pf")
    make_task("vit", "lora", 3, tmp_path / "l.safetensors")
    (tmp_path / ".pf.abc.tmp").mkdir()  # an export in progress
    assert sorted(TaskDir(tmp_path).listing()) == ["l", "pf"]


# ---------------------------------------------------------------------------------------------- runs out

COMMON = "--model test_vit --img-size 32 --data vtab1k:toy --batch-size 16 --device cpu --seed 0 --no-progress"
RUNS = {
    "lora": "--method lora --adapter-dim 2 --first-epochs 1 --epochs 1 --lr 3e-3",
    "mimi-lora": "--method mimi-lora --adapter-dim 4 --budget-params 2000 --rho 0.6 --epochs 1 --first-epochs 1",
    "peft-lora": "--method peft-lora --adapter-dim 2 --first-epochs 1 --epochs 1 --lr 3e-3",
    "adapter": "--method adapter --adapter-dim 2 --first-epochs 1 --epochs 1",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("formats")
    root = write_vtab_task(base / "data")
    (root / "toy" / "classes.txt").write_text("red\ngreen\nblue\n")
    spec = {"spec": {"name": "toy", "licence": "CC-BY-NC-SA-4.0 (non-commercial use only)"}}
    (root / "toy" / "minivtab.json").write_text(json.dumps(spec))
    torch.manual_seed(0)
    weights = base / "backbone.safetensors"
    save_file(timm.create_model("test_vit", img_size=32, num_classes=0).state_dict(), str(weights))
    out = {}
    for name, extra in RUNS.items():
        out[name] = base / name
        argv = ["train", *COMMON.split(), *extra.split(), "--weights", str(weights)]
        assert main([*argv, "--data-root", str(root), "--out", str(out[name])]) == 0
    return base, weights, out


def _peft_model(weights, folder):
    model = timm.create_model("test_vit", num_classes=3, img_size=32)
    missing, _ = model.load_state_dict(load_file(str(weights)), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"]
    return peft.PeftModel.from_pretrained(model, str(folder)).eval()


@pytest.mark.parametrize("method", ["lora", "mimi-lora", "peft-lora"])
def test_export_peft_gives_peft_the_same_logits(runs, method, capsys):
    base, weights, out = runs
    folder = base / f"{method}-peft"
    assert main(["export", str(out[method]), "--peft", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "labels.json",
    ]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] == ["head"]
    run = load_run(out[method])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = run.model.eval()(x)
        got = _peft_model(weights, folder)(x)
    assert (got - want).abs().max() < 1e-5
    if method == "mimi-lora":  # pruned unevenly: patterns, and layers at rank 0 left out
        sizes = json.loads(read_metadata(out[method] / "adapters.safetensors")["sizes"])
        assert cfg["target_modules"] == [n.removesuffix(".adapter") for n in sizes]
        assert len(sizes) < 4 * len(run.model.blocks) and cfg["rank_pattern"] and cfg["alpha_pattern"]
    # the folder is a task: the bank's rows equal PEFT's, class names from labels.json
    bank = mimi.AdapterBank.from_task_files({"t": folder}, weights=str(weights), device="cpu")
    assert (bank.logits(x, "t") - got).abs().max() < 1e-5
    assert bank.info()["t"]["class_names"] == ["red", "green", "blue"]
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and front["license"] == "cc-by-nc-sa-4.0"
    assert front["base_model"] == "timm/test_vit" and front["datasets"] == ["vtab1k:toy"]
    acc = json.loads((out[method] / "summary.json").read_text())[-1]["test_acc"]
    assert front["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(acc, abs=1e-6)
    assert "PeftModel.from_pretrained" in card and "| block |" in card
    capsys.readouterr()
    assert main(["info", str(folder)]) == 0
    shown = capsys.readouterr().out
    assert "PEFT LoRA folder" in shown and "names from labels.json" in shown


def test_export_peft_refuses_bottleneck_adapters_and_writes_nothing(runs, capsys):
    base, _, out = runs
    folder, task = base / "adapter-peft", base / "adapter.safetensors"
    capsys.readouterr()
    assert main(["export", str(out["adapter"]), "--peft", str(folder), "--out", str(task)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--onnx" in err[0] and "--out FILE.safetensors" in err[0] and "adapter" in err[0]
    assert not folder.exists() and not task.exists() and not list(base.glob(".adapter-peft*"))


def test_predict_and_int8_export_with_card(runs, tmp_path, capsys):
    base, weights, out = runs
    folder = base / "lora-cli"
    assert main(["export", str(out["lora"]), "--peft", str(folder)]) == 0
    i8 = tmp_path / "cards" / "mimi-lora.safetensors"
    assert main(["export", str(out["mimi-lora"]), "--out", str(i8), "--dtype", "int8", "--card"]) == 0
    card = (i8.parent / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "mimi" and "int8" in card
    capsys.readouterr()
    assert main(["info", str(i8)]) == 0
    assert "int8" in capsys.readouterr().out
    img = base / "data" / "toy" / "images" / "test_0000.png"
    pred = tmp_path / "p.jsonl"
    argv = ["predict", "--task", f"l={folder}", "--task", f"q={i8}", "--images", str(img), "--out", str(pred)]
    assert main([*argv, "--weights", str(weights), "--device", "cpu", "--no-progress"]) == 0
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert {r["task"] for r in rows} == {"l", "q"} and all(r["names"][0] in ("red", "green", "blue") for r in rows)


@pytest.mark.parametrize("method", ["adapter", "mimi-lora"])
def test_eval_and_load_run_read_quantised_task_files(runs, method, tmp_path, capsys):
    """`mimi eval RUN --weights FILE` on `mimi export --dtype int8` (and an int4 file): the run's accuracy."""
    from mimi.core.taskfile import save_adapters
    from mimi.training.run import task_metadata

    _, _, out = runs
    i8, i4 = tmp_path / "i8.safetensors", tmp_path / "i4.safetensors"
    assert main(["export", str(out[method]), "--out", str(i8), "--dtype", "int8"]) == 0
    run = load_run(out[method])
    save_adapters(run.model, i4, dtype="int4", metadata=task_metadata(run))
    capsys.readouterr()
    accs = {}
    for label, weights in (("fp32", "adapters.safetensors"), ("int8", str(i8)), ("int4", str(i4))):
        assert main(["eval", str(out[method]), "--weights", weights, "--json"]) == 0
        accs[label] = json.loads(capsys.readouterr().out)["acc"]
    assert abs(accs["int8"] - accs["fp32"]) <= 0.05 and abs(accs["int4"] - accs["fp32"]) <= 0.1, accs
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = run.model.eval()(x)
        got = load_run(out[method], weights=str(i8)).model.eval()(x)
    assert (got - want).abs().max() < 0.02 * want.abs().max()
