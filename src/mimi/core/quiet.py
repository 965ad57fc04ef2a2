"""Quiet imports: torchao, which transformers and PEFT import where it is installed, logs notes about its pytree
registrations at import time (torch's ``torch.utils._pytree`` logger); a user of mimi has nothing to do about them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_pytree_notes() -> Iterator[None]:
    """Silence ``torch.utils._pytree`` below ERROR while the block runs (around an import of torchao, transformers
    or peft); its level is restored after."""
    log = logging.getLogger("torch.utils._pytree")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
