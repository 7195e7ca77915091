"""Writing files so that a crash never leaves a half-written one under the real name."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: a reader never sees it empty or half-written."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_options: Any) -> None:
    """``obj`` as JSON (``indent=2`` unless told otherwise, a final newline), written atomically."""
    dump_options.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(obj, **dump_options) + "\n")
