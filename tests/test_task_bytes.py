"""Task files that size: the head quantised, int4 adapters, compact metadata, and where a file's bytes go."""

from __future__ import annotations

import json
import math
import struct

import pytest
import timm
import torch
from test_bank import bare, make_task

import mimi
from mimi.cli import main
from mimi.core.adapters import AdapterConfig, adapters, add_adapters
from mimi.core.compact_meta import FORMAT_COMPACT, fold_names, unfold_names
from mimi.core.modules import architecture_of
from mimi.core.quant import PACKED_CODES, split_scales
from mimi.core.shrink import apply_plan
from mimi.core.taskfile import byte_breakdown, load_tensors, read_metadata, tensor_bytes

KINDS = ["mimi", "lora", "mimi-lora", "adaptformer", "linear"]
DTYPES = {"fp32": None, "fp16": torch.float16, "int8": torch.int8, "int4": "int4"}


def _raw_header(path) -> tuple[int, dict]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def _step(s: torch.Tensor, axis: int) -> torch.Tensor:
    return s.float()[:, None] if axis == 0 else s.float()[None, :]


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_head_is_int8_with_one_scale_per_class(dtype, tmp_path):
    f32, q = tmp_path / "f32.safetensors", tmp_path / "q.safetensors"
    make_task("vit", "mimi", 5, f32, seed=4)
    make_task("vit", "mimi", 5, q, seed=4, dtype=DTYPES[dtype])
    exact, meta = load_tensors(f32), read_metadata(q)
    stored = load_tensors(q, dequantize=False)
    assert stored["head.weight"].dtype == torch.int8 and stored["head.bias"].dtype == torch.float16
    assert stored["head.weight"].abs().max() > 7  # int8 codes, even in an int4 file
    s, axis = split_scales(stored, meta)["head.weight"]
    assert axis == 0 and s.shape == (5,) and s.dtype == torch.float16  # a scale per class
    err = (load_tensors(q)["head.weight"] - exact["head.weight"]).abs()
    assert (err <= _step(s, 0) / 2 * (1 + 1e-6)).all()  # within half a step of the float32 head, every entry
    assert torch.equal(load_tensors(q)["head.bias"], exact["head.bias"].half().float())


def _trained_ish(path_of) -> torch.nn.Module:
    """The tiny ViT with uneven MiMi adapters, trained for a few steps on a learnable toy labelling."""
    model = bare("vit")
    model.reset_classifier(4)
    add_adapters(model, AdapterConfig(hidden_dim=6, init_seed=0))
    names = [n for n, _ in adapters(model)]
    apply_plan(model, {n: list(range(k)) for n, k in zip(names, [5, 1, 2, 6])})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 32, 32, generator=g)
    y = (x[:, 0, :16].mean((1, 2)) > 0).long() + 2 * (x[:, 1, :, :16].mean((1, 2)) > 0).long()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for label, dtype in DTYPES.items():
        mimi.save_adapters(model, path_of(label), dtype=dtype)
    return model


def test_quantised_logits_are_close_to_float32_ones(tmp_path):
    _trained_ish(lambda label: tmp_path / f"{label}.safetensors")
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = mimi.load_adapters(bare("vit"), tmp_path / "fp32.safetensors").eval()(x)
        got = {d: mimi.load_adapters(bare("vit"), tmp_path / f"{d}.safetensors").eval()(x) for d in ("int8", "int4")}
    scale = want.abs().max()
    assert (got["int8"] - want).abs().max() < 0.01 * scale
    assert (got["int4"] - want).abs().max() < 0.05 * scale
    assert (got["int8"].argmax(1) == want.argmax(1)).all()
    bank = mimi.AdapterBank(bare("vit"), device="cpu")
    for d in ("int8", "int4"):
        bank.add(d, tmp_path / f"{d}.safetensors")
        assert torch.allclose(bank.logits(x, d), got[d], atol=1e-5)
        assert bank.info()[d]["stored_dtype"] == d


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_byte_breakdown_adds_up_to_the_file_size(kind, dtype, tmp_path):
    f = tmp_path / "t.safetensors"
    make_task("vit", kind, 3, f, seed=1, dtype=DTYPES[dtype])
    parts = byte_breakdown(f)
    n, _ = _raw_header(f)
    assert parts["header"] == 8 + n and parts["other"] == 0
    assert parts["adapters"] + parts["head"] + parts["header"] == parts["total"] == f.stat().st_size
    assert sum(tensor_bytes(f).values()) == parts["adapters"] + parts["head"]
    classes, width = 3, 64
    head = {
        "fp32": 4 * (classes * width + classes),
        "fp16": 2 * (classes * width + classes),
        "int8": classes * width + 2 * classes + 2 * classes,  # codes, a float16 scale per class, float16 bias
        "int4": classes * width + 2 * classes + 2 * classes,  # the head is int8 in an int4 file too
    }[dtype]
    assert parts["head"] == head
    if kind == "linear":
        assert parts["adapters"] == 0


