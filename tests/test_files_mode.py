"""Files written by mimi take the mode a plain ``open()`` gives (0o666 & ~umask), not tempfile's 0600.

A run folder, an exported task file or a plot must be readable by a teammate on a shared machine (umask 022).
Every test sets the umask it needs and restores the previous one, so the rest of the session is unaffected.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit

import mimi
from mimi.core.files import TMP_SUFFIX, atomic_write, atomic_write_json, atomic_write_text, remove_stale_temp_files


@pytest.fixture
def umask():
    """``umask(value)`` sets the process umask for this test; the old one is put back afterwards."""
    old = os.umask(0o022)
    os.umask(old)

    def set_umask(value: int) -> None:
        os.umask(value)

    yield set_umask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664), (0o000, 0o666)])
def test_written_file_mode_follows_umask(tmp_path, umask, mask, expected):
    umask(mask)
    out = atomic_write_text(tmp_path / "a.txt", "hello\n")
    assert _mode(out) == expected
    # What a plain open() gives is the reference: the two must agree whatever the umask.
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert _mode(out) == _mode(plain)


def test_replacing_a_file_gives_the_umask_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "summary.json"
    path.write_text("{}")
    path.chmod(0o600)  # e.g. written by an older mimi through tempfile.mkstemp
    atomic_write_json(path, {"a": 1})
    assert _mode(path) == 0o644 and path.read_text() == '{\n  "a": 1\n}\n'


def test_writer_that_replaces_the_temp_file(tmp_path, umask):
    """safetensors' save_file renames its own 0600 temporary file over the path it is given; the mode is put back."""
    umask(0o022)

    def replace(tmp: Path) -> None:
        other = tmp.with_name("other")
        fd = os.open(other, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"data")
        os.close(fd)
        os.replace(other, tmp)

    out = atomic_write(tmp_path / "t.bin", replace)
    assert _mode(out) == 0o644 and out.read_bytes() == b"data"


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, umask):
    umask(0o022)
    path = atomic_write_text(tmp_path / "x.txt", "old")

    def boom(tmp: Path) -> None:
        assert tmp.name.startswith(".x.txt.") and tmp.name.endswith(TMP_SUFFIX)  # remove_stale_temp_files' pattern
        assert _mode(tmp) == 0o644  # the temporary file is created with the final mode, before any data
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, boom)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_stale_temp_file_is_found_by_remove_stale_temp_files(tmp_path):
    seen: list[Path] = []

    class Killed(BaseException):  # stands for a SIGKILL: nothing after the write runs
        pass

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("partial")
        raise Killed

    with pytest.raises(Killed):
        atomic_write(tmp_path / "y.json", write)
    # BaseException cleanup removed it; a real kill leaves it, which is what remove_stale_temp_files is for.
    seen[0].write_text("left by a killed process")
    assert remove_stale_temp_files(tmp_path) == [seen[0]]


def test_concurrent_writers_of_one_path(tmp_path, umask):
    """Threads writing the same file never share a temporary name and each rename is whole."""
    umask(0o022)
    path = tmp_path / "shared.txt"
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                atomic_write_text(path, f"{i}\n" * 100)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    lines = path.read_text().splitlines()
    assert len(lines) == 100 and len(set(lines)) == 1
    assert _mode(path) == 0o644 and [p.name for p in tmp_path.iterdir()] == ["shared.txt"]


def test_save_adapters_is_group_and_world_readable(tmp_path, umask):
    umask(0o022)
    torch.manual_seed(0)
    model = tiny_vit()
    mimi.add_adapters(model, mimi.AdapterConfig(hidden_dim=4))
    out = mimi.save_adapters(model, tmp_path / "task.safetensors")
    assert _mode(Path(out)) == 0o644
