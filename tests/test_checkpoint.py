import pytest
import torch
from conftest import MODELS, image_size, randomize_adapters
from safetensors import safe_open

import mimi


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_save_load_identical_logits_and_no_backbone_tensor(tmp_path, kind):
    torch.manual_seed(0)
    model = MODELS[kind](num_classes=7).eval()
    backbone_state = {k: v.clone() for k, v in model.state_dict().items()}
    mimi.add_adapters(model, mimi.AdapterConfig(hidden_dim=8))
    randomize_adapters(model)
    with torch.no_grad():
        model.get_classifier().weight.normal_()
    mimi.prune(model, budget=mimi.adapter_param_count(model) // 3)
    path = mimi.save_adapters(model, tmp_path / "task.safetensors")
    s = image_size(model)
    x = torch.randn(2, 3, s, s)
    expected = model(x)

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert keys == trainable
    assert all(".adapter." in k or k.startswith("head") for k in keys)

    bare = MODELS[kind](num_classes=1000).eval()  # a different head size: load resizes it
    bare.load_state_dict({k: v for k, v in backbone_state.items() if not k.startswith("head")}, strict=False)
    bare.reset_classifier(1000)
    mimi.load_adapters(bare, path)
    assert torch.equal(bare(x), expected)
    assert {n: a.hidden_dim for n, a in mimi.adapters(bare)} == {n: a.hidden_dim for n, a in mimi.adapters(model)}
    assert mimi.count_trainable(bare) == mimi.count_trainable(model)


def test_checkpoint_is_tiny(tmp_path):
    model = MODELS["vit"]()
    mimi.add_adapters(model, mimi.AdapterConfig(hidden_dim=2))
    path = mimi.save_adapters(model, tmp_path / "a.safetensors")
    backbone_bytes = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    assert path.stat().st_size < backbone_bytes / 20


def test_load_rejects_other_architecture_and_bad_files(tmp_path):
    model = MODELS["vit"]()
    mimi.add_adapters(model, mimi.AdapterConfig(hidden_dim=4))
    path = mimi.save_adapters(model, tmp_path / "a.safetensors")
    with pytest.raises(mimi.CheckpointError):
        mimi.load_adapters(MODELS["swin"](), path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(mimi.CheckpointError, match="not a readable safetensors"):
        mimi.load_adapters(MODELS["vit"](), tmp_path / "junk.safetensors")
    with pytest.raises(mimi.CheckpointError, match="no such checkpoint"):
        mimi.load_adapters(MODELS["vit"](), tmp_path / "missing.safetensors")
    with pytest.raises(mimi.CheckpointError, match="already holds adapters"):
        mimi.load_adapters(model, path)


def test_half_precision_storage_halves_the_file_and_reloads_close(tmp_path):
    torch.manual_seed(0)
    model = MODELS["vit"]().eval()
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head")}
    mimi.add_adapters(model, mimi.AdapterConfig(hidden_dim=8))
    randomize_adapters(model)
    full = mimi.save_adapters(model, tmp_path / "fp32.safetensors")
    half = mimi.save_adapters(model, tmp_path / "fp16.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    assert mimi.read_metadata(half)["stored_dtype"] == "float16"
    bare = MODELS["vit"]().eval()
    bare.load_state_dict(backbone, strict=False)
    mimi.load_adapters(bare, half)
    assert all(p.dtype == torch.float32 for p in bare.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(bare(x), model(x), atol=1e-2)