def test_int4_packs_two_codes_a_byte_and_round_trips_within_half_a_step(tmp_path):
    f32, i8, i4 = (tmp_path / f"{d}.safetensors" for d in ("f32", "i8", "i4"))
    for path, dtype in ((f32, None), (i8, torch.int8), (i4, "int4")):
        make_task("vit", "mimi", 4, path, seed=6, dtype=dtype)
    exact, meta = load_tensors(f32), read_metadata(i4)
    head = set(json.loads(meta["head"]))
    weights = {k: t for k, t in exact.items() if t.ndim == 2 and k not in head}
    halved = sum(t.numel() - math.ceil(t.numel() / 2) for t in weights.values())
    assert halved > 0 and byte_breakdown(i8)["adapters"] - byte_breakdown(i4)["adapters"] == halved
    assert byte_breakdown(i8)["head"] == byte_breakdown(i4)["head"]
    _, header = _raw_header(i4)
    codes = sum(math.ceil(t.numel() / 2) for t in weights.values()) + exact["head.weight"].numel()
    assert header[PACKED_CODES]["shape"] == [codes]
    assert meta["stored_dtype"] == "int4" and meta["int8"].startswith("v2 int4")
    stored, back = load_tensors(i4, dequantize=False), load_tensors(i4)
    scales = split_scales(stored, meta)
    for name, t in weights.items():
        assert stored[name].dtype == torch.int8 and stored[name].abs().max() <= 7
        s, axis = scales[name]
        assert ((back[name] - t).abs() <= _step(s, axis) / 2 * (1 + 1e-6)).all(), name
    for name in exact:
        if exact[name].ndim == 1:
            assert torch.equal(back[name], exact[name].half().float())


