"""Serving many tasks on one backbone: memory, mixed-batch throughput, add time, ONNX latency, bytes per task.

Task files carry the adapter sizes a real MiMi run ended with (read from the committed MiniVTAB results: uneven
widths, removed adapters) and random trained weights: memory and compute depend on the sizes, not on the values.
Contenders are measured side by side in one run (interleaved, median of the repeats after a warm-up); memory is
measured in a fresh process per configuration.

    python benchmarks/bank.py            # the full table (about 10 minutes on 2 cores)
    python benchmarks/bank.py --quick    # a smoke run, under a minute

``--backbone-dtypes float32 int8`` measures, instead of the table above, a float32 bank against one whose frozen
backbone is int8 (``AdapterBank(..., backbone_dtype="int8")``: int8 weights and dynamic int8 activations, default engine; task
adapters float32), both holding the same 64 task files: images/s at batch 1, 8 and 64, with one task and with 64
mixed tasks (each image of a batch a different task, cycling over the 64 across calls), 256 images per measurement;
every (batch, mix) is timed once per round, the two banks' calls alternating one by one (each first in every other
call: a slow spell of the machine lands on both), in a rotated order, 5 rounds. Reported:
the median images/s; the int8 / float32 ratio of each round, its median and minimum over the rounds (the goal at
batch 64: >= 1.7x in every round); the RSS of a fresh process holding each bank; the int8 bank's max |logit diff| and
top-1 agreement against the float32 one. Written to benchmarks/results/perf/bank_int8[_quick].json.

    python benchmarks/bank.py --backbone-dtypes float32 int8            # about 5 minutes on 2 cores
    python benchmarks/bank.py --backbone-dtypes float32 int8 --quick    # a smoke run: 3 rounds, fewer images
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import torch
from _common import machine

import mimi
from mimi.backbones import create_backbone
from mimi.core.adapters import AdapterConfig, add_adapters
from mimi.core.shrink import apply_plan

RESULTS = Path(__file__).parent / "results"
SIZES_FROM = sorted((RESULTS / "minivtab").glob("*__mimi__budgetdim3__s0.json"))


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory of this process in MB (``VmHWM``: its peak so far)."""
    gc.collect()
    for line in open("/proc/self/status"):
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def backbone(args) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone(args.model, weights=args.weights, img_size=args.img_size)[0].eval()


def mimi_sizes() -> list[dict[str, int]]:
    """Final per-adapter sizes of the committed MiniVTAB MiMi runs at r=3 (one per task)."""
    if not SIZES_FROM:
        raise SystemExit("no committed MiniVTAB MiMi results under benchmarks/results/minivtab")
    return [json.loads(p.read_text())["cycles"][-1]["sizes"] for p in SIZES_FROM]


def write_tasks(args, folder: Path, n: int) -> list[Path]:
    """``n`` MiMi task files (cycling through the real runs' sizes), 10 classes each, float32 and float16."""
    bare = backbone(args)
    sizes = mimi_sizes()
    paths = []
    for i in range(n):
        model = copy.deepcopy(bare)
        model.reset_classifier(10)
        add_adapters(model, AdapterConfig(hidden_dim=96, init_seed=i))
        apply_plan(model, {k: list(range(h)) for k, h in sizes[i % len(sizes)].items()})
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        paths.append(mimi.save_adapters(model, folder / f"task{i}.safetensors"))
        if i == 0:
            mimi.save_adapters(model, folder / "task0_fp16.safetensors", dtype=torch.float16)
            full = {k: v.contiguous() for k, v in model.state_dict().items()}
            from safetensors.torch import save_file

            save_file(full, str(folder / "full_finetune.safetensors"))  # what a full fine-tune stores per task
    return paths


# ---------------------------------------------------------------- memory (one fresh process per configuration)


