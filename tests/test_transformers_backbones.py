"""``transformers`` backbones beside timm: tiny randomly initialised models of each family, written with
``save_pretrained`` into a temporary folder (nothing is downloaded), loaded as ``transformers:PATH``; adapters and
LoRA find their blocks, training, task files and the bank work on them, and a family mimi does not know is refused
in one line."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

from vtab_fixture import write_vtab_task  # noqa: E402

import mimi  # noqa: E402
from mimi.backbones import create_backbone, model_img_size, preprocessing  # noqa: E402
from mimi.cli import main  # noqa: E402
from mimi.core.adapters import AdapterConfig, adapters, add_adapters, find_blocks, remove_adapter  # noqa: E402
from mimi.core.errors import BackboneError, CheckpointError, ConfigError  # noqa: E402
from mimi.core.lora import add_lora, lora_targets  # noqa: E402
from mimi.trainer import load_run  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
CONFIGS = {
    "vit": lambda: transformers.ViTConfig(**SMALL, intermediate_size=64),
    "deit": lambda: transformers.DeiTConfig(**SMALL, intermediate_size=64),
    "dinov2": lambda: transformers.Dinov2Config(**SMALL, mlp_ratio=2),
    "swin": lambda: transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4
    ),
    "clip": lambda: transformers.CLIPVisionConfig(**SMALL, intermediate_size=64),
}
CLASSES = {
    "vit": "ViTModel",
    "deit": "DeiTModel",
    "dinov2": "Dinov2Model",
    "swin": "SwinModel",
    "clip": "CLIPVisionModel",
}
BLOCKS = {"vit": 2, "deit": 2, "dinov2": 2, "swin": 2, "clip": 2}
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _save(folder, family: str):
    torch.manual_seed(0)
    model = getattr(transformers, CLASSES[family])(CONFIGS[family]())
    model.save_pretrained(folder)
    transformers.BitImageProcessor(image_mean=list(MEAN), image_std=list(STD)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    return {f: _save(base / f, f) for f in CONFIGS}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_a_saved_folder_loads_with_its_size_mean_and_std_and_blocks(folders, family):
    model, source = create_backbone(f"transformers:{folders[family]}", num_classes=0)
    assert source == str(folders[family])
    assert model_img_size(model) == 32 and preprocessing(model) == (MEAN, STD)
    assert len(find_blocks(model)) == BLOCKS[family]
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        feats = model(x)
    assert feats.shape == (3, model.num_features)
    # the same weights as the folder: transformers' own model gives the same pooled feature
    ref = getattr(transformers, CLASSES[family]).from_pretrained(folders[family]).eval()
    with torch.inference_mode():
        out = ref(pixel_values=x)
    want = out.last_hidden_state[:, 0] if family in ("vit", "deit") else out.pooler_output
    torch.testing.assert_close(feats, want)
    model.reset_classifier(4)
    assert model(x).shape == (3, 4) and model.get_classifier().out_features == 4


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_adapters_sit_on_each_branch_start_as_the_identity_and_come_out_again(folders, family, placement):
    model, _ = create_backbone(f"transformers:{folders[family]}", num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        before = model(x)
    add_adapters(model, AdapterConfig(hidden_dim=4, placement=placement))
    names = [n for n, _ in adapters(model)]
    assert len(names) == 2 * BLOCKS[family]
    if family == "dinov2" and placement == "sequential":  # after the LayerScale, as timm's ls1 / ls2
        assert any(n.endswith("layer_scale1.adapter") for n in names)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), before)  # zero up-projections: the backbone's function
        for _, a in adapters(model):
            a.up.weight.normal_()
        changed = model(x)
    assert not torch.allclose(changed, before)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "adapter" not in n and "head" not in n)
    for name in names:
        remove_adapter(model, name)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), before)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_lora_targets_the_split_query_key_value_output_and_mlp_layers(folders, family):
    model, _ = create_backbone(f"transformers:{folders[family]}", num_classes=3)
    names = [n for n, _ in lora_targets(model)]
    assert len(names) == 6 * BLOCKS[family]  # q, k, v, output, fc1, fc2
    out = "out_proj" if family == "clip" else "o_proj"
    assert any(n.endswith(f".{out}") for n in names) and any(n.endswith(".q_proj") for n in names)
    add_lora(model, rank=2)
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_a_family_mimi_does_not_know_is_refused_in_one_line(tmp_path):
    transformers.BertModel(
        transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path)
    with pytest.raises(BackboneError) as e:
        create_backbone(f"transformers:{tmp_path}")
    msg = str(e.value)
    assert "'bert' is not supported" in msg and "DINOv2 (dinov2)" in msg and "Swin (swin)" in msg and "\n" not in msg


def test_a_bad_image_size_or_name_is_refused_in_one_line(folders, tmp_path):
    with pytest.raises(ConfigError, match="not a multiple of the patch size 8") as e:
        create_backbone(f"transformers:{folders['vit']}", img_size=30)
    assert "\n" not in str(e.value)
    with pytest.raises(BackboneError, match="no model config") as e:
        create_backbone(f"transformers:{tmp_path}")
    assert "\n" not in str(e.value)


COMMON = "--img-size 32 --data vtab1k:toy --batch-size 16 --device cpu --seed 0 --no-progress --weights auto"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_vtab_task(
        tmp_path_factory.mktemp("data"), n_classes=3, sizes={"train800": 32, "val200": 12, "test": 24}
    )


@pytest.mark.parametrize("family", ["dinov2", "clip"])
def test_a_mimi_run_prunes_resumes_exports_and_serves_from_a_bank(folders, data, tmp_path, family):
    out, task = tmp_path / "run", tmp_path / "task.safetensors"
    argv = [
        "train", "--model", f"transformers:{folders[family]}", *COMMON.split(), "--data-root", str(data),
        "--method", "mimi", "--adapter-dim", "8", "--budget-params", "300", "--rho", "0.5", "--epochs", "1",
        "--first-epochs", "2", "--lr", "3e-3", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    run = load_run(out, device="cpu")
    sizes = {n: a.hidden_dim for n, a in adapters(run.model)}
    assert sum(a.num_params() for _, a in adapters(run.model)) <= 300 and max(sizes.values()) < 8  # physically cut
    assert main(["export", str(out), "--out", str(task), "--dtype", "float32"]) == 0
    assert main(["export", str(out), "--onnx", str(tmp_path / "task.onnx")]) == 0  # checked against onnxruntime
    bank = mimi.AdapterBank.from_task_files({"t": task, "u": task}, device="cpu")
    x = torch.stack([run.task.test[i][0] for i in range(6)])
    with torch.inference_mode():
        want = run.model.eval()(x)
        torch.testing.assert_close(bank.logits(x, "t"), want, atol=1e-5, rtol=1e-5)
        mixed = bank.logits(x, ["t", "u"] * 3)  # one backbone pass, two tasks
    torch.testing.assert_close(torch.stack(list(mixed)), want, atol=1e-5, rtol=1e-5)
    int8 = mimi.AdapterBank.from_task_files({"t": task}, device="cpu", backbone_dtype="int8")
    assert int8.quantized.layers == 6 * BLOCKS[family]  # q, k, v, output, fc1, fc2 of every block
    with torch.inference_mode():
        assert int8.logits(x, "t").shape == want.shape
    other = "vit" if family != "vit" else "deit"
    with pytest.raises(CheckpointError) as e:  # a bank of another backbone names both
        mimi.AdapterBank(f"transformers:{folders[other]}", device="cpu").add("t", task)
    assert f"transformers:{folders[family]}" in str(e.value) and f"transformers:{folders[other]}" in str(e.value)


@pytest.mark.parametrize(
    "method",
    [
        "adapter",
        "adaptformer",
        "bitfit",
        "linear",
        "lora",
        "mimi-lora",
        "mimi-oneshot",
        "peft-lora",
        "peft-adalora",
        "peft-vera",
        "fact-tt",
        "ssf",
        "full",
    ],
)
def test_every_method_trains_on_a_transformers_backbone(folders, data, tmp_path, method):
    extra = {
        "adapter": "--adapter-dim 4",
        "adaptformer": "--adapter-dim 4",
        "lora": "--adapter-dim 2",
        "mimi-lora": "--budget-params 400",
        "fact-tt": "--budget-params 2000",
        "mimi-oneshot": "--adapter-dim 8 --budget-params 300",
        "peft-vera": """--method-kwargs {"rank":4}""",
    }.get(method, "")
    argv = [
        "train", "--model", f"transformers:{folders['vit']}", *COMMON.split(), "--data-root", str(data),
        "--method", method, *extra.split(), "--epochs", "1", "--first-epochs", "1", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    assert main(argv) == 0
    run = load_run(tmp_path / "run", device="cpu")
    assert run.model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_vpt_refuses_a_transformers_backbone_in_one_line(folders, data, tmp_path, capsys):
    argv = [
        "train", "--model", f"transformers:{folders['vit']}", *COMMON.split(), "--data-root", str(data),
        "--method", "vpt-deep", "--epochs", "1", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vpt-deep needs a timm VisionTransformer" in err[0]


def test_timm_dinov2_weights_renamed_for_transformers_give_the_same_features():
    from conftest import tiny_dinov2

    from mimi.backbones.hf import FAMILIES, TransformersBackbone
    from mimi.importers.imgfocus import to_transformers

    torch.manual_seed(0)
    timm_model = tiny_dinov2(num_classes=0).eval()
    with torch.no_grad():  # LayerScale and biases away from their initial values: every tensor must land right
        for p in timm_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = transformers.Dinov2Config(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=28, layer_norm_eps=1e-6
    )
    hf = transformers.Dinov2Model(config)
    state = to_transformers(timm_model.state_dict())
    state["embeddings.mask_token"] = torch.zeros_like(hf.state_dict()["embeddings.mask_token"])
    hf.load_state_dict(state)  # strict: every key mapped, none left over
    model = TransformersBackbone(hf.eval(), FAMILIES["dinov2"], name="t", img_size=28, mean=MEAN, std=STD)
    x = torch.randn(4, 3, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), timm_model(x), atol=1e-5, rtol=1e-5)


def test_a_killed_run_resumes_to_the_unbroken_result(folders, data, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    def argv(out):
        return [
            "train", "--model", f"transformers:{folders['swin']}", *COMMON.split(), "--data-root", str(data),
            "--method", "mimi", "--adapter-dim", "8", "--budget-params", "300", "--rho", "0.5", "--epochs", "1",
            "--first-epochs", "2", "--lr", "3e-3", "--out", str(out),
        ]  # fmt: skip

    assert main(argv(tmp_path / "unbroken")) == 0
    here = Path(__file__).parent
    cmd = [sys.executable, str(here / "kill_at.py"), "after-prune", "1", "--", *argv(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # really killed right after the first cut
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    want, got = (load_file(str(tmp_path / r / "adapters.safetensors")) for r in ("unbroken", "run"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_a_peft_folder_opens_on_the_transformers_model_itself(folders, data, tmp_path, family):
    peft = pytest.importorskip("peft", reason="the [peft] extra is not installed")
    from safetensors.torch import load_file

    out, folder = tmp_path / "run", tmp_path / "peft"
    argv = [
        "train", "--model", f"transformers:{folders[family]}", *COMMON.split(), "--data-root", str(data),
        "--method", "lora", "--adapter-dim", "2", "--epochs", "2", "--first-epochs", "2", "--lr", "1e-2",
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    assert main(["export", str(out), "--peft", str(folder)]) == 0
    run = load_run(out, device="cpu")
    x = torch.stack([run.task.test[i][0] for i in range(6)])
    with torch.inference_mode():
        want = run.model.eval()(x)
    kwargs = {"add_pooling_layer": False} if family == "vit" else {}
    base = getattr(transformers, CLASSES[family]).from_pretrained(folders[family], **kwargs)
    model = peft.PeftModel.from_pretrained(base, folder).eval()  # the transformers model, not mimi's wrapper
    tuned = [n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(tuned) == 6 * BLOCKS[family] and not any(n.startswith("base_model.model.model.") for n in tuned)
    head = {
        k.rsplit(".", 1)[1]: t for k, t in load_file(str(folder / "adapter_model.safetensors")).items() if ".head." in k
    }
    with torch.inference_mode():
        out_ = model(pixel_values=x)
        feats = out_.last_hidden_state[:, 0] if family == "vit" else out_.pooler_output
        logits = feats @ head["weight"].T + head["bias"]
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    bank = mimi.AdapterBank.from_task_files({"t": folder}, device="cpu")  # and mimi serves the folder back
    with torch.inference_mode():
        torch.testing.assert_close(bank.logits(x, "t"), want, atol=1e-5, rtol=1e-5)


def test_distillation_and_predict_on_a_transformers_backbone(folders, data, tmp_path):
    out = tmp_path / "run"
    argv = [
        "train", "--model", f"transformers:{folders['dinov2']}", *COMMON.split(), "--data-root", str(data),
        "--method", "mimi", "--adapter-dim", "8", "--budget-params", "300", "--rho", "0.5", "--epochs", "1",
        "--first-epochs", "2", "--distill", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    task = tmp_path / "task.safetensors"
    assert main(["export", str(out), "--out", str(task), "--dtype", "int8"]) == 0
    preds = tmp_path / "preds.jsonl"
    images = data / "toy" / "images"
    argv = ["predict", "--task", f"t={task}", "--images", str(images), "--out", str(preds), "--device", "cpu"]
    assert main([*argv, "--no-progress"]) == 0
    assert len(preds.read_text().splitlines()) == len(list(images.iterdir()))
