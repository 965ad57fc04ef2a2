"""ONNX export of one task's model (backbone + adapters + head), checked against onnxruntime."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mimi.core.adapters import merge_linear_adapters
from mimi.core.errors import ConfigError, ModelError
from mimi.core.files import atomic_write
from mimi.core.lora import merge_lora

#: onnxruntime's logits must equal PyTorch's to this (fp32).
TOLERANCE = 1e-4


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    img_size: int,
    opset: int = 17,
    check: bool = True,
    check_batch: int = 3,
) -> dict[str, float | int | str]:
    """Write ``model`` as ONNX with a dynamic batch axis (input ``images``, output ``logits``).

    LoRA updates (ours and ``mimi-lora``'s) are merged into their frozen weights first (no extra ops); the caller's
    model is not changed.
    With ``check``, onnxruntime runs a batch of a size other than the traced one and its logits are compared with
    PyTorch's.

    Returns:
        ``{"path", "bytes", "opset", "max_abs_diff"}`` (the difference is NaN without ``check``).

    Raises:
        ConfigError: bad opset or image size. ModelError: onnxruntime disagrees with PyTorch beyond 1e-4.
    """
    if not isinstance(opset, int) or not 11 <= opset <= 21:
        raise ConfigError(f"--opset must be an integer between 11 and 21, got {opset!r}")
    if img_size < 1:
        raise ConfigError(f"img_size must be positive, got {img_size}")
    model = merge_linear_adapters(merge_lora(copy.deepcopy(model).float().cpu().eval()))
    example = torch.randn(2, 3, img_size, img_size)

    def write(tmp: Path) -> None:
        with (
            warnings.catch_warnings()
        ):  # the TorchScript exporter is chatty about tracing; the check below is what counts
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            )

    path = atomic_write(path, write)
    diff = float("nan")
    if check:
        diff = onnx_max_diff(model, path, img_size=img_size, batch=check_batch)
        if not diff <= TOLERANCE:
            path.unlink(missing_ok=True)
            raise ModelError(f"onnxruntime's logits differ from PyTorch's by {diff:.2e} (> {TOLERANCE}); not exported")
    return {"path": str(path), "bytes": path.stat().st_size, "opset": opset, "max_abs_diff": diff}


def onnx_max_diff(model: nn.Module, path: str | Path, *, img_size: int, batch: int = 3, seed: int = 0) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's logits on a random batch."""
    import onnxruntime as ort

    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    with torch.inference_mode():
        want = model.float().cpu().eval()(x).numpy()
    return float(np.abs(got - want).max())
