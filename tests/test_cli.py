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


@pytest.mark.parametrize(
    ("server", "url"),
    [
        pytest.param("listen = *:8080", "http://127.0.0.1:8080", id="any address"),
        pytest.param(
            "listen = localhost:9000", "http://127.0.0.1:9000", id="localhost"
        ),
        pytest.param("listen = 10.0.0.7:80", "http://10.0.0.7:80", id="an address"),
        pytest.param("host = 0.0.0.0\nport = 8081", "http://127.0.0.1:8081", id="host"),
    ],
)
def test_admin_url_from_an_ini_file(tmp_path, server, url):
    ini = tmp_path / "site.ini"
    ini.write_text(f"[server:dispatcher]\nuse = egg:waitress#main\n{server}\n")
    assert cli.admin_url(str(ini)) == url
    assert cli.admin_url("http://lb.example:8080/") == "http://lb.example:8080"


def test_admin_commands_need_a_reachable_dispatcher(capsys, tmp_path):
    assert cli.main(["reload", str(tmp_path / "nothing.ini")]) == 1
    assert "neither a URL nor an ini file" in capsys.readouterr().err
    assert cli.main(["scale", "http://127.0.0.1:9", "2"]) == 1
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err
