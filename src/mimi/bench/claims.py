"""Run claims: a worker holds an ``flock`` on ``<results>/.claims/<run id>.claim`` while it runs that run, so workers
sharing a results folder (on one host) never run the same run twice; a dead worker's claim is taken over."""

from __future__ import annotations

import fcntl
import os
import platform
import time
from pathlib import Path

_held: dict[str, int] = {}  # run id -> the open, flock-ed descriptor of its claim file, while this process runs it


def claim(results: Path, run_id: str) -> bool:
    """Take ``run_id`` for this process; False if another live worker has it.

    The claim is a file naming ``host pid`` on which this process holds an exclusive ``flock`` until
    :func:`release`, so two workers taking over the same stale claim at once cannot both win (the kernel drops
    a dead worker's lock). A claim left by a dead process of this host is taken over; one from another host is
    respected (delete ``RESULTS/.claims`` by hand after a crash there).
    """
    folder = results / ".claims"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run_id}.claim"
    me = f"{platform.node()} {os.getpid()}"
    for _ in range(3):
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False  # a live worker holds it
        try:
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                os.close(fd)  # released (unlinked) between our open and our lock: look again
                continue
        except FileNotFoundError:
            os.close(fd)
            continue
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
        if holder and holder != me and not _stale_holder(holder):
            os.close(fd)
            return False  # another host's claim, or a live worker of an older version that takes no lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        os.utime(fd)  # "N min so far" counts from now
        _held[run_id] = fd
        return True
    return False


def _stale_holder(holder: str) -> bool:
    """True when ``holder`` ("host pid") names a process of this host that no longer runs."""
    try:
        host, pid = holder.split()
    except ValueError:
        return False
    if host != platform.node():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def _stale(path: Path) -> bool:
    try:
        holder = path.read_text().strip()
    except OSError:
        return False
    return bool(holder) and _stale_holder(holder)


def claimed(results: Path, run_id: str) -> tuple[str, float] | None:
    """Who holds ``run_id`` now and for how many seconds: ``("host pid", seconds)``, or None when nobody does
    (no claim, or one left by a dead process of this host)."""
    path = results / ".claims" / f"{run_id}.claim"
    try:
        holder, since = path.read_text().strip(), path.stat().st_mtime
    except OSError:
        return None
    if not holder or _stale(path):
        return None
    return holder, max(0.0, time.time() - since)


def release(results: Path, run_id: str) -> None:
    """Drop this process's claim on ``run_id``: the file goes first, then the lock (a worker that opened the old
    file meanwhile sees it unlinked and looks again)."""
    fd = _held.pop(run_id, None)
    if fd is None:
        return  # never ours: leave another worker's claim alone
    (results / ".claims" / f"{run_id}.claim").unlink(missing_ok=True)
    os.close(fd)
