"""The int8 backbone: only the frozen backbone's linear layers change, the bank agrees with its float32 self on
trained tasks, tasks come and go as on a float32 bank, and every entry point refuses a bad dtype in one line."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest
import timm
import torch
from conftest import tiny_vit
from safetensors.torch import save_file
from test_bank import bare, make_task
from test_serve import _png, _post
from vtab_fixture import write_vtab_task

import mimi
from mimi.cli import main
from mimi.core.adapters import Adapter, AdapterConfig, add_adapters
from mimi.core.errors import ConfigError
from mimi.core.int8_backbone import (
    ENGINES,
    FullRangeDynamicLinear,
    backbone_linears,
    check_backbone_dtype,
    quantize_backbone,
    vnni,
)
from mimi.core.lora import LoRALinear, add_lora
from mimi.trainer import load_run

pytest.importorskip("torchao", reason="the [int8] extra (torchao) is not installed")

COMMON = "--model test_vit --img-size 32 --data vtab1k:toy --batch-size 16 --device cpu --seed 0 --no-progress"
RUNS = {
    "mimi": "--method mimi --adapter-dim 16 --budget-params 500 --rho 0.5 --epochs 1 --first-epochs 3 --lr 3e-3",
    "lora": "--method lora --adapter-dim 2 --first-epochs 3 --epochs 3 --lr 3e-3",
}


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _quantized(layer: torch.nn.Module) -> bool:
    """An int8 layer: another module class (quantize_dynamic) or an nn.Linear holding an int8 weight (torchao)."""
    return type(layer) is not torch.nn.Linear or not _plain(layer.weight)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two trained toy tasks (MiMi and LoRA) on one backbone file, exported as float16 task files."""
    base = tmp_path_factory.mktemp("int8")
    root = write_vtab_task(base / "data", n_classes=4, sizes={"train800": 64, "val200": 24, "test": 64})
    torch.manual_seed(0)
    weights = base / "backbone.safetensors"
    save_file(timm.create_model("test_vit", img_size=32, num_classes=0).state_dict(), str(weights))
    files, runs = {}, {}
    for name, extra in RUNS.items():
        runs[name] = base / name
        argv = ["train", *COMMON.split(), *extra.split(), "--weights", str(weights), "--data-root", str(root)]
        assert main([*argv, "--out", str(runs[name])]) == 0
        files[name] = base / f"{name}.safetensors"
        assert main(["export", str(runs[name]), "--out", str(files[name])]) == 0
    test = load_run(runs["mimi"]).task.test
    x = torch.stack([test[i][0] for i in range(len(test))])
    return base, files, runs, x


@pytest.mark.parametrize("engine", ENGINES)
def test_only_the_backbone_linears_are_quantised(engine):
    model = tiny_vit(num_classes=3)
    add_adapters(model, AdapterConfig(hidden_dim=4))
    add_lora(model, rank=2, targets=("attn.qkv",))
    model.requires_grad_(False)  # as a loaded run: nothing trains, adapters must still be told apart
    names = [n for n, _ in backbone_linears(model)]
    assert len(names) == 2 * 4 and any(n.endswith("attn.qkv.base") for n in names)
    assert not any("adapter" in n or "lora_" in n or n.startswith("head") for n in names)
    report = quantize_backbone(model, "int8", engine=engine)
    assert report.layers == 8 and report.engine == engine and report.int8_bytes < report.float_bytes / 3
    for module in model.modules():
        if isinstance(module, Adapter):
            assert not _quantized(module.down) and not _quantized(module.up)
        if isinstance(module, LoRALinear):
            assert not _quantized(module.lora_a) and not _quantized(module.lora_b) and _quantized(module.base)
    assert not _quantized(model.head) and _plain(model.patch_embed.proj.weight)
    assert _quantized(model.blocks[0].mlp.fc1) and _quantized(model.blocks[1].attn.proj)
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("engine", ENGINES)
def test_float32_is_a_no_op_and_int8_stays_close(engine):
    torch.manual_seed(0)
    model, ref = tiny_vit(), tiny_vit()
    ref.load_state_dict(model.state_dict())
    assert quantize_backbone(model, "float32").layers == 0
    assert all(_plain(p) for p in model.parameters())
    quantize_backbone(model, "int8", engine=engine)
    # torchao swaps the weight only; quantize_dynamic swaps the module class (a bank records shapes, not modules)
    assert isinstance(model.blocks[0].attn.qkv, torch.nn.Linear) == (engine == "torchao")
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(model(x), ref(x))
    assert cos.min() > 0.95


