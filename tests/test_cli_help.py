import pytest

from mimi.cli import commands, main

COMMANDS = commands()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"mimi {command}" in capsys.readouterr().out


def test_all_jobs_are_commands():
    assert {"train", "eval", "info", "export", "methods", "data", "demo", "bench", "report", "predict", "serve"} <= set(
        COMMANDS
    )
