"""`mimi serve` under concurrent clients: the ASGI server (uvicorn + Starlette) against the standard-library server
it replaced, and against the bank called directly, for several concurrencies and task mixes.

64 MiMi task files with the sizes the committed MiniVTAB runs ended with (see bank.py), on the offline ViT-S/14 at
56 px. Three contenders, measured side by side (interleaved rounds, median of the repeats):

    asgi      `python -m mimi serve --task-dir DIR --port 0 --device cpu --max-batch 32` in a subprocess
              (the defaults otherwise: --batch-wait-ms 5), ready once GET /ready answers 200
    stdlib    the standard-library server (mimi.deploy.stdlib_server.BankServer, max_batch 32, wait 5 ms) in a
              subprocess (this script, --stdlib-child), ready once GET /health answers 200
    direct    the bank called in this process on batches of 32 preprocessed images drawn from the same task mix,
              as the servers' batchers call it (stack, logits, top-1 decode per row): no HTTP, no image decoding,
              the ceiling

Clients: C asyncio clients in a process of their own (so that they do not share a server's GIL or this process's),
raw HTTP/1.1 over asyncio streams, one kept-alive connection each (opened before the clock starts), each posting its
requests back to back (a 64x64 PNG, a task drawn from the mix) until it has sent its share of the cell's requests
or the cell's time bound has passed. Every request's latency and status are recorded; a request is lost when it
gets no answer (connection error, timeout) or a non-200 answer, or a 200 for another task. Concurrency 1, 8, 32,
128; task mixes: one task, uniform over 8 tasks, uniform over 64, Zipf (s=1.1) over 64.

Both servers and this process run torch on --threads intra-op threads (default: every core; OMP_NUM_THREADS and
MKL_NUM_THREADS are set to it for the servers, torch.set_num_threads here); the client process runs no torch.

    python benchmarks/serve.py            # 3 repeats, 192 requests a cell (at least 2 per client), 5 s bound
                                          # (about 10 minutes on 2 cores)
    python benchmarks/serve.py --quick    # a smoke run, 1 repeat, 32 requests a cell, 1.5 s bound (under 2 minutes)

``--backbone-dtypes float32 int8`` measures, instead of asgi against stdlib, the ASGI server started once per backbone
dtype (`mimi serve ... --backbone-dtype DTYPE`, both up at once, interleaved as above; the start-up line must name the
dtype) at 32 clients (``--concurrency`` to change), every mix, and the bank called directly with each dtype; it
reports each server's requests/s, the int8 / float32 ratio (of the medians, and per repeat: median and minimum), and
each server's req/s over its own bank's direct img/s. Written to benchmarks/results/perf/serve_int8[_quick].json.

``--variant-env KEY=VALUE ...`` (with ``--backbone-dtypes``) starts each dtype's server once more with these
environment variables (e.g. OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep when idle instead of spinning a while), in
the same interleaved rounds, and reports each dtype's plain server over its variant.

    python benchmarks/serve.py --backbone-dtypes float32 int8            # 3 repeats (about 5 minutes on 2 cores)
    python benchmarks/serve.py --backbone-dtypes float32 int8 --quick    # a smoke run (about 2 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import multiprocessing
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CONCURRENCY = (1, 8, 32, 128)
MIXES = ("one", "uniform8", "uniform64", "zipf64")
SERVERS = ("asgi", "stdlib")
N_TASKS = 64
ZIPF_S = 1.1
TARGET_RATIO = 0.6  # asgi req/s over the bank's direct img/s, at 32 clients


def mix(name: str) -> tuple[list[str], list[float]]:
    """The tasks of a mix and their weights."""
    if name == "one":
        return ["task0"], [1.0]
    if name == "uniform8":
        return [f"task{i}" for i in range(8)], [1.0] * 8
    if name == "uniform64":
        return [f"task{i}" for i in range(N_TASKS)], [1.0] * N_TASKS
    if name == "zipf64":
        return [f"task{i}" for i in range(N_TASKS)], [1 / (k + 1) ** ZIPF_S for k in range(N_TASKS)]
    raise ValueError(name)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))]


# ---------------------------------------------------------------- the load generator (its own process, no torch)


async def _response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """One HTTP/1.1 response: status, whether the server closes the connection, body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length, close = None, lines[0].startswith(b"HTTP/1.0")
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        key, value = key.strip().lower(), value.strip().lower()
        if key == b"content-length":
            length = int(value)
        elif key == b"connection":
            close = value == b"close"
        elif key == b"transfer-encoding" and value != b"identity":
            raise ValueError("chunked response")  # neither server chunks its JSON
    if length is None:
        raise ValueError("response without Content-Length")
    return status, close, await reader.readexactly(length)


