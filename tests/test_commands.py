"""Pipeline sub-commands come from the registry in e2_adapter.commands, imported only when they run."""
import sys

import pytest

from e2_adapter import cli, commands


def test_pipelines_are_registered_not_imported():
    for name in ("caption", "cir"):
        sys.modules.pop(f"integrations.{'captioning' if name == 'caption' else name}.cli", None)
    parser = cli.build_parser()
    names = parser._subparsers._group_actions[0].choices
    assert {"caption", "cir"} <= set(names)
    assert "integrations.captioning.cli" not in sys.modules and "integrations.cir.cli" not in sys.modules
    assert commands.commands()["cir"].target == "integrations.cir.cli:main"


def test_a_registered_command_gets_its_own_argv(monkeypatch):
    seen = []
    module = type(sys)("fake_pipeline")
    module.main = lambda argv: seen.append(list(argv))
    monkeypatch.setitem(sys.modules, "fake_pipeline", module)
    monkeypatch.setattr(commands, "_registered", {})
    commands.register("fake", "fake_pipeline:main", "a test pipeline")
    cli.main(["fake", "run", "--anything", "x", "-h"])
    assert seen == [["run", "--anything", "x", "-h"]]
    commands.register("train", "fake_pipeline:main")
    with pytest.raises(ValueError, match="clashes with a built-in"):
        cli.build_parser()