def memory_child(args, mode: str, n: int, folder: Path) -> dict:
    base = rss_mb()  # torch, timm and mimi imported, nothing built
    extra = {}
    bare = backbone(args)
    after_backbone = rss_mb()
    files = [folder / f"task{i}.safetensors" for i in range(n)]
    if mode in ("bank", "bank_int8"):
        bank = mimi.AdapterBank(bare, device="cpu", backbone_dtype="int8" if mode == "bank_int8" else "float32")
        del bare  # the bank holds the (quantised) backbone
        for i, f in enumerate(files):
            bank.add(f"t{i}", f)
        held = bank
    elif mode == "separate":  # N adapted models, each with its own copy of the backbone
        held = [mimi.load_adapters(copy.deepcopy(bare), f).eval() for f in files]
        del bare
    else:
        held = bare
    end = rss_mb()
    del held
    row = {"mode": mode, "n": n, "rss_imports_mb": base, "rss_backbone_mb": after_backbone, "rss_mb": end}
    row = {**row, **extra, "rss_peak_mb": rss_mb("VmHWM")}
    try:  # freed memory the allocator kept (e.g. float weights replaced by int8 ones) handed back to the system
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        row["rss_trimmed_mb"] = rss_mb()
    except (OSError, AttributeError):
        pass
    return row