async def _load(
    host: str,
    port: int,
    clients: int,
    per_client: int,
    seconds: float,
    tasks: list[str],
    weights: list[float],
    seed: int,
    images: list[bytes],
    timeout: float,
) -> dict:
    """``clients`` kept-alive connections, each sending up to ``per_client`` requests back to back."""

    async def connect():
        return await asyncio.wait_for(asyncio.open_connection(host, port), timeout)

    conns = await asyncio.gather(*(connect() for _ in range(clients)), return_exceptions=True)
    preconnect_errors = sum(isinstance(c, BaseException) for c in conns)
    records: list[tuple[float, float, int, str]] = []  # (start offset s, latency s, status, error)
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def client(c: int, conn) -> None:
        rng = random.Random(seed * 1_000_003 + c)
        reader, writer = (None, None) if isinstance(conn, BaseException) else conn
        for k in range(per_client):
            if time.perf_counter() >= deadline:
                break
            task = rng.choices(tasks, weights)[0]
            body = images[(c * 7 + k) % len(images)]
            request = (
                f"POST /predict?task={task}&topk=1 HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body
            t = time.perf_counter()
            status, error = 0, ""
            try:
                if writer is None:
                    reader, writer = await connect()
                writer.write(request)
                status, close, data = await asyncio.wait_for(_response(reader), timeout)
                if status == 200 and json.loads(data).get("task") != task:
                    error = "wrong task"
                if close:
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError) as e:
                error = type(e).__name__
                if writer is not None:
                    writer.close()
                reader = writer = None
            records.append((t - t0, time.perf_counter() - t, status, error))
        if writer is not None:
            writer.close()

    await asyncio.gather(*(client(c, conn) for c, conn in enumerate(conns)))
    wall = max((s + lat for s, lat, _, _ in records), default=0.0)
    return {"records": records, "wall_s": wall, "preconnect_errors": preconnect_errors}


def _loadgen(conn) -> None:
    """The client process: runs one load job per message until told to stop."""
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(asyncio.run(_load(**job)))


# ---------------------------------------------------------------- servers (subprocesses)


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds every core of this machine has been busy so far (all processes)."""
    f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


OWN_PIDS: list[int] = []  # this run's processes: this one, the servers, the client process


class Foreign:
    """Cores used by processes other than this run's over a span: how noisy the machine was while measuring."""

    def __enter__(self) -> Foreign:
        self.t, self.busy = time.perf_counter(), machine_busy_seconds()
        self.own = sum(cpu_seconds(p) for p in OWN_PIDS)
        return self

    def __exit__(self, *exc) -> None:
        own = sum(cpu_seconds(p) for p in OWN_PIDS) - self.own
        self.cores = max(0.0, (machine_busy_seconds() - self.busy - own) / (time.perf_counter() - self.t))


