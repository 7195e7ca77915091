"""The registry of pipeline sub-commands (``e2-adapter caption ...``, ``e2-adapter cir ...``).

A downstream pipeline owns its command line: a ``main(argv) -> int | None`` in its own package. It
registers under a name here, and ``e2_adapter.cli`` only looks the name up, so neither the CLI nor
this module imports a pipeline until its command runs, and the pipeline never imports the CLI.

Two ways in, both ``"module:function"`` strings resolved on first use:

- the entry-point group ``e2_adapter.commands`` (``pyproject.toml``):
  ``[project.entry-points."e2_adapter.commands"] mycmd = "mypkg.cli:main"`` (an installed plug-in);
- ``register("mycmd", "mypkg.cli:main", "what it does")`` at run time (tests, scripts).

``BUILTIN`` lists this repository's own pipelines, for a checkout whose installed metadata predates
the entry points (an older editable install); the installed entry points win over it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Sequence

GROUP = "e2_adapter.commands"


@dataclass(frozen=True)
class Command:
    name: str
    target: str          # "module:function", the function taking argv
    help: str = ""

    def load(self) -> Callable[[Sequence[str]], object]:
        module, _, name = self.target.partition(":")
        if not module or not name:
            raise ValueError(f"command {self.name!r}: expected module:function, got {self.target!r}")
        return getattr(importlib.import_module(module), name)


BUILTIN = (
    Command("caption", "integrations.captioning.cli:main", "zero-shot captioning (CapDec / DeCap) with any encoder"),
    Command("cir", "integrations.cir.cli:main", "composed image retrieval (CIReVL, Pic2Word) with any encoder"),
)
_registered: dict[str, Command] = {}


def register(name: str, target: str, help: str = "") -> Command:
    """Add (or replace) a sub-command; ``target`` is ``"module:function"``."""
    command = Command(name, target, help)
    _registered[name] = command
    return command


def _entry_points() -> dict[str, Command]:
    from importlib.metadata import entry_points
    return {ep.name: Command(ep.name, ep.value) for ep in entry_points(group=GROUP)}


def commands() -> dict[str, Command]:
    """Every registered sub-command by name: built-ins, then installed entry points, then ``register``."""
    found = {c.name: c for c in BUILTIN}
    for name, command in _entry_points().items():
        found[name] = Command(name, command.target, found[name].help if name in found else command.help)
    found.update(_registered)
    return found