def memory(args, folder: Path, ns: list[int], configs: list[tuple[str, int]] | None = None) -> list[dict]:
    rows = []
    configs = configs or [("bare", 0)] + [(m, n) for n in ns for m in ("bank", "separate")]
    for mode, n in configs:
        cmd = [sys.executable, __file__, "--child", mode, str(n), str(folder), "--model", args.model]
        cmd += ["--weights", args.weights, "--img-size", str(args.img_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    return rows


# ---------------------------------------------------------------- speed


def interleaved(contenders: dict, repeats: int) -> dict[str, float]:
    """Median ms of each contender, measured round-robin (one call of each per round) after a warm-up."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {k: 1000 * v for k, v in _common.interleaved(contenders, repeats, device).items()}


def throughput(args, paths: list[Path]) -> dict:
    bank = mimi.AdapterBank(backbone(args), device="cpu")
    tasks = [f"t{i}" for i in range(8)]
    for t, p in zip(tasks, paths):
        bank.add(t, p)
    b = args.batch
    x = torch.randn(b, 3, args.img_size, args.img_size)
    mixed = [tasks[i % 8] for i in range(b)]
    per = b // 8
    contenders = {
        "single-task batch": lambda: bank.logits(x, "t0"),
        "mixed batch, 8 tasks": lambda: bank.logits(x, mixed),
        "8 sub-batches in turn": lambda: [bank.logits(x[i * per : (i + 1) * per], t) for i, t in enumerate(tasks)],
    }
    bare_model = backbone(args)  # the floor: the same backbone with no task at all
    bare_model.reset_classifier(0)
    with torch.inference_mode():
        ms = interleaved({**contenders, "bare backbone": lambda: bare_model(x)}, args.repeats)
    return {"batch": b, "ms": ms}


def add_time(args, paths: list[Path]) -> dict:
    bank = mimi.AdapterBank(backbone(args), device="cpu")

    def add_remove():
        bank.add("x", paths[0])
        bank.remove("x")

    fp16 = paths[0].parent / "task0_fp16.safetensors"

    def add_remove16():
        bank.add("x", fp16)
        bank.remove("x")

    return interleaved({"add fp32 file": add_remove, "add fp16 file": add_remove16}, max(5, args.repeats * 2))


def onnx_latency(args, path: Path, folder: Path) -> dict:
    import onnxruntime as ort

    from mimi.deploy.onnx_export import export_onnx

    model = mimi.load_adapters(backbone(args), path).eval()
    onnx_path = folder / "task0.onnx"
    res = export_onnx(model, onnx_path, img_size=args.img_size)
    opts = ort.SessionOptions()
    # ORT's worker threads spin after each call by default, stealing the cores PyTorch is timed on next
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    out = {"max_abs_diff": res["max_abs_diff"], "onnx_bytes": res["bytes"]}
    for b in (1, args.batch):
        x = torch.randn(b, 3, args.img_size, args.img_size)
        xn = x.numpy()
        with torch.inference_mode():
            ms = interleaved(
                {"pytorch": lambda x=x: model(x), "onnxruntime": lambda xn=xn: session.run(None, {"images": xn})},
                args.repeats * (4 if b == 1 else 1),
            )
        out[f"batch{b}"] = ms
    return out


# ---------------------------------------------------------------- float32 against int8 backbone (--backbone-dtypes)

DTYPE_BATCHES = (1, 8, 64)
DTYPE_MIXES = ("one", "mixed")  # one task for the whole batch; every image a different task, cycling over the bank
DTYPE_TARGET = 1.7  # int8 / float32 images/s at batch 64, in every round
DTYPE_ARGS = ("backbone_dtypes", "batches", "dtype_tasks", "rounds", "images")  # not in the table's record


def busy_seconds() -> float:
    """CPU seconds every core of this machine has been busy so far (all processes; /proc/stat)."""
    f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def dtype_speed(args, paths: list[Path]) -> dict:
    """Images/s of one bank per backbone dtype (same tasks), every (dtype, batch, mix) timed once per round."""
    n = len(paths)
    tasks = [f"t{i}" for i in range(n)]
    banks, build_s = {}, {}
    for d in args.backbone_dtypes:
        t = time.perf_counter()
        banks[d] = mimi.AdapterBank(backbone(args), device="cpu", backbone_dtype=d)
        build_s[d] = time.perf_counter() - t  # creating the backbone, and quantising it for int8
        for name, path in zip(tasks, paths):
            banks[d].add(name, path)
        print(f"{d}: {banks[d].quantized.describe()}; built in {build_s[d]:.1f} s, {len(banks[d])} tasks")
    g = torch.Generator().manual_seed(0)
    xs = {b: torch.randn(b, 3, args.img_size, args.img_size, generator=g) for b in args.batches}
    # the task argument of each call: one name, or one name per image (a single name at batch 1), cycling over
    # the bank from call to call so that every task runs
    calls = {b: max(1, math.ceil(args.images / b)) for b in args.batches}
    arg = {}
    for b in args.batches:
        arg[(b, "one")] = ["t0"] * calls[b]
        cycled = [[tasks[(k * b + i) % n] for i in range(b)] for k in range(calls[b])]
        arg[(b, "mixed")] = [c[0] if b == 1 else c for c in cycled]

    def measure(b: int, m: str, dtypes: list[str]) -> dict[str, float]:
        """Images/s of each dtype on (batch, mix), their calls alternating one by one (each dtype first in every
        other call), so that a slow spell of this shared machine lands on both and not on one."""
        spent = dict.fromkeys(dtypes, 0.0)
        with torch.inference_mode():
            for k, names in enumerate(arg[(b, m)]):
                for d in dtypes if k % 2 == 0 else dtypes[::-1]:
                    t = time.perf_counter()
                    banks[d].logits(xs[b], names)
                    spent[d] += time.perf_counter() - t
        return {d: calls[b] * b / seconds for d, seconds in spent.items()}

    # agreement on one mixed batch: int8 logits against float32 ones
    agree = {}
    if {"float32", "int8"} <= set(banks):
        b = max(args.batches)
        names = [tasks[i % n] for i in range(b)]
        with torch.inference_mode():
            ref, q = banks["float32"].logits(xs[b], names), banks["int8"].logits(xs[b], names)
        agree = {
            "batch": b,
            "max_abs_diff": max(float((r - v).abs().max()) for r, v in zip(ref, q)),
            "max_abs_logit": max(float(r.abs().max()) for r in ref),
            "top1_agree": sum(int(r.argmax() == v.argmax()) for r, v in zip(ref, q)) / b,
        }
    combos = [(b, m) for b in args.batches for m in DTYPE_MIXES]
    dtypes = list(args.backbone_dtypes)
    for c in combos:  # warm-up, untimed: first calls of a shape and of a task layout are slower
        measure(*c, dtypes)
    rounds: list[dict] = []
    for r in range(args.rounds):
        shift = r * len(combos) // args.rounds
        order = combos[shift:] + combos[:shift]
        first = dtypes if r % 2 == 0 else dtypes[::-1]  # each dtype opens the pairs of half the rounds
        t, busy, own = time.perf_counter(), busy_seconds(), time.process_time()
        ips = {f"{d}|{b}|{m}": v for b, m in order for d, v in measure(b, m, first).items()}
        wall = time.perf_counter() - t
        foreign = max(0.0, (busy_seconds() - busy - (time.process_time() - own)) / wall)
        rounds.append({"images_per_s": ips, "wall_s": wall, "foreign_cores": foreign})
        print(f"  round {r + 1}/{args.rounds}: {wall:.1f} s, other processes {foreign:.2f} cores")
    keys = [f"{d}|{b}|{m}" for b, m in combos for d in dtypes]
    median = {k: statistics.median(rd["images_per_s"][k] for rd in rounds) for k in keys}
    ratios = {}
    if {"float32", "int8"} <= set(banks):
        for b in args.batches:
            for m in DTYPE_MIXES:
                per = [rd["images_per_s"][f"int8|{b}|{m}"] / rd["images_per_s"][f"float32|{b}|{m}"] for rd in rounds]
                ratios[f"{b}|{m}"] = {"per_round": per, "median": statistics.median(per), "min": min(per)}
    return {
        "tasks": n,
        "images_per_measurement": {str(b): calls[b] * b for b in args.batches},
        "build_s": build_s,
        "agreement": agree,
        "median_images_per_s": median,
        "ratio_int8_over_float32": ratios,
        "rounds": rounds,
    }


def dtype_main(args, info: dict) -> None:
    n = args.dtype_tasks
    print(
        f"{args.model} ({args.weights}) at {args.img_size}px; {n} MiMi r=3 task files (sizes of {len(SIZES_FROM)} runs)"
    )
    print(f"backbone dtypes {', '.join(args.backbone_dtypes)}; batches {args.batches}; {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = write_tasks(args, folder, n)
        configs = [("bare", 0)] + [("bank_int8" if d == "int8" else "bank", n) for d in args.backbone_dtypes]
        mem = memory(args, folder, [n], configs)
        speed = dtype_speed(args, paths)
    print(f"\n## Images/s, median of {args.rounds} interleaved rounds ({n} tasks in each bank)")
    dts = args.backbone_dtypes
    both = {"float32", "int8"} <= set(dts)
    head = f"{'batch':>5} {'mix':<6}" + "".join(f" {d + ' img/s':>14}" for d in dts)
    print(head + (f" {'int8/fp32 median':>17} {'min':>6}  per round" if both else ""))
    for b in args.batches:
        for m in DTYPE_MIXES:
            line = f"{b:>5} {m:<6}" + "".join(f" {speed['median_images_per_s'][f'{d}|{b}|{m}']:14.1f}" for d in dts)
            if both:
                r = speed["ratio_int8_over_float32"][f"{b}|{m}"]
                line += f" {r['median']:17.2f} {r['min']:6.2f}  " + " ".join(f"{x:.2f}" for x in r["per_round"])
            print(line)
    targets = {}
    if both:
        a = speed["agreement"]
        print(
            f"int8 vs float32 logits on a mixed batch of {a['batch']}: max |diff| {a['max_abs_diff']:.3g} "
            f"(largest |logit| {a['max_abs_logit']:.3g}), top-1 agreement {a['top1_agree']:.1%}"
        )
        b = 64 if 64 in args.batches else max(args.batches)
        for m in DTYPE_MIXES:
            r = speed["ratio_int8_over_float32"][f"{b}|{m}"]
            met = r["min"] >= DTYPE_TARGET
            targets[f"batch{b}_{m}"] = {"target": f">= {DTYPE_TARGET}x every round", **r, "met": met}
            print(
                f"target batch {b}, {m}: int8/float32 median x{r['median']:.2f}, min x{r['min']:.2f} "
                f"-> {'MET' if met else 'MISSED'} (>= {DTYPE_TARGET}x in every round)"
            )
    bare = next(r for r in mem if r["mode"] == "bare")
    print(f"\n## Memory (RSS, a fresh process each): bare backbone {bare['rss_mb']:.0f} MB")
    print(f"{'layout':<10} {'tasks':>5} {'RSS MB':>8} {'above imports':>14} {'peak MB':>8} {'after trim':>11}")
    for r in mem:
        inc = r["rss_mb"] - r["rss_imports_mb"]
        trimmed = r.get("rss_trimmed_mb", float("nan"))
        print(f"{r['mode']:<10} {r['n']:>5} {r['rss_mb']:>8.0f} {inc:>14.0f} {r['rss_peak_mb']:>8.0f} {trimmed:>11.0f}")
    print(
        "(above imports: RSS less the process's after its imports; after trim: "
        "RSS once malloc_trim has handed freed memory back)"
    )
    load = [rd["foreign_cores"] for rd in speed["rounds"]]
    print(f"other processes used median {statistics.median(load):.2f} cores during the rounds, max {max(load):.2f}")
    out = args.out or RESULTS / "perf" / ("bank_int8_quick.json" if args.quick else "bank_int8.json")
    _common.write_record(out, args, info, memory=mem, speed=speed, targets=targets)


# ---------------------------------------------------------------- report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--weights", default="imgfocus", help="backbone weights (values do not change speed or memory)")
    p.add_argument("--img-size", type=int, default=56)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="smoke run: fewer tasks and repeats")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: benchmarks/results/bank[_quick].json)")
    p.add_argument(
        "--backbone-dtypes",
        nargs="+",
        choices=("float32", "int8"),
        default=None,
        help="instead of the table: banks with these backbone dtypes side by side (speed, memory); see the docstring",
    )
    p.add_argument("--batches", type=int, nargs="+", default=list(DTYPE_BATCHES), help="--backbone-dtypes batches")
    p.add_argument("--dtype-tasks", type=int, default=64, help="--backbone-dtypes: task files in each bank")
    p.add_argument("--rounds", type=int, default=5, help="--backbone-dtypes: interleaved rounds")
    p.add_argument(
        "--images", type=int, default=256, help="--backbone-dtypes: images per measurement (at least one batch)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        mode, n, folder = args.child
        print(json.dumps(memory_child(args, mode, int(n), Path(folder))))
        return
    if args.backbone_dtypes:
        args.backbone_dtypes = list(dict.fromkeys(args.backbone_dtypes))
        if args.quick:
            args.rounds, args.images = 3, 64
        info = machine()
        print(f"{info['cpu']} | {info['threads']} threads | torch {info['torch']} | {info['device']}")
        dtype_main(args, info)
        return
    if args.quick:
        args.repeats, args.batch = 3, 16
    ns = [1, 10] if args.quick else [1, 10, 100]
    info = machine()
    print(f"{info['cpu']} | {info['threads']} threads | torch {info['torch']} | {info['device']}")
    print(f"{args.model} ({args.weights}) at {args.img_size}px; MiMi r=3 task sizes from {len(SIZES_FROM)} runs")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = write_tasks(args, folder, max(ns))
        files = {
            "task fp32": paths[0].stat().st_size,
            "task fp16": (folder / "task0_fp16.safetensors").stat().st_size,
            "full fine-tune": (folder / "full_finetune.safetensors").stat().st_size,
        }
        mem = memory(args, folder, ns)
        speed = throughput(args, paths)
        adds = add_time(args, paths)
        onnx = onnx_latency(args, paths[0], folder)
    report(args, info, files, mem, speed, adds, onnx)


def report(args, info, files, mem, speed, adds, onnx) -> None:
    bare = next(r for r in mem if r["mode"] == "bare")
    bare_inc = bare["rss_mb"] - bare["rss_imports_mb"]
    print("\n## Bytes per task")
    for k, v in files.items():
        print(f"{k:<16} {v:>12,} bytes  {v / files['full fine-tune']:.4%} of a full fine-tune")
    print(f"\n## Memory (RSS, fresh process each): bare backbone process {bare['rss_mb']:.0f} MB, of which the model")
    print(f"## {bare_inc:.0f} MB above the imports")
    print(f"{'tasks':>5} {'layout':<10} {'RSS MB':>8} {'x bare process':>15} {'x bare model (above imports)':>29}")
    for r in mem:
        if r["mode"] == "bare":
            continue
        inc = r["rss_mb"] - r["rss_imports_mb"]
        print(
            f"{r['n']:>5} {r['mode']:<10} {r['rss_mb']:>8.0f} {r['rss_mb'] / bare['rss_mb']:>15.3f} {inc / bare_inc:>29.3f}"
        )
    ms = speed["ms"]
    b = speed["batch"]
    print(f"\n## Throughput, batch {b} (median of {args.repeats} interleaved rounds)")
    for k, v in ms.items():
        print(f"{k:<24} {v:8.1f} ms  {1000 * b / v:8.1f} img/s  x{ms['single-task batch'] / v:.3f} of single-task")
    print("\n## Adding a task from disk (add + remove, median)")
    for k, v in adds.items():
        print(f"{k:<16} {v:8.2f} ms")
    print(f"\n## ONNX Runtime vs PyTorch (one task's model; max |diff| {onnx['max_abs_diff']:.2e})")
    for bb in (1, b):
        o = onnx[f"batch{bb}"]
        print(
            f"batch {bb:>3}: pytorch {o['pytorch']:8.2f} ms, onnxruntime {o['onnxruntime']:8.2f} ms "
            f"(x{o['onnxruntime'] / o['pytorch']:.2f})"
        )
    out = args.out or RESULTS / ("bank_quick.json" if args.quick else "bank.json")
    record = {
        "machine": info,
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "out", *DTYPE_ARGS)},
        "bytes": files,
        "memory": mem,
        "throughput": speed,
        "add_ms": adds,
        "onnx": onnx,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