@pytest.mark.parametrize("has_vnni", [True, False])
def test_activations_use_eight_bits_only_where_the_cpu_accumulates_in_int32(monkeypatch, has_vnni):
    monkeypatch.setattr("mimi.core.int8_backbone.vnni", lambda: has_vnni)
    torch.manual_seed(0)
    model = tiny_vit()
    report = quantize_backbone(model, "int8")
    assert report.activation_bits == (8 if has_vnni else 7) and f"{report.activation_bits}-bit" in report.describe()
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, torch.ao.nn.quantized.dynamic.Linear)
    assert (type(qkv) is FullRangeDynamicLinear) == has_vnni


@pytest.mark.skipif(not vnni(), reason="this CPU has no VNNI: 8-bit activations could saturate its int16 sums")
def test_eight_bit_activations_halve_the_rounding_error_of_seven():
    torch.manual_seed(0)
    layer = torch.nn.Linear(384, 384)
    x = torch.randn(64, 384) * torch.where(torch.rand(384) < 0.02, 20.0, 1.0)  # a few outlier channels, as DINOv2's
    errors = {}
    for has_vnni in (True, False):
        model = torch.nn.Sequential(layer).requires_grad_(False)
        quantized = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {"0": torch.ao.quantization.per_channel_dynamic_qconfig}
        )
        if has_vnni:
            quantized[0].__class__ = FullRangeDynamicLinear
        with torch.inference_mode():
            errors[has_vnni] = float((quantized(x) - layer(x)).pow(2).mean())
    assert errors[True] < 0.35 * errors[False]  # half the step: a quarter of the squared error


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda: check_backbone_dtype("int4"), "unknown backbone dtype 'int4'; choose one of float32, int8"),
        (lambda: check_backbone_dtype("int8", "cuda:0"), "runs on the CPU"),
        (lambda: check_backbone_dtype("int8", engine="tensorrt"), "unknown int8 engine 'tensorrt'"),
        (lambda: mimi.AdapterBank(bare("vit"), device="cpu", backbone_dtype="fp8"), "unknown backbone dtype 'fp8'"),
        (lambda: mimi.AdapterBank(bare("vit"), device="meta", backbone_dtype="int8"), "use --device cpu"),
    ],
)
def test_bad_dtype_or_device_refused_in_one_line(call, says):
    with pytest.raises(ConfigError) as e:
        call()
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_torch_without_int8_kernels_is_refused_before_anything_loads(monkeypatch):
    monkeypatch.setattr("mimi.core.int8_backbone.int8_kernels", lambda: [])
    with pytest.raises(ConfigError, match="no int8 CPU kernels") as e:
        mimi.AdapterBank(bare("vit"), device="cpu", backbone_dtype="int8")
    assert "\n" not in str(e.value)
    assert mimi.AdapterBank(bare("vit"), device="cpu").backbone_dtype == "float32"  # float32 needs none


def _top1(bank, x, tasks):
    out = bank.logits(x, tasks)
    return torch.stack([row.argmax() for row in out]) if isinstance(out, list) else out.argmax(-1)


@pytest.mark.parametrize("engine", ENGINES)
def test_int8_bank_agrees_with_float32_on_trained_tasks(trained, engine):
    _, files, _, x = trained
    banks = {
        d: mimi.AdapterBank.from_task_files(files, device="cpu", backbone_dtype=d, int8_engine=engine)
        for d in ("float32", "int8")
    }
    assert banks["int8"].quantized.layers == 6 * 4 and "int8" in repr(banks["int8"])
    for task in files:
        want, got = _top1(banks["float32"], x, task), _top1(banks["int8"], x, task)
        assert (want == got).float().mean() >= 0.95, task
        f32, i8 = banks["float32"].logits(x, task), banks["int8"].logits(x, task)
        assert not torch.equal(f32, i8)  # the int8 backbone did run
        assert torch.allclose(f32, i8, atol=0.5 * f32.abs().max().item())
    mixed = [list(files)[i % 2] for i in range(len(x))]  # one backbone pass for both tasks, int8 too
    assert (_top1(banks["float32"], x, mixed) == _top1(banks["int8"], x, mixed)).float().mean() >= 0.95
    for task in files:  # the mixed batch gives each row what its task alone gives
        rows = [i for i, t in enumerate(mixed) if t == task]
        alone = banks["int8"].logits(x[rows], task)
        together = torch.stack([banks["int8"].logits(x, mixed)[i] for i in rows])
        if engine == "torchao":  # one activation scale per row: a row's answer is its own
            assert torch.allclose(alone, together, atol=1e-4)
        else:  # one scale per call: the batch moves it a little, not the answers
            assert (alone.argmax(-1) == together.argmax(-1)).float().mean() >= 0.95


