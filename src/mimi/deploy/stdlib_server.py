"""The standard-library HTTP server over an adapter bank (the first `mimi serve`, kept as the baseline that
`benchmarks/serve.py` measures the ASGI server of :mod:`mimi.deploy.asgi` against). Requests that arrive together are run as one batch, whatever their tasks: the frozen backbone runs once per batch (see :mod:`mimi.deploy.routing`).

    POST /predict?task=NAME[&topk=K]   body: one image file (JPEG, PNG, ...)
                                       -> {"task", "ids", "names", "probs"}
    GET  /tasks                        -> per task: method, parameters, bytes, classes (``AdapterBank.info``)
    GET  /health                       -> {"ok": true, "tasks": [...], "requests": N, "batches": M}

Errors are JSON ``{"error": "..."}`` with 400 (bad request: unknown task, bad topk, not an image), 404, 408 (a
body that stalls past the request timeout), 411, 413 (image larger than ``--max-image-bytes``) or 500. The server uses Python's standard library only; put it behind a
reverse proxy for TLS and authentication.
"""

from __future__ import annotations

import io
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch
from PIL import Image, UnidentifiedImageError

from mimi.core.errors import ConfigError, MimiError
from mimi.deploy.bank import AdapterBank


@dataclass
class _Job:
    x: torch.Tensor  # (3, H, W): uint8 pixels (AdapterBank.pixels) or preprocessed
    task: str
    topk: int
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    error: BaseException | None = None


class Batcher:
    """Runs jobs from many request threads through one bank, in mixed-task batches, on one worker thread.

    The worker takes the first waiting job, then whatever else arrives within ``wait_ms`` (up to ``max_batch``
    jobs), and runs them as one batch. Only the worker touches the bank's model.
    """

    def __init__(self, bank: AdapterBank, *, max_batch: int = 32, wait_ms: float = 5.0) -> None:
        if max_batch < 1 or wait_ms < 0:
            raise ConfigError("max_batch must be >= 1 and wait_ms >= 0")
        self.bank, self.max_batch, self.wait = bank, max_batch, wait_ms / 1000
        self.requests = 0
        self.batch_sizes: list[int] = []
        self.busy_s = 0.0  # seconds the worker spent running batches
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="mimi-batcher", daemon=True)
        self._thread.start()

    def submit(self, x: torch.Tensor, task: str, topk: int = 1) -> dict[str, Any]:
        """One image's top-k for ``task`` (uint8 pixels or preprocessed, as ``AdapterBank.stack`` takes); blocks until its batch has run."""
        job = _Job(x, task, topk)
        with self._lock:
            self.requests += 1
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, stop = [job], False
            deadline = time.monotonic() + self.wait
            while len(jobs) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
            self._run(jobs)
            if stop:
                return

    def _run(self, jobs: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            x = self.bank.stack([j.x for j in jobs])
            names = [j.task for j in jobs]
            logits = self.bank.logits(x, names[0]) if len(set(names)) == 1 else self.bank.logits(x, names)
            for j, row in zip(jobs, logits):
                j.result = self.bank.decode(j.task, row, j.topk)
        except BaseException as e:  # every waiting request gets the error, none hangs
            for j in jobs:
                j.error = e
        finally:
            self.busy_s += time.perf_counter() - start
            self.batch_sizes.append(len(jobs))
            for j in jobs:
                j.done.set()


class _Handler(BaseHTTPRequestHandler):
    server: BankServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # a client that stalls mid-request loses its connection
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        if self.server.access_log:
            super().log_message(format, *args)

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message})

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = urlparse(self.path).path
        bank, batcher = self.server.bank, self.server.batcher
        if path == "/health":
            self._send(
                200,
                {"ok": True, "tasks": bank.tasks, "requests": batcher.requests, "batches": len(batcher.batch_sizes)},
            )
        elif path == "/tasks":
            self._send(200, bank.info())
        else:
            self._error(404, f"no such path {path}; GET /health, GET /tasks, POST /predict?task=NAME")

    def do_POST(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        if url.path != "/predict":
            self._error(404, f"no such path {url.path}; POST /predict?task=NAME with an image as the body")
            return
        query = parse_qs(url.query)
        task, topk = query.get("task", [""])[0], query.get("topk", ["1"])[0]
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(411, "send the image with a Content-Length header")
            return
        if int(length) > self.server.max_image_bytes:
            self.close_connection = True  # the body is not read
            self._error(
                413, f"image of {int(length):,} bytes; the limit is {self.server.max_image_bytes:,} (--max-image-bytes)"
            )
            return
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            self.close_connection = True
            self._error(408, f"the body did not arrive within {self.server.request_timeout:g} s")
            return
        if len(body) < int(length):
            self.close_connection = True
            return  # the client went away mid-body: nobody to answer
        if task not in self.server.bank:
            self._error(
                400, f"unknown task {task!r}; this server holds {', '.join(self.server.bank.tasks)} (?task=NAME)"
            )
            return
        if not topk.isdigit() or int(topk) < 1:
            self._error(400, f"topk must be a positive integer, got {topk!r}")
            return
        if not body:
            self._error(400, "empty body; POST an image file (JPEG, PNG, ...)")
            return
        try:
            with Image.open(io.BytesIO(body)) as img:
                x = self.server.bank.pixels([img])[0]
        except UnidentifiedImageError:
            self._error(400, "the body is not an image file PIL can read; POST the file's bytes (JPEG, PNG, ...)")
            return
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            self._error(400, f"cannot read the image: {e}")
            return
        try:
            self._send(200, self.server.batcher.submit(x, task, int(topk)))
        except MimiError as e:
            self._error(400, str(e))
        except Exception as e:  # noqa: BLE001 (the server keeps serving; the client gets the reason)
            self._error(500, f"{type(e).__name__}: {e}")


class BankServer(ThreadingHTTPServer):
    """A threading HTTP server holding one :class:`AdapterBank` and the :class:`Batcher` that runs it.

    ``port=0`` picks a free port (``server.server_address[1]``). ``serve_forever()`` serves; ``close()`` stops
    the batcher and the socket.
    """

    daemon_threads = True

    def __init__(
        self,
        bank: AdapterBank,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        max_batch: int = 32,
        wait_ms: float = 5.0,
        max_image_bytes: int = 20_000_000,
        access_log: bool = False,
        request_timeout: float = 60.0,
    ) -> None:
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host"
            ) from e
        self.bank, self.max_image_bytes, self.access_log = bank, max_image_bytes, access_log
        self.request_timeout = request_timeout
        self.batcher = Batcher(bank, max_batch=max_batch, wait_ms=wait_ms)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self.server_close()
        self.batcher.close()
