"""The HTTP server over an adapter bank: a Starlette app, run by uvicorn (`mimi serve`).

    POST /predict?task=NAME[&topk=K]   body: an image file, or a multipart/form-data upload (field ``file``)
                                       -> {"task", "ids", "names", "probs", "predictions": [{"label", "id", "score"}]}
    GET  /tasks                        -> per task: method, parameters, bytes, classes (``AdapterBank.info``)
    GET  /health                       -> {"ok": true, "tasks": [...], "requests": N, "batches": M,
                                           "backbone_dtype": "float32" | "int8"} (liveness)
    GET  /ready                        -> 200 once the backbone and tasks are loaded; 503 before, and while draining
    GET  /metrics                      -> Prometheus text format (see :mod:`mimi.deploy.metrics`)
    GET  /                             -> a page to try it in a browser
    PUT  /tasks/NAME, DELETE /tasks/NAME   add (body: a task file) or remove a task; only with ``admin_token``
                                       (``Authorization: Bearer TOKEN``)

Concurrent requests for any tasks are run as one batch by an :class:`~mimi.deploy.batcher.AsyncBatcher` (the
frozen backbone runs once per batch). Images are decoded off the event loop, bounded in bytes and in pixels;
JPEGs are decoded at reduced size (PIL's draft mode) when the bank needs far fewer pixels. Errors are JSON
``{"error": "..."}``: 400 (unknown task, bad topk, not an image), 401/403 (admin API), 404, 405, 408 (a body that
stalls past the request timeout), 411, 413 (too many bytes or pixels), 503 (queue full, with ``Retry-After``; or not
ready), 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from mimi.core.errors import ConfigError, MimiError
from mimi.deploy.bank import AdapterBank
from mimi.deploy.batcher import AsyncBatcher, QueueFull
from mimi.deploy.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from mimi.deploy.taskdir import TaskDir

logger = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("static") / "index.html"


@dataclass
class ServeOptions:
    """How the server bounds its work and follows its tasks (the flags of `mimi serve`)."""

    max_batch: int = 32
    batch_wait_ms: float = 5.0
    max_queue: int = 1024
    max_image_bytes: int = 20_000_000
    max_image_pixels: int = 40_000_000
    request_timeout: float = 60.0
    task_dir: Path | None = None
    poll_seconds: float = 2.0
    admin_token: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.max_batch >= 1, "--max-batch must be >= 1"),
            (self.batch_wait_ms >= 0, "--batch-wait-ms must be >= 0"),
            (self.max_queue >= 1, "--max-queue must be >= 1"),
            (self.max_image_bytes >= 1, "--max-image-bytes must be >= 1"),
            (self.max_image_pixels >= 1, "--max-image-pixels must be >= 1"),
            (self.request_timeout > 0, "--request-timeout must be > 0"),
            (self.poll_seconds > 0, "--poll-seconds must be > 0"),
            (self.admin_token is None or len(self.admin_token) >= 8, "--admin-token must be 8 characters or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


class _Refused(Exception):
    """A request answered with an error status before it reaches the model."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BankService:
    """The state behind the app: the bank, its batcher, the metrics, readiness and the followed task folder."""

    def __init__(self, bank: AdapterBank, options: ServeOptions | None = None) -> None:
        self.bank, self.options = bank, options or ServeOptions()
        self.metrics = ServerMetrics()
        self.batcher: AsyncBatcher | None = None
        self.ready = False
        self.draining = False
        self.taskdir = TaskDir(self.options.task_dir) if self.options.task_dir is not None else None
        self._failed: dict[str, tuple[int, int]] = {}  # task-dir files that could not be added, by stamp
        self._uploads = Path(tempfile.mkdtemp(prefix="mimi-serve-")) if self.options.admin_token else None
        self._poller: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        o = self.options
        self.batcher = AsyncBatcher(
            self.bank, max_batch=o.max_batch, wait_ms=o.batch_wait_ms, max_queue=o.max_queue, on_batch=self._on_batch
        )
        self.metrics.tasks_loaded.set(len(self.bank))
        self._poller = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        self.set_draining()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self.batcher is not None:
            await run_in_threadpool(self.batcher.close)  # answers whatever is still queued
        if self._uploads is not None:
            shutil.rmtree(self._uploads, ignore_errors=True)

    def set_draining(self) -> None:
        self.draining = True
        self.metrics.ready.set(0)

    def _on_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.batch_seconds.observe(seconds)

    async def _follow(self) -> None:
        """Load the task folder (the server is ready after its first pass), then follow it every poll interval."""
        try:
            while True:
                if self.taskdir is not None:
                    await self._apply(await run_in_threadpool(self.taskdir.scan))
                if not self.ready and not self.draining:
                    self.ready = True
                    self.metrics.ready.set(1)
                    logger.info(f"ready: {len(self.bank)} tasks")
                if self.taskdir is None:
                    return
                await asyncio.sleep(self.options.poll_seconds)
        except asyncio.CancelledError:
            raise
        except Exception:  # a crashed poller would silently stop following the folder: say so loudly
            logger.exception("the task folder is no longer followed")
            raise

    async def _apply(self, changes) -> None:
        assert self.batcher is not None
        for c in changes:
            if c.kind == "remove":
                if c.task in self.bank:
                    await asyncio.wrap_future(self.batcher.change(lambda b, t=c.task: b.remove(t)))
                    logger.info(f"task {c.task} removed (its file is gone)")
                self._failed.pop(c.task, None)
                continue
            try:
                await asyncio.wrap_future(self.batcher.change(lambda b, c=c: b.add(c.task, c.path, replace=True)))
            except MimiError as e:
                self.metrics.task_load_failures.inc()
                logger.warning(f"task file {c.path} not added: {e}")
                continue
            logger.info(f"task {c.task} {'added' if c.kind == 'add' else 'replaced'} from {c.path}")
        self.metrics.tasks_loaded.set(len(self.bank))

    # ------------------------------------------------------------------ requests

    async def read_image(self, request: Request) -> bytes:
        """The image bytes of a request: its body, or the ``file`` field of a multipart upload."""
        limit = self.options.max_image_bytes
        length = request.headers.get("content-length")
        chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
        if length is None and not chunked:
            raise _Refused(411, "send the image with a Content-Length header")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise _Refused(413, f"a body of {length} bytes; the limit is {limit:,} (--max-image-bytes)")
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                return await asyncio.wait_for(self._form_file(request), self.options.request_timeout)
            return await asyncio.wait_for(self._body(request, limit), self.options.request_timeout)
        except TimeoutError:
            raise _Refused(408, f"the body did not arrive within {self.options.request_timeout:g} s") from None

    @staticmethod
    async def _body(request: Request, limit: int) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # a chunked body has no length to check up front
                raise _Refused(413, f"a body over {limit:,} bytes (--max-image-bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _form_file(self, request: Request) -> bytes:
        form = await request.form(max_files=1, max_fields=16, max_part_size=self.options.max_image_bytes)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise _Refused(400, "a multipart upload needs its image in the field 'file' (curl -F file=@image.png)")
        return await upload.read()

    def decode(self, data: bytes):
        """Image bytes -> uint8 pixels ``(3, H, W)`` (the batcher normalises the batch); runs in a worker thread."""
        if not data:
            raise _Refused(400, "empty body; POST an image file (JPEG, PNG, ...)")
        try:
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > self.options.max_image_pixels:  # checked before any pixel is decoded
                    raise _Refused(
                        413,
                        f"an image of {w}x{h} pixels; the limit is {self.options.max_image_pixels:,} "
                        "(--max-image-pixels)",
                    )
                if img.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale when the bank needs far fewer pixels
                    img.draft("RGB", (self.bank.img_size, self.bank.img_size))
                return self.bank.pixels([img])[0]
        except UnidentifiedImageError:
            raise _Refused(
                400, "the body is not an image file PIL can read; POST the file's bytes (JPEG, PNG, ...)"
            ) from None
        except (OSError, ValueError, Image.DecompressionBombError, MimiError) as e:
            raise _Refused(400, f"cannot read the image: {e}") from None

    async def predict(self, request: Request) -> Response:
        start = time.perf_counter()
        task = request.query_params.get("task", "")
        try:
            response = await self._predict(request, task)
        except _Refused as e:
            response = _error(e.status, str(e), e.headers)
        label = task if task in self.bank else "unknown"  # no label per misspelt name: bounded cardinality
        self.metrics.requests.labels(task=label, status=str(response.status_code)).inc()
        self.metrics.latency.observe(time.perf_counter() - start)
        return response

    async def _predict(self, request: Request, task: str) -> Response:
        if not self.ready or self.draining or self.batcher is None:
            raise _Refused(503, "the server is not ready (loading tasks, or shutting down)", {"Retry-After": "1"})
        topk = request.query_params.get("topk", "1")
        if task not in self.bank:
            held = ", ".join(self.bank.tasks) or "no tasks yet"
            raise _Refused(400, f"unknown task {task!r}; this server holds {held} (?task=NAME)")
        if not topk.isdigit() or int(topk) < 1:
            raise _Refused(400, f"topk must be a positive integer, got {topk!r}")
        data = await self.read_image(request)
        x = await run_in_threadpool(self.decode, data)
        try:
            self.metrics.queue_depth.set(self.batcher.depth)
            result = await self.batcher.submit(x, task, int(topk))
        except QueueFull as e:
            raise _Refused(503, f"the server is busy: {e}; retry shortly", {"Retry-After": "1"}) from None
        except KeyError:
            raise _Refused(400, f"task {task!r} was removed while the request waited; it is no longer served") from None
        except MimiError as e:
            raise _Refused(400, str(e)) from None
        finally:
            self.metrics.queue_depth.set(self.batcher.depth)
        names = result["names"]
        result["predictions"] = [
            {"label": names[k] if names else str(i), "id": i, "score": p}
            for k, (i, p) in enumerate(zip(result["ids"], result["probs"]))
        ]
        return JSONResponse(result)

    # ------------------------------------------------------------------ the admin API

    def _authorize(self, request: Request) -> None:
        token = self.options.admin_token
        if token is None:
            raise _Refused(403, "the admin API is off; start the server with --admin-token to add or remove tasks")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise _Refused(
                401, "missing or wrong admin token (Authorization: Bearer TOKEN)", {"WWW-Authenticate": "Bearer"}
            )

    async def put_task(self, request: Request) -> Response:
        try:
            self._authorize(request)
            name = request.path_params["name"]
            data = await self._body(request, 64 * self.options.max_image_bytes)
            assert self._uploads is not None and self.batcher is not None
            path = self._uploads / f"{name}.{time.monotonic_ns()}.safetensors"
            path.write_bytes(data)
            try:
                await asyncio.wrap_future(self.batcher.change(lambda b: b.add(name, path, replace=True)))
            except MimiError as e:
                self.metrics.task_load_failures.inc()
                raise _Refused(400, f"task {name!r} not added: {e}") from None
            finally:
                path.unlink(missing_ok=True)  # the bank holds the tensors now
            self.metrics.tasks_loaded.set(len(self.bank))
            return JSONResponse({"task": name, "tasks": self.bank.tasks})
        except _Refused as e:
            return _error(e.status, str(e), e.headers)

    async def delete_task(self, request: Request) -> Response:
        try:
            self._authorize(request)
            name = request.path_params["name"]
            if name not in self.bank:
                raise _Refused(404, f"no task {name!r}; this server holds {', '.join(self.bank.tasks) or 'none'}")
            assert self.batcher is not None
            await asyncio.wrap_future(self.batcher.change(lambda b: b.remove(name)))
            self.metrics.tasks_loaded.set(len(self.bank))
            return JSONResponse({"task": name, "tasks": self.bank.tasks})
        except _Refused as e:
            return _error(e.status, str(e), e.headers)

    # ------------------------------------------------------------------ read-only endpoints

    async def health(self, request: Request) -> Response:
        b = self.batcher
        return JSONResponse(
            {
                "ok": True,
                "tasks": self.bank.tasks,
                "requests": b.requests if b else 0,
                "batches": b.batches if b else 0,
                "backbone_dtype": self.bank.backbone_dtype,
            }
        )

    async def ready_check(self, request: Request) -> Response:
        if self.ready and not self.draining:
            return JSONResponse({"ready": True, "tasks": len(self.bank)})
        return JSONResponse({"ready": False, "draining": self.draining}, status_code=503, headers={"Retry-After": "1"})

    async def tasks(self, request: Request) -> Response:
        assert self.batcher is not None
        info: dict[str, Any] = await asyncio.wrap_future(self.batcher.change(lambda b: b.info()))
        return JSONResponse(info)

    async def metrics_text(self, request: Request) -> Response:
        if self.batcher is not None:
            self.metrics.queue_depth.set(self.batcher.depth)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def page(self, request: Request) -> Response:
        return HTMLResponse(PAGE.read_text())


def create_app(service: BankService) -> Starlette:
    """The Starlette app of ``service``: routes, JSON errors, and the batcher started and drained with it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        hint = "GET /, /health, /ready, /tasks, /metrics; POST /predict?task=NAME"
        message = f"no such path {request.url.path}; {hint}" if exc.status_code == 404 else str(exc.detail)
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; {hint}"
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> Response:
        logger.exception(f"{request.method} {request.url.path} failed")
        return _error(500, f"{type(exc).__name__}: {exc}")

    routes = [
        Route("/predict", service.predict, methods=["POST"]),
        Route("/tasks", service.tasks, methods=["GET"]),
        Route("/tasks/{name}", service.put_task, methods=["PUT"]),
        Route("/tasks/{name}", service.delete_task, methods=["DELETE"]),
        Route("/health", service.health, methods=["GET"]),
        Route("/ready", service.ready_check, methods=["GET"]),
        Route("/metrics", service.metrics_text, methods=["GET"]),
        Route("/", service.page, methods=["GET"]),
    ]
    return Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error, Exception: server_error}
    )
