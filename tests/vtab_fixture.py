"""Writes a tiny VTAB-1k-layout task whose class is learnable from colour: the data of the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (200, 200, 40)]


def write_vtab_task(
    root: Path, task: str = "toy", *, n_classes: int = 3, sizes=None, seed: int = 0, px: int = 24
) -> Path:
    """``<root>/<task>/{train800,val200,train800val200,test}.txt`` with small noisy colour images."""
    sizes = sizes or {"train800": 48, "val200": 24, "test": 30}
    rng = np.random.default_rng(seed)
    folder = Path(root) / task
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {}
    for split, n in sizes.items():
        lines[split] = []
        for i in range(n):
            label = i % n_classes
            img = rng.integers(0, 60, size=(px, px, 3)).astype(np.int32) + np.array(COLOURS[label]) // 2
            rel = f"images/{split}_{i:04d}.png"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / rel)
            lines[split].append(f"{rel} {label}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, ls in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(ls) + "\n")
    return Path(root)