def quiesce(pids: list[int], limit: float = 30.0) -> float:
    """Wait until the servers are idle (under 10% of a core over 0.25 s): a server still answering the requests of
    a cell whose clients gave up (timeouts) would slow the next measurement. Returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        before = sum(cpu_seconds(p) for p in pids)
        time.sleep(0.25)
        if sum(cpu_seconds(p) for p in pids) - before < 0.025:
            break
    return time.perf_counter() - t0


class Server:
    """A server subprocess: started, waited for, its counters read, stopped."""

    def __init__(
        self, kind: str, task_dir: Path, args, env: dict[str, str], log: Path, backbone_dtype: str | None = None
    ) -> None:
        self.kind = kind
        self.backbone_dtype = backbone_dtype
        if kind == "asgi":
            cmd = [sys.executable, "-m", "mimi", "serve", "--task-dir", str(task_dir), "--port", "0"]
            cmd += ["--device", "cpu", "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.wait_ms)]
            if backbone_dtype is not None:  # None: the server's default, no flag (the asgi / stdlib comparison)
                cmd += ["--backbone-dtype", backbone_dtype]
        else:
            cmd = [sys.executable, __file__, "--stdlib-child", str(task_dir)]
            cmd += ["--max-batch", str(args.max_batch), "--wait-ms", str(args.wait_ms)]
        # the task files do not record their backbone (bank.write_tasks builds it bare): name it
        cmd += ["--backbone", args.model, "--weights", args.weights, "--img-size", str(args.img_size)]
        if kind == "stdlib":
            cmd[cmd.index("--backbone")] = "--model"
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._log_file, env=env, text=True, cwd=Path(__file__).parent
        )
        self.url: str | None = None
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line.rstrip())
            m = re.search(r"(http://[\w.\-]+:\d+)", line)
            if m and self.url is None and ("serving" in line or "listening" in line):
                self.url = m.group(1)

    def wait_ready(self, timeout: float = 300.0) -> None:
        path = "/ready" if self.kind == "asgi" else "/health"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.kind} server exited ({self.proc.returncode}); see {self.log}")
            if self.url is not None:
                try:
                    if _get(self.url + path)[0] == 200:
                        self._check_dtype()
                        return
                except OSError:
                    pass
            time.sleep(0.2)
        raise SystemExit(f"{self.kind} server not ready within {timeout:.0f} s; see {self.log}")

    def startup(self) -> list[str]:
        """The server's start-up lines that name its backbone (e.g. ``int8 backbone (quantize_dynamic): 48 linear layers``)."""
        return [ln for ln in self._lines if "backbone" in ln]

    def _check_dtype(self) -> None:
        """With a backbone dtype asked for: the server's "serving ..." line must name it."""
        if self.backbone_dtype is None:
            return
        serving = next((ln for ln in self._lines if ln.startswith("serving")), "")
        if f"({self.backbone_dtype} backbone" not in serving:
            raise SystemExit(f"{self.kind} server asked for a {self.backbone_dtype} backbone said: {serving!r}")

    @property
    def host_port(self) -> tuple[str, int]:
        assert self.url is not None
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    def counters(self) -> dict[str, float]:
        """Requests and batches run so far (and, for asgi, seconds the model ran), and the process's CPU seconds."""
        out = {"cpu_s": cpu_seconds(self.proc.pid)}
        health = json.loads(_get(self.url + "/health")[1])
        out["requests"], out["batches"] = health["requests"], health["batches"]
        if self.kind == "asgi":
            text = _get(self.url + "/metrics")[1].decode()
            m = re.search(r"^mimi_batch_seconds_sum (\S+)$", text, re.M)
            out["model_s"] = float(m.group(1)) if m else float("nan")
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


def stdlib_child(args) -> None:
    """--stdlib-child DIR: the standard-library server over the task files of DIR, until terminated."""
    import signal

    import torch

    import mimi
    from mimi.deploy.stdlib_server import BankServer

    paths = {p.stem: p for p in sorted(Path(args.stdlib_child).glob("*.safetensors"))}
    bank = mimi.AdapterBank.from_task_files(
        paths, backbone=args.model, weights=args.weights, img_size=args.img_size, device="cpu"
    )
    server = BankServer(bank, port=0, max_batch=args.max_batch, wait_ms=args.wait_ms)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(
        f"stdlib server listening at {server.url} ({len(bank)} tasks, torch threads {torch.get_num_threads()})",
        flush=True,
    )
    server.serve_forever()
    server.close()


# ---------------------------------------------------------------- one measurement


def serve_cell(server: Server, loadgen, clients: int, mix_name: str, seed: int, args, images: list[bytes]) -> dict:
    """One (server, concurrency, mix) round: the client process's load, and the server's counters around it."""
    tasks, weights = mix(mix_name)
    host, port = server.host_port
    per_client = max(2, math.ceil(args.requests / clients))
    job = dict(
        host=host,
        port=port,
        clients=clients,
        per_client=per_client,
        seconds=args.seconds,
        tasks=tasks,
        weights=weights,
        seed=seed,
        images=images,
        timeout=args.timeout,
    )
    before = server.counters()
    client_cpu = cpu_seconds(loadgen.pid)
    loadgen.send(job)
    res = loadgen.recv()
    client_cpu = cpu_seconds(loadgen.pid) - client_cpu
    after = server.counters()
    records = res["records"]
    ok = [lat for _, lat, status, err in records if status == 200 and not err]
    lost = len(records) - len(ok)
    lat = sorted(ok)
    wall = res["wall_s"] or float("nan")
    batches = after["batches"] - before["batches"]
    out = {
        "requests": len(records),
        "lost": lost,
        "lost_reasons": sorted({f"{s} {e}".strip() for _, _, s, e in records if s != 200 or e}),
        "preconnect_errors": res["preconnect_errors"],
        "requests_per_s": len(ok) / wall,
        "p50_ms": 1000 * percentile(lat, 50),
        "p95_ms": 1000 * percentile(lat, 95),
        "p99_ms": 1000 * percentile(lat, 99),
        "mean_batch": (after["requests"] - before["requests"]) / batches if batches else float("nan"),
        # CPU seconds per answered request: the server process (all its threads), the client process
        "server_cpu_ms_per_req": 1000 * (after["cpu_s"] - before["cpu_s"]) / max(1, len(records)),
        "client_cpu_ms_per_req": 1000 * client_cpu / max(1, len(records)),
        "wall_s": wall,
    }
    if "model_s" in after:
        out["model_busy"] = (after["model_s"] - before["model_s"]) / wall  # share of the wall in bank.logits
    return out


