"""`mimi serve` under concurrent clients: requests for mixed tasks batched together, against one request per
backbone pass, and against the bank called directly.

Eight MiMi task files with the sizes the committed MiniVTAB runs ended with (see bank.py), one BankServer per
contender on a free local port, and C client threads (in a process of their own, so that they do not share the
server's GIL) each posting R images (PNG, 64x64) for random tasks, one after another on one kept-alive connection. Contenders run interleaved,
median requests/s over the repeats:

    batched      --max-batch 32 --batch-wait-ms 5 (the defaults)
    unbatched    --max-batch 1: every request its own backbone pass
    direct       bank.logits on mixed batches of 32 preprocessed images, no HTTP, no decoding: the ceiling

    python benchmarks/serve.py            # 16 clients x 8 requests, 5 repeats (about 3 minutes on 2 cores)
    python benchmarks/serve.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import http.client
import io
import multiprocessing
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import torch
from _common import machine, write_record
from bank import backbone, write_tasks
from PIL import Image

import mimi
from mimi.deploy.server import BankServer

RESULTS = Path(__file__).parent / "results"


def png(i: int) -> bytes:
    g = torch.Generator().manual_seed(i)
    pixels = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def clients(url: str, tasks: list[str], n_clients: int, per_client: int, images: list[bytes]) -> dict:
    """Every client posts its requests one after another; returns wall seconds and per-request latencies."""
    latencies: list[float] = []
    lock = threading.Lock()

    host, port = urlparse(url).hostname, urlparse(url).port

    def run(c: int) -> None:
        rng = random.Random(c)
        conn = http.client.HTTPConnection(host, port, timeout=120)  # one kept-alive connection per client
        for k in range(per_client):
            task = rng.choice(tasks)
            t = time.perf_counter()
            conn.request("POST", f"/predict?task={task}", body=images[(c + k) % len(images)])
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}")
            with lock:
                latencies.append(time.perf_counter() - t)
        conn.close()

    threads = [threading.Thread(target=run, args=(c,)) for c in range(n_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall_s": time.perf_counter() - t0, "latencies_s": latencies}


def _client_process(url: str, tasks: list[str], n_clients: int, per_client: int, images: list[bytes], out) -> None:
    out.put(clients(url, tasks, n_clients, per_client, images))


def measure(bank: mimi.AdapterBank, max_batch: int, args, images: list[bytes]) -> dict:
    """One server in this process; the clients in another, so that they do not share the server's GIL."""
    server = BankServer(bank, port=0, max_batch=max_batch, wait_ms=args.wait_ms)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        client = ctx.Process(
            target=_client_process, args=(server.url, bank.tasks, args.clients, args.requests, images, results)
        )
        client.start()
        res = results.get(timeout=600)
        client.join()
        sizes, busy = list(server.batcher.batch_sizes), server.batcher.busy_s
    finally:
        server.shutdown()
        server.close()
        thread.join()
    n = args.clients * args.requests
    lat = sorted(res["latencies_s"])
    return {
        "requests_per_s": n / res["wall_s"],
        "mean_batch": statistics.mean(sizes),
        "model_busy": busy / res["wall_s"],  # share of the wall the batcher spent in the bank
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))],
    }


def direct(bank: mimi.AdapterBank, args, images: list[bytes]) -> dict:
    x = bank.preprocess([Image.open(io.BytesIO(images[i % len(images)])) for i in range(32)])
    names = [bank.tasks[i % len(bank.tasks)] for i in range(32)]
    batches = max(1, args.clients * args.requests // 32)
    t = time.perf_counter()
    for _ in range(batches):
        bank.logits(x, names)
    return {"requests_per_s": 32 * batches / (time.perf_counter() - t)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--weights", default="none", help="backbone weights (values do not change speed)")
    p.add_argument("--img-size", type=int, default=56)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--wait-ms", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="smoke run: 4 clients x 4 requests, 1 repeat")
    p.add_argument("--out", type=Path, default=None, help="JSON (default: benchmarks/results/perf/serve[_quick].json)")
    args = p.parse_args()
    if args.quick:
        args.clients, args.requests, args.repeats, args.tasks = 4, 4, 1, 3
    info = machine()
    print(f"{info['cpu']} | {info['threads']} threads | torch {info['torch']} | {info['device']}")
    images = [png(i) for i in range(16)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_tasks(args, Path(tmp), args.tasks)
        bank = mimi.AdapterBank(backbone(args), device="cpu")  # the backbone the task files were written on
        for i, path in enumerate(paths):
            bank.add(f"task{i}", path)
        runs: dict[str, list[dict]] = {"batched": [], "unbatched": [], "direct": []}
        measure(bank, 32, args, images)  # warm-up
        for r in range(args.repeats):
            order = ["batched", "unbatched", "direct"][:: 1 if r % 2 == 0 else -1]
            for name in order:
                if name == "direct":
                    runs[name].append(direct(bank, args, images))
                else:
                    runs[name].append(measure(bank, 32 if name == "batched" else 1, args, images))
            print(f"  round {r + 1}: " + ", ".join(f"{n} {runs[n][-1]['requests_per_s']:.1f}/s" for n in order))
    med = {n: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for n, rs in runs.items()}
    n = args.clients * args.requests
    print(
        f"\n{args.model} at {args.img_size}px, {args.tasks} MiMi tasks; {args.clients} clients x {args.requests} "
        f"requests ({n} per round), random tasks; median of {args.repeats}"
    )
    print(f"{'contender':<10} {'req/s':>8} {'mean batch':>11} {'model busy':>11} {'p50 ms':>8} {'p95 ms':>8}")
    for name in ("batched", "unbatched"):
        m = med[name]
        print(
            f"{name:<10} {m['requests_per_s']:8.1f} {m['mean_batch']:11.1f} {m['model_busy']:11.0%} "
            f"{m['p50_ms']:8.1f} {m['p95_ms']:8.1f}"
        )
    print(f"{'direct':<10} {med['direct']['requests_per_s']:8.1f}  (bank.logits, mixed batches of 32, no HTTP)")
    speedup = med["batched"]["requests_per_s"] / med["unbatched"]["requests_per_s"]
    share = med["batched"]["requests_per_s"] / med["direct"]["requests_per_s"]
    print(f"\nbatched / unbatched: x{speedup:.2f}; batched server / direct bank: {share:.0%}")
    out = args.out or RESULTS / "perf" / ("serve_quick.json" if args.quick else "serve.json")
    write_record(out, args, info, median=med, batched_over_unbatched=speedup, batched_over_direct=share, runs=runs)


if __name__ == "__main__":
    main()
