"""Methods and neuron scores from installed packages, found through entry points.

A package adds a training method or a score by declaring an entry point, e.g. in its ``pyproject.toml``::

    [project.entry-points."mimi.methods"]
    my-method = "my_package.methods:MyMethod"      # a mimi.methods.Method subclass

    [project.entry-points."mimi.scores"]
    my-score = "my_package.scores:my_score"        # a score callable, or a (callable, is_global) pair

The entry point's name is the name the method or score is registered under. Each group is read once per process,
on the first lookup or listing of its registry (:func:`load_entry_points`), so that importing mimi never scans the
installed packages.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from importlib import metadata
from typing import Any

logger = logging.getLogger(__name__)

METHODS_GROUP = "mimi.methods"
SCORES_GROUP = "mimi.scores"

_loaded: set[str] = set()


def load_entry_points(group: str, add: Callable[[str, Any], None]) -> None:
    """Call ``add(name, object)`` for every entry point of ``group``; only the first call per group does anything.

    A plugin that cannot be imported or registered is skipped with a warning naming it: one broken package must not
    make every command fail (a method or score it provides is then reported unknown, with the valid names).

    Args:
        group: entry point group, e.g. :data:`METHODS_GROUP`.
        add: registers one loaded object under the entry point's name; may raise to refuse it.
    """
    if group in _loaded:
        return
    # Marked before loading: a plugin module that looks a name up while it is imported must not load the group again.
    _loaded.add(group)
    seen: dict[str, str] = {}
    for ep in metadata.entry_points(group=group):
        if ep.name in seen:  # the same distribution found twice on sys.path, or two packages claiming one name
            if seen[ep.name] != ep.value:
                warnings.warn(
                    f"plugin {ep.name!r} of {group} is declared twice ({seen[ep.name]} and {ep.value}); "
                    f"keeping {seen[ep.name]}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            continue
        seen[ep.name] = ep.value
        try:
            add(ep.name, ep.load())
        except Exception as e:  # any import or registration error of third-party code
            warnings.warn(
                f"plugin {ep.name!r} ({ep.value}) of {group} not loaded: {type(e).__name__}: {e}",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        logger.debug("loaded plugin %s = %s (%s)", ep.name, ep.value, group)


def reset(group: str | None = None) -> None:
    """Forget that ``group`` (default: every group) was read, so that the next lookup reads its entry points again.

    For tests, and for a process that installs a plugin after its first lookup. Registrations already made stay.
    """
    if group is None:
        _loaded.clear()
    else:
        _loaded.discard(group)