def _vit_s_task(path, sizes: dict[int, int], dtype, classes: int = 10) -> torch.nn.Module:
    """ViT-S/14 (width 384, 24 adapter sites) holding adapters of ``sizes`` (site index -> hidden), random values."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, num_classes=classes)
    add_adapters(model, AdapterConfig(hidden_dim=4, init_seed=0))
    names = [n for n, _ in adapters(model)]
    apply_plan(model, {n: list(range(sizes.get(i, 0))) for i, n in enumerate(names)})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    meta = {"method": "mimi", "model": "vit_small_patch14_dinov2", "weights_source": "imgfocus", "img_size": "56"}
    meta.update(data="vtab1k:digits", classes=json.dumps([str(i) for i in range(classes)]))
    mimi.save_adapters(model, path, dtype=dtype, metadata=meta)
    return model


def test_a_vit_s_task_of_8000_adapter_parameters_is_under_16000_bytes(tmp_path):
    """6 adapters alive, 7 neurons: 6 x 384 up-biases + 7 x 769 = 7,687 adapter parameters, 10 classes."""
    sizes = {1: 2, 5: 1, 8: 1, 13: 1, 17: 1, 20: 1}
    files = {d: tmp_path / f"{d}.safetensors" for d in DTYPES}
    for d, f in files.items():
        model = _vit_s_task(f, sizes, DTYPES[d])
    n_adapter = sum(a.num_params() for _, a in adapters(model))
    assert n_adapter == 6 * 384 + 7 * 769
    parts = {d: byte_breakdown(f) for d, f in files.items()}
    assert parts["int8"]["total"] < 16_000 and parts["int4"]["total"] < parts["int8"]["total"]
    assert parts["int8"]["head"] == 3840 + 20 + 20
    # codes + a scale per neuron per projection + float16 biases
    assert parts["int8"]["adapters"] == 2 * 7 * 384 + 2 * 2 * 7 + 2 * (6 * 384 + 7)
    assert parts["int8"]["header"] < 1200 < parts["fp16"]["header"] / 3
    raw = _raw_header(files["int8"])[1]["__metadata__"]
    assert raw["format"] == FORMAT_COMPACT and "ar" not in raw  # the architecture is the model name's
    assert json.loads(read_metadata(files["int8"])["classes"]) == [str(i) for i in range(10)]


def test_compact_metadata_keeps_every_entry_of_the_caller(tmp_path):
    f = tmp_path / "q.safetensors"
    model = bare("vit")
    model.reset_classifier(3)
    add_adapters(model, AdapterConfig(hidden_dim=2, init_seed=0))
    given = {
        "model": "vit_tiny_patch16_224.augreg_in21k",  # gives the architecture: not written again
        "classes": json.dumps(["a", "b", "c"]),
        "q": "mine",
        "ly": "mine too",
        "mo": "not the model",
        "=x": "escaped",
        "format": "ignored: the file's own",
        "custom": "kept",
    }
    mimi.save_adapters(model, f, dtype=torch.int8, metadata=given)
    meta = read_metadata(f)
    for key in ("model", "q", "ly", "mo", "=x", "custom"):
        assert meta[key] == given[key], key
    assert json.loads(meta["classes"]) == ["a", "b", "c"] and "architecture" not in meta
    assert architecture_of(meta["model"]) == model.pretrained_cfg["architecture"]  # what every reader falls back on
    assert meta["format"] == "mimi-adapters/1" and meta["stored_dtype"] == "int8"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert mimi.load_adapters(bare("vit"), f).eval()(x).shape == (2, 3)


def test_fold_names_round_trips_names_of_every_shape():
    names = {
        "blocks.0.ls1.adapter": 1,
        "blocks.0.ls2.adapter": 2,
        "blocks.1.ls1.adapter": 3,
        "blocks.10.ls1.adapter": 4,
        "blocks.2.attn.qkv": 5,
        "layer007.x": 6,  # a leading zero stays in the pattern
        "odd{name}.3": 7,  # braces escaped
        "head": 8,
    }
    assert unfold_names(fold_names(names)) == names
    assert list(unfold_names(fold_names({"b.10": 1, "b.2": 2, "b.1": 3}))) == ["b.1", "b.2", "b.10"]
    assert fold_names({"blocks.3.ls1.adapter": 2}) == {"blocks.{}.ls{}.adapter": [[3, 1, 2]]}


def test_info_prints_where_the_bytes_go(tmp_path, capsys):
    f = tmp_path / "q.safetensors"
    make_task("vit", "mimi", 4, f, seed=2, dtype="int4")
    capsys.readouterr()
    assert main(["info", str(f)]) == 0
    out = capsys.readouterr().out
    p = byte_breakdown(f)
    line = (
        f"bytes: adapters {p['adapters']:,} + head {p['head']:,} + header {p['header']:,} (JSON + 8-byte length) "
        f"= {f.stat().st_size:,}"
    )
    assert line in out.splitlines() and ", int4" in out.splitlines()[0]
    per = tensor_bytes(f)
    sizes = json.loads(read_metadata(f)["sizes"])
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and line[0] == "b"}
    for name in sizes:
        assert int(rows[name][-1].replace(",", "")) == sum(b for k, b in per.items() if k.startswith(name + "."))


def test_a_compact_file_of_an_unknown_scheme_is_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    f, newer = tmp_path / "q.safetensors", tmp_path / "newer.safetensors"
    make_task("vit", "mimi", 3, f, seed=1, dtype=torch.int8)
    raw = _raw_header(f)[1]["__metadata__"]
    save_file(load_file(str(f)), str(newer), metadata={**raw, "q": "2"})
    with pytest.raises(mimi.CheckpointError, match="unknown; a newer mimi") as e:
        mimi.load_adapters(bare("vit"), newer)
    assert "\n" not in str(e.value)