def direct_cell(bank, x_pool, mix_name: str, seed: int, args) -> dict:
    """The bank on batches of ``max_batch`` preprocessed images whose tasks are drawn from the mix."""
    import torch

    tasks, weights = mix(mix_name)
    rng = random.Random(seed)
    n = args.direct_images
    names = rng.choices(tasks, weights, k=n)
    rows = [rng.randrange(len(x_pool)) for _ in range(n)]
    mb = args.max_batch
    t = time.perf_counter()
    for i in range(0, n, mb):
        batch_names = names[i : i + mb]
        x = torch.stack([x_pool[j] for j in rows[i : i + mb]])  # as the batchers do: one tensor per request
        logits = bank.logits(x, batch_names[0]) if len(set(batch_names)) == 1 else bank.logits(x, batch_names)
        for task, row in zip(batch_names, logits):
            bank.decode(task, row, 1)
    seconds = time.perf_counter() - t
    return {"images_per_s": n / seconds, "ms_per_batch": 1000 * seconds / math.ceil(n / mb)}


# ---------------------------------------------------------------- the run


def png(i: int) -> bytes:
    import io

    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(i)
    pixels = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def median_of(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["lost"] = sum(r["lost"] for r in runs)  # lost: the total over the repeats, not a median
    out["requests"] = sum(r["requests"] for r in runs)
    out["lost_reasons"] = sorted({x for r in runs for x in r.get("lost_reasons", [])})
    return out


def _stack() -> dict[str, str | None]:
    """The serving stack's versions: uvicorn picks httptools and uvloop (its [standard] extra) where installed."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {n: v(n) for n in ("uvicorn", "starlette", "httptools", "uvloop", "h11")}


def _env_pair(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (``--variant-env``) -> ``(KEY, VALUE)``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--variant-env takes KEY=VALUE (e.g. OMP_WAIT_POLICY=PASSIVE), got {text!r}")
    return key, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--weights", default="imgfocus", help="backbone weights (values do not change speed)")
    p.add_argument("--img-size", type=int, default=56)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--wait-ms", type=float, default=5.0)
    p.add_argument("--requests", type=int, default=192, help="requests per cell (each client sends at least 2)")
    p.add_argument("--seconds", type=float, default=5.0, help="time bound per cell: no request starts after it")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds a client waits for one answer; past it: lost")
    p.add_argument("--direct-images", type=int, default=256, help="images per direct round (in max-batch batches)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--concurrency", type=int, nargs="+", default=None, help="clients (default: 1 8 32 128; --backbone-dtypes: 32)"
    )
    p.add_argument("--mixes", nargs="+", choices=MIXES, default=list(MIXES))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, servers and direct alike")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 32 requests a cell, 1.5 s bound")
    p.add_argument("--out", type=Path, default=None, help="JSON (default: benchmarks/results/perf/serve[_quick].json)")
    p.add_argument(
        "--backbone-dtypes",
        nargs="+",
        choices=("float32", "int8"),
        default=None,
        help="instead of asgi against stdlib: the ASGI server once per backbone dtype (see the docstring)",
    )
    p.add_argument(
        "--variant-env",
        nargs="+",
        default=None,
        metavar="KEY=VALUE",
        type=_env_pair,
        help="with --backbone-dtypes: also each dtype's server with these environment variables (see the docstring)",
    )
    p.add_argument("--stdlib-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stdlib_child:
        stdlib_child(args)
        return
    if args.backbone_dtypes:
        args.backbone_dtypes = list(dict.fromkeys(args.backbone_dtypes))
    if args.concurrency is None:
        args.concurrency = [32] if args.backbone_dtypes else list(CONCURRENCY)
    if args.quick:
        args.repeats, args.requests, args.seconds, args.direct_images, args.timeout = 1, 32, 1.5, 64, 5.0

    import torch
    from _common import machine, write_record
    from bank import write_tasks

    import mimi

    torch.set_num_threads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    info = machine()
    info["load_before"] = os.getloadavg()
    print(
        f"{info['cpu']} | {info['threads']} torch threads (servers: OMP_NUM_THREADS={args.threads}) | "
        f"torch {info['torch']} | {info['device']} | load {info['load_before'][0]:.2f}"
    )
    images = [png(i) for i in range(16)]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = write_tasks(args, folder, N_TASKS)
        task_dir = folder / "tasks"  # only the 64 task files (write_tasks also leaves an fp16 and a full one)
        task_dir.mkdir()
        for path in paths:
            path.rename(task_dir / path.name)
        # the contenders: asgi and stdlib, or (--backbone-dtypes) the asgi server once per dtype
        specs = {f"asgi-{d}": ("asgi", d, {}) for d in args.backbone_dtypes} if args.backbone_dtypes else {}
        if args.backbone_dtypes and args.variant_env:
            specs |= {f"asgi-{d}-variant": ("asgi", d, dict(args.variant_env)) for d in args.backbone_dtypes}
        specs = specs or {k: (k, None, {}) for k in SERVERS}
        servers = {
            k: Server(kind, task_dir, args, env | extra, folder / f"{k}.log", d)
            for k, (kind, d, extra) in specs.items()
        }
        ctx = multiprocessing.get_context("spawn")
        here, there = ctx.Pipe()
        loadgen = ctx.Process(target=_loadgen, args=(there,), daemon=True)
        loadgen.start()
        loadgen.send = here.send  # type: ignore[attr-defined]
        loadgen.recv = here.recv  # type: ignore[attr-defined]
        try:
            # the bank called directly: "direct" (float32), or "direct-<dtype>" per backbone dtype
            directs = {f"direct-{d}": d for d in args.backbone_dtypes} if args.backbone_dtypes else {}
            banks = {
                key: mimi.AdapterBank.from_task_files(
                    {p.stem: p for p in sorted(task_dir.glob("*.safetensors"))},
                    backbone=args.model,
                    weights=args.weights,
                    img_size=args.img_size,
                    device="cpu",
                    **({"backbone_dtype": d} if d else {}),
                )
                for key, d in (directs or {"direct": None}).items()
            }
            bank = next(iter(banks.values()))
            import io

            from PIL import Image

            x_pool = list(bank.preprocess([Image.open(io.BytesIO(b)) for b in images]))
            for s in servers.values():
                s.wait_ready()
            print(
                f"ready after {time.perf_counter() - t_start:.0f} s: 64 tasks written; "
                + ", ".join(f"{k} at {s.url}" for k, s in servers.items())
            )
            # warm-up, untimed: the first calls of each batch shape and adapter layout are many times slower
            # (seen: 2 s for a first mixed batch of 32 against 0.19 s after), thread pools, connections
            t_warm = time.perf_counter()
            warm = argparse.Namespace(**{**vars(args), "direct_images": 4 * args.max_batch})
            for m, mix_name in enumerate(args.mixes):
                for b in banks.values():
                    direct_cell(b, x_pool, mix_name, 900 + m, warm)
                for c, n in ((32, 32),) if args.quick or args.backbone_dtypes else ((1, 4), (8, 16), (32, 32)):
                    for s in servers.values():
                        w = argparse.Namespace(**{**vars(args), "requests": n})
                        serve_cell(s, loadgen, c, mix_name, 90_000 + 100 * m + c, w, images)
            print(f"warm-up {time.perf_counter() - t_warm:.0f} s")
            OWN_PIDS[:] = [os.getpid(), loadgen.pid] + [s.proc.pid for s in servers.values()]
            server_pids = [s.proc.pid for s in servers.values()]

            def timed(fn) -> dict:
                waited = quiesce(server_pids)
                with Foreign() as foreign:
                    out = fn()
                return {**out, "quiesce_s": waited, "foreign_cores": foreign.cores}

            runs: dict[str, list[dict]] = {}
            kinds = list(servers)
            for r in range(args.repeats):
                t_round = time.perf_counter()
                for m, mix_name in enumerate(args.mixes):
                    seed = 1000 * r + m
                    for key in banks if (r + m) % 2 == 0 else list(banks)[::-1]:
                        cell = timed(functools.partial(direct_cell, banks[key], x_pool, mix_name, seed, args))
                        runs.setdefault(f"{key}|{mix_name}", []).append(cell)
                    for i, c in enumerate(args.concurrency):
                        order = kinds if (r + m + i) % 2 == 0 else kinds[::-1]
                        for k in order:
                            cell = timed(
                                functools.partial(
                                    serve_cell, servers[k], loadgen, c, mix_name, seed * 1000 + c, args, images
                                )
                            )
                            runs.setdefault(f"{k}|{c}|{mix_name}", []).append(cell)
                print(f"  round {r + 1}/{args.repeats} in {time.perf_counter() - t_round:.0f} s")
        finally:
            here.send(None)
            loadgen.join(timeout=10)
            for s in servers.values():
                s.stop()
    total = time.perf_counter() - t_start
    med = {
        key: (median_of(v) if not key.startswith("direct") else {k: statistics.median(x[k] for x in v) for k in v[0]})
        for key, v in runs.items()
    }
    if args.backbone_dtypes:
        startup = {k: s.startup() for k, s in servers.items()}
        report_dtypes(args, info, med, runs, total, write_record, startup)
        return
    report(args, info, med, runs, total, write_record)


def noise_line(info, runs: dict) -> str:
    """How busy the machine was with other processes during the cells, and the waits for idle servers."""
    noise = sorted((r["foreign_cores"], key) for key, rs in runs.items() for r in rs if "foreign_cores" in r)
    waits = [r["quiesce_s"] for rs in runs.values() for r in rs if "quiesce_s" in r]
    busy = [x for x, _ in noise if x > 0.1]
    return (
        f"machine: other processes used median {statistics.median(x for x, _ in noise):.2f} cores during the "
        f"cells, max {noise[-1][0]:.2f} ({noise[-1][1]}); {len(busy)} of {len(noise)} cells over 0.1 core; "
        f"load {info['load_before'][0]:.2f} before the run; waited {sum(waits):.0f} s for idle servers"
    )


def report_dtypes(args, info, med: dict, runs: dict, total_s: float, write_record, startup: dict) -> None:
    """--backbone-dtypes: each dtype's ASGI server (and direct bank), and the int8 / float32 ratios."""
    dts = list(args.backbone_dtypes) + [f"{d}-variant" for d in args.backbone_dtypes if args.variant_env]
    per = {c: max(2, math.ceil(args.requests / c)) for c in args.concurrency}
    print(
        f"\n{args.model} ({args.weights}) at {args.img_size}px, {N_TASKS} MiMi tasks loaded; `mimi serve` once per "
        f"backbone dtype; max batch {args.max_batch}, wait {args.wait_ms:g} ms; torch threads {args.threads}"
    )
    for k, lines in startup.items():
        print(f"  {k}: " + " | ".join(lines))
    print(
        "requests per cell: "
        + ", ".join(f"{c} clients x {per[c]}" for c in args.concurrency)
        + f", bound {args.seconds:g} s; median of {args.repeats} interleaved repeats; lost = total over repeats"
    )
    head = f"{'mix':<10} {'clients':>7} |"
    for d in dts:
        head += f" {d + ' req/s':>14} {'p50':>6} {'p95':>6} {'lost':>4} {'batch':>5} |"
    both = {"float32", "int8"} <= set(dts)
    direct_dts = args.backbone_dtypes
    print(
        head
        + (f" {'int8/fp32':>9} {'min':>5} |" if both else "")
        + "".join(f" {d + ' direct':>14}" for d in direct_dts)
    )
    ratios: dict[str, dict] = {}
    for mix_name in args.mixes:
        for c in args.concurrency:
            line = f"{mix_name:<10} {c:>7} |"
            for d in dts:
                s = med[f"asgi-{d}|{c}|{mix_name}"]
                line += (
                    f" {s['requests_per_s']:14.1f} {s['p50_ms']:6.0f} {s['p95_ms']:6.0f} {s['lost']:>4}"
                    f" {s['mean_batch']:5.1f} |"
                )
            if both:
                f32, i8 = (runs[f"asgi-{d}|{c}|{mix_name}"] for d in ("float32", "int8"))
                per_repeat = [b["requests_per_s"] / a["requests_per_s"] for a, b in zip(f32, i8)]
                rs = {d: med[f"asgi-{d}|{c}|{mix_name}"]["requests_per_s"] for d in ("float32", "int8")}
                direct = {d: med[f"direct-{d}|{mix_name}"]["images_per_s"] for d in ("float32", "int8")}
                ratios[f"{c}|{mix_name}"] = {
                    "clients": c,
                    "mix": mix_name,
                    "requests_per_s": rs,
                    "int8_over_float32": rs["int8"] / rs["float32"],
                    "per_repeat": per_repeat,
                    "median_per_repeat": statistics.median(per_repeat),
                    "min_per_repeat": min(per_repeat),
                    "direct_images_per_s": direct,
                    "direct_int8_over_float32": direct["int8"] / direct["float32"],
                    "server_over_direct": {d: rs[d] / direct[d] for d in rs},
                }
                line += f" {rs['int8'] / rs['float32']:9.2f} {min(per_repeat):5.2f} |"
            if c == args.concurrency[0]:
                line += "".join(f" {med[f'direct-{d}|{mix_name}']['images_per_s']:14.1f}" for d in direct_dts)
            print(line)
    print(
        "(latencies in ms; batch: mean requests per backbone pass; int8/fp32: ratio of the medians' req/s, min: the "
        "lowest ratio of one repeat; direct: the bank called in this process, img/s)"
    )
    if ratios:
        print("\nserver req/s over its own bank's direct img/s; direct int8/float32:")
        for r in ratios.values():
            sod = r["server_over_direct"]
            print(
                f"  {r['mix']:<10} {r['clients']:>4} clients: float32 x{sod['float32']:.2f}, int8 x{sod['int8']:.2f}; "
                f"direct int8/float32 x{r['direct_int8_over_float32']:.2f}"
            )
    if args.variant_env:
        variant = " ".join(f"{k}={v}" for k, v in args.variant_env)
        print(f"\nplain server over the variant ({variant}), req/s (median; min of a repeat):")
        for mix_name in args.mixes:
            for c in args.concurrency:
                parts = []
                for d in args.backbone_dtypes:
                    a, b = runs[f"asgi-{d}-variant|{c}|{mix_name}"], runs[f"asgi-{d}|{c}|{mix_name}"]
                    per_repeat = [y["requests_per_s"] / x["requests_per_s"] for x, y in zip(a, b)]
                    m_a, m_b = (med[f"asgi-{k}|{c}|{mix_name}"]["requests_per_s"] for k in (f"{d}-variant", d))
                    ratios.setdefault(f"{c}|{mix_name}", {}).setdefault("plain_over_variant", {})[d] = {
                        "ratio": m_b / m_a,
                        "per_repeat": per_repeat,
                    }
                    parts.append(f"{d} x{m_b / m_a:.2f} ({min(per_repeat):.2f})")
                if both:
                    f32, i8 = (med[f"asgi-{d}-variant|{c}|{mix_name}"]["requests_per_s"] for d in ("float32", "int8"))
                    ratios[f"{c}|{mix_name}"]["int8_over_float32_variant"] = i8 / f32
                    parts.append(f"int8/fp32 both variant x{i8 / f32:.2f}")
                print(f"  {mix_name:<10} {c:>4} clients: " + ", ".join(parts))
    lost = {d: sum(med[f"asgi-{d}|{c}|{m}"]["lost"] for c in args.concurrency for m in args.mixes) for d in dts}
    print("\nlost requests: " + ", ".join(f"{d} {n}" for d, n in lost.items()))
    print(noise_line(info, runs))
    print(f"whole run {total_s / 60:.1f} min")
    out = args.out or RESULTS / "perf" / ("serve_int8_quick.json" if args.quick else "serve_int8.json")
    cells = [
        {
            "server": "asgi",
            "backbone_dtype": d.removesuffix("-variant"),
            "env": dict(args.variant_env) if d.endswith("-variant") else {},
            "clients": c,
            "mix": m,
            **med[f"asgi-{d}|{c}|{m}"],
        }
        for m in args.mixes
        for c in args.concurrency
        for d in dts
    ]
    direct = {d: {m: med[f"direct-{d}|{m}"] for m in args.mixes} for d in direct_dts}
    write_record(
        out,
        argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "stdlib_child"}),
        info,
        stack=_stack(),
        startup=startup,
        requests_per_client=per,
        cells=cells,
        direct=direct,
        ratios=ratios,
        lost=lost,
        total_s=total_s,
        runs=runs,
    )


