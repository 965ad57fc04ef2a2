"""Atomic file writes: a file is either the old version or the complete new one, never half-written."""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"

# Flags of the temporary file: O_EXCL so a name already taken is never reused (tempfile.mkstemp's guarantee),
# O_NOFOLLOW so a planted symlink is not followed, O_CLOEXEC so a child process does not inherit the descriptor.
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_TMP_TRIES = 100  # names are 48 random bits: a clash is a once-in-a-lifetime event, 100 in a row is impossible


def _create_temp(path: Path) -> tuple[Path, int]:
    """Create an empty temporary file beside ``path`` (``.<name>.<random>.tmp``); return it and its mode.

    Unlike ``tempfile.mkstemp`` (mode 0600), the file is created with mode 0666 and the kernel applies the
    process umask (and a folder's default ACL), so its mode is the one ``open(path, "w")`` would give a new file:
    0644 under umask 022. That mode is read back from the file rather than computed from ``os.umask``, which can
    only be read by setting it, racing with other threads that create files meanwhile.
    """
    for _ in range(_TMP_TRIES):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")
        try:
            fd = os.open(tmp, _TMP_FLAGS, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(f"no free temporary file name beside {path} after {_TMP_TRIES} tries")


def _fsync(path: str | Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it into place.

    After a crash at any point the file is either its old version or the complete new one, and on disk: the data
    is flushed before the rename, and the folder entry after it. A failed write (disk full) removes the temporary
    file and leaves the old version as it was.

    The new file gets the mode a plain ``open(path, "w")`` of a new file gives (``0o666 & ~umask``), whatever the
    mode of the version it replaces.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _create_temp(path)
    try:
        write(tmp)
        # A writer may replace the file instead of filling it: safetensors' save_file writes its own 0600
        # temporary file and renames it over ours. Put the mode of a plainly created file back.
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        _fsync(path.parent, directory=True)
    except OSError:  # some file systems cannot fsync a folder; the rename itself is still atomic
        pass
    return path


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete temporary files :func:`atomic_write` left behind when its process was killed mid-write."""
    stale = [p for p in Path(folder).rglob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` on a hidden temporary folder beside ``path``, fsync its files, then rename it into place.

    A failed ``write`` removes the temporary folder and leaves ``path`` as it was. A folder already at ``path`` is
    moved aside first and removed after the rename: a reader sees the old folder or the complete new one (or, for
    an instant, none), never a half-written one. The caller decides whether ``path`` may be replaced.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.{secrets.token_hex(6)}.old")
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)  # put the old folder back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    try:
        _fsync(path.parent, directory=True)
    except OSError:
        pass
    return path
