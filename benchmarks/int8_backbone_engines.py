"""Ways of running the frozen backbone in int8 on the CPU, against float32, side by side in one run.

Contenders (each images -> pooled features): ``float32`` (torch eager); ``torchao`` and ``quantize_dynamic``
(``mimi.core.int8_backbone.quantize_backbone``, the two engines the project offers); ``quantize_dynamic-per-tensor``
(``torch.ao.quantization.quantize_dynamic`` with its default per-tensor qconfig); ``onnxruntime-float32`` and
``onnxruntime-int8`` (the backbone exported to ONNX, then ORT's dynamic quantisation, per-channel int8 weights);
``openvino-float32`` / ``openvino-int8`` (the same two ONNX files) where OpenVINO is installed. A contender that fails
to build records its one-line error.

Timing: interleaved rounds; in each, for each batch size, every contender (in an order rotated per round) processes
64 images (64 passes of batch 1, 8 of batch 8, ...) after one untimed warm-up pass per batch size at the start.
Reported: median images/s over rounds, and the median and min of the ratio to float32 of the same round. Fidelity:
cosine similarity and relative L2 error of each contender's features against float32's on up to 256 test images of
a MiniVTAB task (random normal images when the data is absent, recorded as such).

    python benchmarks/int8_backbone_engines.py                     # 5 rounds, batches 1 8 64 (a few minutes)
    python benchmarks/int8_backbone_engines.py --threads 1         # on a CPU busy with other jobs
    python benchmarks/int8_backbone_engines.py --quick             # a smoke run: 2 rounds, batches 1 8
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import logging
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from _common import machine
from torch import nn

from mimi.backbones import create_backbone, model_img_size, preprocessing
from mimi.core.int8_backbone import quantize_backbone

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "perf"
IMAGES_PER_MEASUREMENT = 64
FIDELITY_IMAGES = 256

Forward = Callable[[torch.Tensor], torch.Tensor]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--weights", default="imgfocus")
    p.add_argument("--img-size", type=int, default=56)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads, and ORT / OpenVINO threads")
    p.add_argument("--data", default="vtab1k:digits", help="the task whose test images measure fidelity")
    p.add_argument("--data-root", type=Path, default=ROOT / "data" / "minivtab")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, batches 1 and 8")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: benchmarks/results/perf/...)")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.batches = 2, [1, 8]
    if args.out is None:
        args.out = RESULTS / f"int8_backbone_engines{'_quick' if args.quick else ''}.json"
    return args


# ---------------------------------------------------------------- contenders


def quantized(model: nn.Module, engine: str) -> Forward:
    q = copy.deepcopy(model)
    quantize_backbone(q, "int8", engine=engine)
    return q


def per_tensor(model: nn.Module) -> Forward:
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def onnx_files(model: nn.Module, img_size: int, folder: Path) -> tuple[Path, Path]:
    """The float32 backbone exported to ONNX (dynamic batch), and ORT's dynamic int8 quantisation of it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, int8 = folder / "backbone.onnx", folder / "backbone_int8.onnx"
    example = torch.randn(1, 3, img_size, img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(fp32), dynamo=False, opset_version=17, input_names=["images"],
            output_names=["features"], dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
        )  # fmt: skip
        root = logging.getLogger()  # ORT logs a hint to pre-process the model first, on the root logger
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
        finally:
            root.setLevel(level)
    return fp32, int8


def onnxruntime_session(path: Path, threads: int) -> Forward:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # ORT's pool spin-waits after each run by default: it would steal the cores from the next contender timed
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def openvino_model(path: Path, threads: int) -> Forward:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads})
    return lambda x: torch.from_numpy(compiled([x.numpy()])[compiled.output(0)])


def one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def build_contenders(model: nn.Module, args: argparse.Namespace, folder: Path) -> dict[str, Forward | dict]:
    """name -> forward, or -> {"error": ...} / {"skipped": ...} where it could not be built."""
    out: dict[str, Forward | dict] = {}

    def add(name: str, make: Callable[[], Forward]) -> None:
        try:
            out[name] = make()
        except Exception as e:  # a contender that fails is recorded, not fatal
            out[name] = {"error": one_line(e)}
            print(f"{name}: failed to build ({out[name]['error']})")

    add("float32", lambda: model)
    add("torchao", lambda: quantized(model, "torchao"))
    add("quantize_dynamic", lambda: quantized(model, "quantize_dynamic"))
    add("quantize_dynamic-per-tensor", lambda: per_tensor(model))
    try:
        paths = onnx_files(model, args.img_size, folder)
    except Exception as e:
        paths = None
        for name in ("onnxruntime-float32", "onnxruntime-int8"):
            out[name] = {"error": f"ONNX export / quantisation: {one_line(e)}"}
    if paths:
        add("onnxruntime-float32", lambda: onnxruntime_session(paths[0], args.threads))
        add("onnxruntime-int8", lambda: onnxruntime_session(paths[1], args.threads))
    if importlib.util.find_spec("openvino") is None:
        out["openvino"] = {"skipped": "openvino not installed"}
    elif paths:
        add("openvino-float32", lambda: openvino_model(paths[0], args.threads))
        add("openvino-int8", lambda: openvino_model(paths[1], args.threads))
    return out


# ---------------------------------------------------------------- timing and fidelity


