import subprocess

import pytest

from pyramid_lb import cli
from tests.processes import BIN


def test_help_lists_the_commands():
    result = subprocess.run(
        [BIN / "pyramid-lb", "--help"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("usage: pyramid-lb")


def test_no_command_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: pyramid-lb" in capsys.readouterr().err


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
