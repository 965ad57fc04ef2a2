"""Mixed-task batches for an async server: requests wait in one bounded queue; one worker thread runs them.

The worker takes the first waiting request, then more while they keep coming: it waits ``wait_ms`` for the next one,
again after each arrival, at most ``4 * wait_ms`` in all (and up to ``max_batch``), and runs them as one batch through the bank: the frozen backbone runs once, whatever the tasks. Changes to the
bank (a task added, replaced or removed while serving) go through the same queue, so they happen between
batches, in order: a request queued before a task is removed is answered by that task.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from mimi.core.errors import ConfigError
from mimi.deploy.bank import AdapterBank


class QueueFull(Exception):
    """More requests are waiting than the server accepts (``max_queue``): answer 503 and let the client retry."""


@dataclass
class _Job:
    x: torch.Tensor  # (3, H, W): uint8 pixels (AdapterBank.pixels), normalised with the batch, or preprocessed
    task: str
    topk: int
    future: Future = field(default_factory=Future)


@dataclass
class _Change:
    """A change to the bank, run on the worker thread between batches."""

    fn: Callable[[AdapterBank], Any]
    future: Future = field(default_factory=Future)


_STOP = object()


class AsyncBatcher:
    """Runs requests from an event loop through one bank, in mixed-task batches, on one worker thread.

    Args:
        bank: the bank; only the worker thread touches it once the batcher runs.
        max_batch: most requests in one batch.
        wait_ms: how long the worker waits for another request, after the first and after each arrival (at most
            4x this in all). Clients answered together come back spread out: a fixed window would split them
            over two half-full batches, forever.
        max_queue: most requests waiting (not yet taken into a batch); :meth:`submit` raises :class:`QueueFull`
            past it.
        on_batch: called on the worker thread with each batch's size and seconds (metrics).
    """

    def __init__(
        self,
        bank: AdapterBank,
        *,
        max_batch: int = 32,
        wait_ms: float = 5.0,
        max_queue: int = 1024,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1 or wait_ms < 0 or max_queue < 1:
            raise ConfigError("max_batch and max_queue must be >= 1, wait_ms >= 0")
        self.bank, self.max_batch, self.wait, self.max_queue = bank, max_batch, wait_ms / 1000, max_queue
        self.on_batch = on_batch
        self.requests = 0
        self.batches = 0
        self.busy_s = 0.0  # seconds the worker spent running batches
        self._waiting = 0  # requests queued, not yet in a batch
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="mimi-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return self._waiting

    async def submit(self, x: torch.Tensor, task: str, topk: int = 1) -> dict[str, Any]:
        """One image's top-k for ``task``, awaited without blocking the event loop.

        ``x`` is ``(3, H, W)``: uint8 pixels from :meth:`AdapterBank.pixels` (normalised with the rest of its batch, in
        one operation) or a float image already preprocessed (:meth:`AdapterBank.preprocess`).
        """
        job = _Job(x, task, topk)
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are waiting (--max-queue {self.max_queue})")
            self._waiting += 1
            self.requests += 1
        self._queue.put(job)
        return await asyncio.wrap_future(job.future)

    def change(self, fn: Callable[[AdapterBank], Any]) -> Future:
        """Run ``fn(bank)`` on the worker thread after the requests queued before it; a future of its result."""
        item = _Change(fn)
        self._queue.put(item)
        return item.future

    def close(self) -> None:
        """Answer everything queued, then stop the worker."""
        self._queue.put(_STOP)
        self._thread.join()

    # ------------------------------------------------------------------ the worker thread

    def _take(self) -> tuple[list[_Job], Any]:
        """The next batch of jobs, and the non-job item (a change, or the stop mark) that ended it, if any."""
        first = self._queue.get()
        if not isinstance(first, _Job):
            return [], first
        start = time.monotonic()
        jobs, deadline, cap = [first], start + self.wait, start + 4 * self.wait
        while len(jobs) < self.max_batch:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if not isinstance(nxt, _Job):
                return jobs, nxt  # run the batch first: a change waits for the requests queued before it
            jobs.append(nxt)
            deadline = min(cap, time.monotonic() + self.wait)  # still coming: wait as long again for the next
        return jobs, None

    def _loop(self) -> None:
        while True:
            jobs, other = self._take()
            if jobs:
                with self._lock:
                    self._waiting -= len(jobs)
                self._run(jobs)
            if other is _STOP:
                return
            if isinstance(other, _Change):
                try:
                    other.future.set_result(other.fn(self.bank))
                except BaseException as e:  # noqa: BLE001 (the caller gets the error; the worker goes on)
                    other.future.set_exception(e)

    def _run(self, jobs: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            # a task removed since its request was accepted cannot answer it: those jobs get the error alone
            live = [j for j in jobs if j.task in self.bank]
            for j in jobs:
                if j.task not in self.bank:
                    j.future.set_exception(KeyError(j.task))
            if live:
                x = self.bank.stack([j.x for j in live])  # (B, 3, H, W)
                names = [j.task for j in live]
                logits = self.bank.logits(x, names[0]) if len(set(names)) == 1 else self.bank.logits(x, names)
                for j, row in zip(live, logits):
                    j.future.set_result(self.bank.decode(j.task, row, j.topk))
        except BaseException as e:  # noqa: BLE001 (every waiting request gets the error, none hangs)
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
        finally:
            seconds = time.perf_counter() - start
            self.busy_s += seconds
            self.batches += 1
            if self.on_batch is not None:
                self.on_batch(len(jobs), seconds)