def test_add_replace_remove_on_an_int8_bank(trained, tmp_path):
    _, files, _, x = trained
    bank = mimi.AdapterBank.from_task_files({"a": files["mimi"]}, device="cpu", backbone_dtype="int8")
    fresh = mimi.AdapterBank.from_task_files({"b": files["lora"]}, device="cpu", backbone_dtype="int8")
    before = bank.logits(x, "a")
    bank.add("b", files["lora"])  # added later: a float32 LoRA side path beside an int8 layer, never merged
    assert torch.allclose(bank.logits(x, "b"), fresh.logits(x, "b"), atol=1e-5)
    assert torch.allclose(bank.logits(x, "a"), before, atol=1e-5)
    bank.add("a", files["lora"], replace=True)
    assert torch.allclose(bank.logits(x, "a"), fresh.logits(x, "b"), atol=1e-5)
    bank.remove("b")
    bank.remove("a")
    assert bank.tasks == [] and not any(type(m).__name__ == "BankSite" for m in bank.model.modules())
    assert _quantized(bank.model.blocks[0].attn.qkv)  # still the int8 backbone
    make_task("vit", "mimi", 3, tmp_path / "other.safetensors")  # a file of another backbone: refused, unchanged
    with pytest.raises(mimi.CheckpointError):
        bank.add("c", tmp_path / "other.safetensors")
    assert bank.tasks == []


def test_eval_and_predict_take_the_backbone_dtype(trained, tmp_path, capsys):
    base, files, runs, _ = trained
    assert main(["eval", str(runs["mimi"]), "--json", str(tmp_path / "f.json")]) == 0
    assert main(["eval", str(runs["mimi"]), "--backbone-dtype", "int8", "--json", str(tmp_path / "q.json")]) == 0
    out = capsys.readouterr().out
    assert "int8 backbone" in out
    f32, q = (json.loads((tmp_path / n).read_text()) for n in ("f.json", "q.json"))
    assert q["backbone_dtype"] == "int8" and f32["backbone_dtype"] == "float32"
    assert abs(q["acc"] - f32["acc"]) <= 0.05
    images = base / "data" / "toy" / "images"
    argv = ["predict", "--task", f"m={files['mimi']}", "--images", str(images), "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "p.jsonl"), "--backbone-dtype", "int8", "--device", "cpu"]) == 0
    assert "int8 backbone (quantize_dynamic)" in capsys.readouterr().out
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == len(list(images.iterdir()))
    with pytest.raises(SystemExit) as e:  # argparse's own one-line refusal, before anything loads
        main([*argv, "--out", str(tmp_path / "x.jsonl"), "--backbone-dtype", "int2"])
    assert e.value.code == 2 and "invalid choice: 'int2'" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_serve_runs_an_int8_backbone_and_says_so(trained):
    _, files, _, _ = trained
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "mimi", "serve", "--task", f"m={files['mimi']}", "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(
        [*argv, "--backbone-dtype", "int8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[1].startswith("int8 backbone (quantize_dynamic)"), lines
        assert "(int8 backbone, 1 torch threads) at http://127.0.0.1:" in lines[2], lines
        url = lines[2].split(" at ")[1].split()[0]
        status, got = _post(f"{url}/predict?task=m", _png(1))
        assert status == 200 and len(got["ids"]) == 1
        with urllib.request.urlopen(f"{url}/health", timeout=60) as r:
            assert json.loads(r.read())["backbone_dtype"] == "int8"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped: 1 requests" in out