def measure(fn: Forward, x: torch.Tensor) -> float:
    """Images per second over one measurement: as many passes of ``x`` as make 64 images."""
    passes = max(1, IMAGES_PER_MEASUREMENT // len(x))
    start = time.perf_counter()
    for _ in range(passes):
        fn(x)
    return passes * len(x) / (time.perf_counter() - start)


@torch.inference_mode()
def timing(forwards: dict[str, Forward], args: argparse.Namespace) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, 3, args.img_size, args.img_size, generator=g) for b in args.batches}
    for b in args.batches:
        for fn in forwards.values():
            fn(inputs[b])  # warm-up, untimed
    names, rounds = list(forwards), []
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for b in args.batches:
            ips = {name: measure(forwards[name], inputs[b]) for name in order}
            ratio = {name: ips[name] / ips["float32"] for name in names}
            rounds.append({"round": r, "batch": b, "order": order, "images_per_s": ips, "ratio": ratio})
        print(f"round {r + 1}/{args.rounds} done")
    return rounds


def summarise(rounds: list[dict], names: list[str], batches: list[int]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for name in names:
        for b in batches:
            rows = [r for r in rounds if r["batch"] == b]
            ratios = [r["ratio"][name] for r in rows]
            out.setdefault(name, {})[str(b)] = {
                "median_images_per_s": statistics.median(r["images_per_s"][name] for r in rows),
                "median_ratio": statistics.median(ratios),
                "min_ratio": min(ratios),
            }
    return out


def test_images(model: nn.Module, args: argparse.Namespace) -> tuple[torch.Tensor, str]:
    """Up to 256 normalised test images of ``--data``, evenly spaced over its test split; else random ones."""
    try:
        from mimi.data import build_task

        mean, std = preprocessing(model)
        task = build_task(
            args.data, root=args.data_root, img_size=model_img_size(model), mean=mean, std=std, in_memory=False
        )
        k = min(FIDELITY_IMAGES, len(task.test))
        images = torch.stack([task.test[i * len(task.test) // k][0] for i in range(k)])
        return images, f"{args.data} test split ({k} of {len(task.test)} images)"
    except Exception as e:  # no data: random images, said so
        print(f"no test images ({one_line(e)}): fidelity on random normal images")
        g = torch.Generator().manual_seed(1)
        return torch.randn(FIDELITY_IMAGES, 3, args.img_size, args.img_size, generator=g), "random"


@torch.inference_mode()
def fidelity(forwards: dict[str, Forward], images: torch.Tensor) -> dict[str, dict[str, float]]:
    feats = {name: torch.cat([fn(x) for x in images.split(64)]).float() for name, fn in forwards.items()}
    ref = feats["float32"]
    out = {}
    for name, f in feats.items():
        cos = nn.functional.cosine_similarity(f, ref, dim=1)
        rel = (f - ref).norm(dim=1) / ref.norm(dim=1)
        out[name] = {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(), "rel_error": rel.mean().item()}
    return out


# ---------------------------------------------------------------- main


def version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return None


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    print(f"{info['cpu']} | {info['threads']} threads | torch {info['torch']}")
    torch.manual_seed(0)
    model, source = create_backbone(args.model, weights=args.weights, img_size=args.img_size)
    model.reset_classifier(0)
    model.eval().requires_grad_(False)
    print(f"{args.model} ({source}) at {args.img_size}px; rounds {args.rounds}, batches {args.batches}")
    with tempfile.TemporaryDirectory() as tmp:
        built = build_contenders(model, args, Path(tmp))
        forwards = {k: v for k, v in built.items() if callable(v)}
        images, images_from = test_images(model, args)
        fid = fidelity(forwards, images)
        rounds = timing(forwards, args)
    summary = summarise(rounds, list(forwards), args.batches)

    print(f"\nfidelity on {images_from}; ratio = images/s / float32's in the same round")
    head = f"{'contender':<28} {'batch':>5} {'img/s':>9} {'ratio':>6} {'min':>6} {'cos mean':>9} {'cos min':>8} {'rel.err':>8}"
    print(head + "\n" + "-" * len(head))
    for name, per_batch in summary.items():
        f = fid[name]
        for b, s in per_batch.items():
            print(
                f"{name:<28} {b:>5} {s['median_images_per_s']:>9.1f} {s['median_ratio']:>6.2f} {s['min_ratio']:>6.2f} "
                f"{f['cosine_mean']:>9.5f} {f['cosine_min']:>8.5f} {f['rel_error']:>8.4f}"
            )
    for name, v in built.items():
        if not callable(v):
            print(f"{name:<28} {next(iter(v))}: {next(iter(v.values()))}")

    record = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": platform.node(),
        "machine": info,
        "versions": {m: version(m) for m in ("torch", "torchao", "onnxruntime", "onnx", "openvino")},
        "quantized_engine": torch.backends.quantized.engine,
        "threads": args.threads,
        "model": args.model,
        "img_size": args.img_size,
        "weights": args.weights,
        "weights_source": str(source),
        "rounds": args.rounds,
        "batches": args.batches,
        "images_per_measurement": IMAGES_PER_MEASUREMENT,
        "images": images_from,
        "contenders": {k: "ok" if callable(v) else v for k, v in built.items()},
        "summary": summary,
        "fidelity": fid,
        "per_round": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
