"""Writing files so that a crash never leaves a half-written one under the real name."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path`` in one step.

    The temporary file is named ``.<name>.<random>.tmp``, so a later run can recognise and remove
    what a kill left behind (``training.checkpoint.remove_stale_temporaries``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
