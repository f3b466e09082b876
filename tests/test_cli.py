import argparse
import importlib.metadata
import socket
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


def test_version():
    result = subprocess.run(
        [BIN / "pyramid-lb", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout == f"pyramid-lb {importlib.metadata.version('pyramid_lb')}\n"


def positionals(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for command, positional in positionals(sub):
                    yield f"{name} {command}".strip(), positional
        elif not action.option_strings:
            yield "", action


def test_every_positional_argument_has_help():
    found = list(positionals(cli.build_parser()))
    assert {command for command, _ in found} >= {"serve", "scale", "export"}
    assert [(c, a.dest) for c, a in found if not a.help] == []


def test_serve_help_lists_the_settings():
    result = subprocess.run(
        [BIN / "pyramid-lb", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "[app:dispatcher] settings:" in result.stdout
    assert "startup_timeout" in result.stdout
    assert "pyramid_lb.drain_file" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["serve", "x.ini", "--port", "99999"],
            "argument --port: '99999' is not a TCP port: expected 1 to 65535",
            id="port above 65535",
        ),
        pytest.param(
            ["serve", "x.ini", "--port", "-1"],
            "argument --port: '-1' is not a TCP port",
            id="negative port",
        ),
        pytest.param(
            ["scale", "http://127.0.0.1:9", "many"],
            "argument N: 'many' is not a number of instances: expected 0 to 1000",
            id="scale",
        ),
    ],
)
def test_numbers_are_checked_in_one_clear_line(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error


def test_status_of_an_ini_without_a_dispatcher_is_one_line(tmp_path):
    ini = tmp_path / "nodisp.ini"
    ini.write_text("[app:main]\nuse = egg:pyramid_lb#demo_app\n")
    result = subprocess.run(
        [BIN / "pyramid-lb", "status", ini], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"pyramid-lb: error: {ini} has no [server:dispatcher] section to find the "
        "dispatcher by; give its URL instead (e.g. http://127.0.0.1:8080)\n"
    )


def test_status_names_the_url_it_tried(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ini = tmp_path / "app.ini"
    ini.write_text(
        f"[server:dispatcher]\nuse = egg:waitress#main\nlisten = localhost:{port}\n"
    )
    result = subprocess.run(
        [BIN / "pyramid-lb", "status", ini], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"pyramid-lb: error: cannot reach http://127.0.0.1:{port} (the dispatcher "
        f"of {ini}): Connection refused\n"
    )


@pytest.mark.parametrize("command", [["serve"], ["export", "nginx"], ["status"]])
def test_start_up_errors_are_one_line_and_exit_1(tmp_path, capsys, command):
    ini = tmp_path / "broken.ini"
    ini.write_text("[app:dispatcher]\nuse = egg:no_such_egg\n")
    assert cli.main([*command, str(ini)]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"pyramid-lb: error: {ini} ")
    assert "no_such_egg" in error or "has no [server:dispatcher]" in error
    assert error.count("\n") == 1
