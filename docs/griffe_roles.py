"""A griffe extension for mimi's docs: Sphinx cross-reference roles in docstrings (``:class:`AdapterBank```) read as
code in the API pages (`AdapterBank`), instead of showing the role's markup. The source stays as it is."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|mod|meth|data|attr|exc|obj):`~?([^`]+)`")


def _plain(match: re.Match) -> str:
    target = match.group(1)
    shown = target.rsplit(".", 1)[-1] if match.group(0).startswith(":") and "`~" in match.group(0) else target
    return f"`{shown}`"


class SphinxRolesAsCode(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_plain, obj.docstring.value)
