"""Writing files so that a crash never leaves a half-written one under the real name."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path`` in one step.

    The temporary file is named ``.<name>.<random>.tmp``, so a later run can recognise and remove
    what a kill left behind (``training.checkpoint.remove_stale_temporaries``). It is created with
    the permissions a plain ``open`` would give (the umask's), not ``mkstemp``'s owner-only 0600:
    models, indexes and results are meant to be read by the rest of a team."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(path)
    try:
        write(tmp)
        _flush_to_disk(tmp)  # the rename must not reach the disk before the data
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


def _new_temporary(path: Path) -> str:
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 less the umask
        except FileExistsError:
            continue
        return str(tmp)


def _flush_to_disk(path: str) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
