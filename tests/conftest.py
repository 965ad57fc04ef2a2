"""Tiny timm models and helpers shared by the tests (CPU, a few ms per forward)."""

from __future__ import annotations

import pytest
import timm
import torch


def tiny_vit(num_classes: int = 5, **kw) -> torch.nn.Module:
    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=num_classes)
    cfg.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg)


def tiny_dinov2(num_classes: int = 5) -> torch.nn.Module:
    """ViT with LayerScale (init_values) and registers-free DINOv2 layout, as timm builds it."""
    return timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        img_size=28,
        patch_size=14,
        embed_dim=48,
        depth=2,
        num_heads=2,
        num_classes=num_classes,
        init_values=0.5,
    )


def tiny_swin(num_classes: int = 5) -> torch.nn.Module:
    """Two stages of different widths (32 then 64), so fan normalisation matters."""
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=32,
        window_size=4,
        embed_dim=32,
        depths=(1, 1),
        num_heads=(1, 2),
        num_classes=num_classes,
        drop_path_rate=0.0,
    )


MODELS = {"vit": tiny_vit, "dinov2": tiny_dinov2, "swin": tiny_swin}


@pytest.fixture(params=sorted(MODELS))
def any_model(request):
    torch.manual_seed(0)
    return MODELS[request.param]().eval()


def image_size(model: torch.nn.Module) -> int:
    return model.patch_embed.img_size[0]


def randomize_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Give up-projections non-zero weights so adapters change the output (they start at zero)."""
    import mimi

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in mimi.adapters(model):
            a.up.weight.copy_(torch.randn(a.up.weight.shape, generator=g) * 0.1)
            a.down.bias.copy_(torch.randn(a.down.bias.shape, generator=g) * 0.1)
            a.up.bias.copy_(torch.randn(a.up.bias.shape, generator=g) * 0.1)