def report(args, info, med: dict, runs: dict, total_s: float, write_record) -> None:
    per = {c: max(2, math.ceil(args.requests / c)) for c in args.concurrency}
    print(
        f"\n{args.model} ({args.weights}) at {args.img_size}px, {N_TASKS} MiMi tasks loaded; max batch "
        f"{args.max_batch}, wait {args.wait_ms:g} ms; torch threads {args.threads} (servers and direct)"
    )
    print(
        "requests per cell: "
        + ", ".join(f"{c} clients x {per[c]}" for c in args.concurrency)
        + f", bound {args.seconds:g} s; median of {args.repeats} interleaved repeats; lost = total over repeats"
    )
    head = f"{'mix':<10} {'clients':>7} |"
    for k in SERVERS:
        head += f" {k + ' req/s':>12} {'p50':>6} {'p95':>6} {'p99':>6} {'lost':>4} {'batch':>5} |"
    print(head + f" {'direct img/s':>12}")
    for mix_name in args.mixes:
        d = med[f"direct|{mix_name}"]["images_per_s"]
        for c in args.concurrency:
            line = f"{mix_name:<10} {c:>7} |"
            for k in SERVERS:
                s = med[f"{k}|{c}|{mix_name}"]
                line += (
                    f" {s['requests_per_s']:12.1f} {s['p50_ms']:6.0f} {s['p95_ms']:6.0f} {s['p99_ms']:6.0f}"
                    f" {s['lost']:>4} {s['mean_batch']:5.1f} |"
                )
            print(line + (f" {d:12.1f}" if c == args.concurrency[0] else ""))
    print("(latencies in ms; batch: mean requests per backbone pass, from the server's own counters)")

    ratios: dict[str, dict[str, float]] = {}
    ref = 32 if 32 in args.concurrency else max(args.concurrency)
    print(f"\nat {ref} clients: server req/s / direct img/s (and the ASGI server's share of the wall in the model)")
    for mix_name in args.mixes:
        d = med[f"direct|{mix_name}"]["images_per_s"]
        a, s = med[f"asgi|{ref}|{mix_name}"], med[f"stdlib|{ref}|{mix_name}"]
        ratios[mix_name] = {
            "asgi": a["requests_per_s"] / d,
            "stdlib": s["requests_per_s"] / d,
            "asgi_over_stdlib": a["requests_per_s"] / s["requests_per_s"],
        }
        print(
            f"  {mix_name:<10} asgi x{ratios[mix_name]['asgi']:.2f}  stdlib x{ratios[mix_name]['stdlib']:.2f}  "
            f"asgi/stdlib x{ratios[mix_name]['asgi_over_stdlib']:.2f}  asgi model busy {a.get('model_busy', 0):.0%}  "
            f"cpu ms/req: asgi {a['server_cpu_ms_per_req']:.1f}, stdlib {s['server_cpu_ms_per_req']:.1f}, "
            f"clients {a['client_cpu_ms_per_req']:.2f}; direct {1000 / d:.1f} ms/img"
        )
    lost = {k: sum(med[f"{k}|{c}|{m}"]["lost"] for c in args.concurrency for m in args.mixes) for k in SERVERS}
    worst = min(ratios.values(), key=lambda r: r["asgi"])["asgi"]
    targets = {
        "no_request_lost": {
            "target": "asgi: 0 lost at every concurrency and mix",
            "asgi_lost": lost["asgi"],
            "stdlib_lost": lost["stdlib"],
            "met": lost["asgi"] == 0,
        },
        "asgi_over_direct_at_32": {
            "target": f">= {TARGET_RATIO}x the bank's direct img/s at {ref} clients, every mix",
            "worst": worst,
            "met": worst >= TARGET_RATIO,
        },
    }
    print("\ntargets:")
    print(
        f"  no request lost (asgi): {lost['asgi']} lost -> {'MET' if lost['asgi'] == 0 else 'MISSED'}"
        f"   (stdlib: {lost['stdlib']} lost)"
    )
    for k in SERVERS:
        reasons = sorted({x for c in args.concurrency for m in args.mixes for x in med[f"{k}|{c}|{m}"]["lost_reasons"]})
        if reasons:
            print(f"    {k} lost requests: {', '.join(reasons)}")
    print(
        f"  asgi >= {TARGET_RATIO}x direct at {ref} clients: worst x{worst:.2f} -> "
        f"{'MET' if worst >= TARGET_RATIO else 'MISSED'}"
    )
    print("\n" + noise_line(info, runs))
    print(f"whole run {total_s / 60:.1f} min")
    out = args.out or RESULTS / "perf" / ("serve_quick.json" if args.quick else "serve.json")
    cells = [
        {"server": k, "clients": c, "mix": m, **med[f"{k}|{c}|{m}"]}
        for m in args.mixes
        for c in args.concurrency
        for k in SERVERS
    ]
    direct = {m: med[f"direct|{m}"] for m in args.mixes}
    write_record(
        out,
        argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "stdlib_child"}),
        info,
        stack=_stack(),
        requests_per_client=per,
        cells=cells,
        direct=direct,
        ratios_at_32=ratios,
        targets=targets,
        total_s=total_s,
        runs={k: v for k, v in runs.items()},
    )


if __name__ == "__main__":
    main()
