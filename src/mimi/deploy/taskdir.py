"""A folder of task files followed while serving: a file that appears is added, one that disappears is removed,
one that changes is replaced (task name = file stem). A PEFT LoRA folder inside it is a task too (name = folder
name; it changes when its ``adapter_config.json`` or ``adapter_model.safetensors`` does).

:class:`TaskDir` only compares listings; the server applies the changes through its batcher, between batches. A
file that cannot be added is logged and counted by the server, and not tried again until it changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mimi.core.errors import ConfigError

SUFFIXES = (".safetensors",)
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")  # as in mimi.deploy.peft_folder (kept light here)


@dataclass(frozen=True)
class Change:
    """``kind`` is ``add``, ``replace`` or ``remove``; ``path`` is None for a removal."""

    kind: str
    task: str
    path: Path | None


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        if path.is_dir():  # a PEFT folder: its two files together
            stats = [(path / name).stat() for name in PEFT_FILES]
            return max(st.st_mtime_ns for st in stats), sum(st.st_size for st in stats)
        st = path.stat()
    except OSError:  # removed between the listing and the stat
        return None
    return st.st_mtime_ns, st.st_size


def _is_task(p: Path) -> bool:
    if p.name.startswith("."):  # hidden files include the temporary files of an atomic write in progress
        return False
    if p.is_dir():
        return (p / PEFT_FILES[0]).is_file()
    return p.suffix in SUFFIXES and p.is_file()


class TaskDir:
    """The task files of one folder, and what changed since the last :meth:`scan`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f"--task-dir {self.folder}: no such folder; create it or point at the task files")
        self.seen: dict[str, tuple[Path, tuple[int, int]]] = {}

    def listing(self) -> dict[str, tuple[Path, tuple[int, int]]]:
        out = {}
        for p in sorted(self.folder.iterdir()):
            if not _is_task(p):
                continue
            stamp = _stamp(p)
            if stamp is not None:
                out[p.name if p.is_dir() else p.stem] = (p, stamp)
        return out

    def scan(self) -> list[Change]:
        """The changes since the last scan (all files as ``add`` on the first), in name order."""
        now = self.listing()
        changes = [Change("remove", t, None) for t in sorted(set(self.seen) - set(now))]
        for task, (path, stamp) in now.items():
            if task not in self.seen:
                changes.append(Change("add", task, path))
            elif self.seen[task][1] != stamp:
                changes.append(Change("replace", task, path))
        self.seen = now
        return changes
