"""``pyramid-lb export docker``: a Dockerfile read by Docker's own parser, a
compose file with the ini's values, and their health check run for real."""

import json
import math
import shutil
import subprocess
import sys
import time
import uuid

import dockerfile
import pytest
import yaml

from pyramid_lb import cli
from pyramid_lb.export import SYSTEMD_MARGIN
from pyramid_lb.export_docker import MARK
from tests.dispatcher.site import free_base_port, free_port
from tests.processes import BIN, LOGGING_INI, ROOT

DOCKER = shutil.which("docker")


def docker_works(*args) -> bool:
    if DOCKER is None:
        return False
    try:
        result = subprocess.run(
            [DOCKER, *args], capture_output=True, stdin=subprocess.DEVNULL, timeout=30
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


DOCKER_INI = """
[app:main]
use = egg:pyramid_lb#demo_app
pyramid.includes = pyramid_lb
demo.session_secret = docker-test-secret

[server:main]
use = egg:waitress#main
host = 127.0.0.1
get port = http_port
clear_untrusted_proxy_headers = false

[app:dispatcher]
use = egg:pyramid_lb#dispatcher
instances = 1
base_port = {base_port}
startup_timeout = 20
drain_timeout = 7
stop_timeout = 3.2
health_check_interval = 0.5
health_check_timeout = 1.5
fall = 4
{dispatcher_extra}

[server:dispatcher]
use = egg:pyramid_lb#waitress
listen = {listen}
graceful_timeout = 12.5

[DEFAULT]
http_port = 6543
"""


def ini_text(listen="*:9091", base_port=7201, dispatcher_extra=""):
    return DOCKER_INI.format(
        listen=listen, base_port=base_port, dispatcher_extra=dispatcher_extra
    )


def exported(tmp_path, content=None, out=None):
    """``content`` exported into ``out`` (the ini's directory by default):
    the Dockerfile's commands, by instruction, and the compose file."""
    ini = tmp_path / "site.ini"
    ini.write_text(ini_text() if content is None else content)
    out = out or tmp_path
    assert cli.main(["export", "docker", str(ini), "--output-dir", str(out)]) == 0
    commands = {}
    for command in dockerfile.parse_file(str(out / "Dockerfile")):
        commands.setdefault(command.cmd, []).append(command)
    return commands, yaml.safe_load((out / "compose.yaml").read_text())


def test_the_image_runs_the_dispatcher_as_no_root(tmp_path):
    commands, _ = exported(tmp_path)
    [base] = commands["FROM"]
    assert base.value == (f"python:{sys.version_info[0]}.{sys.version_info[1]}-slim",)
    [cmd] = commands["CMD"]
    assert cmd.json  # exec form: the dispatcher is PID 1's child, gets SIGTERM
    assert cmd.value == ("pyramid-lb", "serve", "/app/site.ini")
    [user] = commands["USER"]
    assert user.value[0].isdigit() and int(user.value[0]) != 0
    order = [c for c in dockerfile.parse_file(str(tmp_path / "Dockerfile"))]
    assert order.index(user) > max(order.index(run) for run in commands["RUN"])
    env = dict(zip(*[iter(commands["ENV"][0].value)] * 2, strict=True))
    assert env["PYTHONUNBUFFERED"] == "1"
    assert [c.value for c in commands["STOPSIGNAL"]] == [("SIGTERM",)]
    assert [c.value for c in commands["EXPOSE"]] == [("9091",)]


def test_the_health_check_runs_python_timed_from_the_ini(tmp_path):
    commands, compose = exported(tmp_path)
    [check] = commands["HEALTHCHECK"]
    assert check.json
    assert check.value[:3] == ("CMD", "python", "-c")
    assert "http://127.0.0.1:9091/_lb/stats.json" in check.value[3]
    flags = dict(flag.lstrip("-").split("=") for flag in check.flags)
    # health_check_interval 0.5 (1 s at least) times 10; health_check_timeout
    # 1.5 rounded up, plus Python's start; startup_timeout 20 plus the margin.
    assert flags == {
        "interval": "10s",
        "timeout": "3s",
        "start-period": f"{20 + SYSTEMD_MARGIN}s",
        "retries": "4",
    }
    service = compose["services"]["site"]
    health = service["healthcheck"]
    assert health["test"] == list(check.value)
    assert (health["interval"], health["timeout"]) == ("10s", "3s")
    assert (health["retries"], health["start_period"]) == (4, "30s")


def test_the_compose_file_publishes_the_port_and_waits_out_the_stop(tmp_path):
    _, compose = exported(tmp_path)
    assert list(compose["services"]) == ["site"]
    service = compose["services"]["site"]
    assert service["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    assert service["ports"] == ["9091:9091"]
    assert service["init"] is True
    assert service["stop_signal"] == "SIGTERM"
    # graceful_timeout 12.5 + drain_timeout 7 + stop_timeout 3.2, rounded up,
    # plus the margin: export.stop_times, as the systemd unit's.
    total = math.ceil(12.5 + 7 + 3.2) + SYSTEMD_MARGIN
    assert service["stop_grace_period"] == f"{total}s" == "33s"
    assert "# = 33 seconds." in (tmp_path / "compose.yaml").read_text()
    assert "--stop-timeout 33" in (tmp_path / "Dockerfile").read_text()


def test_files_saved_elsewhere_build_from_the_ini_files_directory(tmp_path):
    out = tmp_path / "deploy" / "docker"
    _, compose = exported(tmp_path, out=out)
    assert compose["services"]["site"]["build"] == {
        "context": "../..",
        "dockerfile": "deploy/docker/Dockerfile",
    }
    assert "docker build -t site -f deploy/docker/Dockerfile ." in (
        (out / "Dockerfile").read_text()
    )


def test_a_file_of_the_users_is_not_overwritten(tmp_path, capsys):
    exported(tmp_path)
    ini = str(tmp_path / "site.ini")
    # Its own files: written again.
    assert cli.main(["export", "docker", ini, "--output-dir", str(tmp_path)]) == 0
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    before = (tmp_path / "compose.yaml").read_text()
    (tmp_path / "compose.yaml").write_text(before.replace("33s", "1s"))
    assert cli.main(["export", "docker", ini, "--output-dir", str(tmp_path)]) == 1
    assert "Dockerfile exists and is not " + MARK in capsys.readouterr().err
    assert (tmp_path / "Dockerfile").read_text() == "FROM scratch\n"
    assert "1s" in (tmp_path / "compose.yaml").read_text()  # neither is written


def test_stdout_holds_both_files_each_after_its_name(tmp_path, capsys):
    exported(tmp_path)
    assert cli.main(["export", "docker", str(tmp_path / "site.ini")]) == 0
    printed = capsys.readouterr().out
    assert printed == (
        "# ==> Dockerfile <==\n"
        + (tmp_path / "Dockerfile").read_text()
        + "\n# ==> compose.yaml <==\n"
        + (tmp_path / "compose.yaml").read_text()
    )


@pytest.mark.parametrize(
    "extra, asked",
    [
        pytest.param("", "/_lb/stats.json", id="the dispatcher's stats"),
        pytest.param("admin_allow = 10.0.0.0/8", "/readyz", id="readiness through it"),
    ],
)
def test_the_health_check_fails_until_an_instance_is_ready(
    processes, tmp_path, extra, asked
):
    """The image's health check, run here against `pyramid-lb serve` of the
    same ini: unhealthy before the dispatcher serves, healthy once its
    instance is ready."""
    port, base_port = free_port(), free_base_port(1)
    content = ini_text(f"*:{port}", base_port, extra) + LOGGING_INI
    commands, _ = exported(tmp_path, content)
    [check] = commands["HEALTHCHECK"]
    python = [sys.executable, *check.value[2:]]
    assert asked in check.value[3]

    def healthy():
        return subprocess.run(python, capture_output=True, timeout=30).returncode == 0

    assert not healthy()  # nothing listens yet
    processes.start(
        [BIN / "pyramid-lb", "serve", tmp_path / "site.ini"], name="dispatcher"
    )
    deadline = time.monotonic() + 30
    while not healthy():
        assert time.monotonic() < deadline, "never healthy"
        time.sleep(0.2)


def compose_command():
    """Compose v2 (``docker compose``), else v1 (``docker-compose``), or None."""
    if docker_works("compose", "version"):
        return [DOCKER, "compose"]
    return [shutil.which("docker-compose")] if shutil.which("docker-compose") else None


COMPOSE = compose_command()


def compose_config(path):
    return subprocess.run(
        [*COMPOSE, "-f", path, "config", "--quiet"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )


@pytest.mark.skipif(
    COMPOSE is None,
    reason="neither docker compose nor docker-compose is installed (Debian "
    "package docker-compose)",
)
def test_docker_compose_config_takes_the_file(tmp_path):
    """Compose checks the file against its schema: no unknown key."""
    exported(tmp_path)
    result = compose_config(tmp_path / "compose.yaml")
    assert (result.returncode, result.stderr) == (0, "")
    (tmp_path / "compose.yaml").write_text(
        (tmp_path / "compose.yaml").read_text().replace("init:", "inits:")
    )
    result = compose_config(tmp_path / "compose.yaml")
    assert result.returncode != 0 and "inits" in result.stderr


@pytest.mark.skipif(
    not docker_works("info"),
    reason="no Docker daemon (`docker info` fails): the image is not built",
)
def test_the_image_builds_and_becomes_healthy(tmp_path):
    """production.ini in this repository's directory: the build context is
    this project, installed in the image with the demo app."""
    out = tmp_path / "docker"
    ini = ROOT / "production.ini"
    assert cli.main(["export", "docker", str(ini), "--output-dir", str(out)]) == 0
    tag = f"pyramid-lb-test-{uuid.uuid4().hex[:8]}"
    build = [DOCKER, "build", "-t", tag, "-f", out / "Dockerfile", ROOT]
    subprocess.run(build, check=True, timeout=600)
    container = None
    try:
        started = subprocess.run(
            [DOCKER, "run", "-d", "--init", tag],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        container = started.stdout.strip()
        deadline = time.monotonic() + 120
        while True:
            state = subprocess.run(
                [DOCKER, "inspect", "--format", "{{json .State.Health}}", container],
                capture_output=True,
                text=True,
                timeout=30,
            )
            status = json.loads(state.stdout)["Status"]
            if status == "healthy":
                break
            assert status != "unhealthy" and time.monotonic() < deadline, status
            time.sleep(1)
    finally:
        if container:
            subprocess.run([DOCKER, "rm", "-f", container], timeout=60)
        subprocess.run([DOCKER, "rmi", "-f", tag], timeout=60)


@pytest.mark.parametrize(
    "content, args, message",
    [
        pytest.param(
            ini_text(),
            ["--listen", "127.0.0.1:80"],
            "--listen has no meaning for docker",
            id="listen",
        ),
        pytest.param(
            ini_text(), ["-o", "Dockerfile"], "give --output-dir DIR", id="-o"
        ),
        pytest.param(
            ini_text("localhost:9091"),
            [],
            "[server:dispatcher] listens on localhost: in a container",
            id="loopback",
        ),
        pytest.param(
            ini_text("*:0"),
            [],
            "[server:dispatcher] gives no fixed port ('0')",
            id="port 0",
        ),
        pytest.param(
            ini_text().partition("[server:dispatcher]")[0],
            [],
            "has no [server:dispatcher] section",
            id="no server section",
        ),
    ],
)
def test_bad_docker_input_is_one_line_and_exit_1(
    tmp_path, capsys, content, args, message
):
    ini = tmp_path / "site.ini"
    ini.write_text(content)
    assert cli.main(["export", "docker", str(ini), *args]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("pyramid-lb: error: ")
    assert captured.err.count("\n") == 1 and message in captured.err


@pytest.mark.parametrize(
    "project, step",
    [
        pytest.param("pyproject.toml", "pip install /app", id="pyproject"),
        pytest.param("setup.py", "pip install /app", id="setup.py"),
        pytest.param(
            "requirements.txt",
            "pip install -r /app/requirements.txt",
            id="requirements",
        ),
        pytest.param(None, "pip install /app", id="none"),
    ],
)
def test_the_app_is_installed_as_its_directory_says(tmp_path, project, step):
    if project:
        (tmp_path / project).write_text("")
    commands, _ = exported(tmp_path)
    assert [c.value for c in commands["RUN"]][0] == (step,)
    said = "write your own step" in (tmp_path / "Dockerfile").read_text()
    assert said == (project is None)


def test_a_dispatcher_on_waitresss_default_port_publishes_it(tmp_path):
    commands, compose = exported(tmp_path, ini_text("0.0.0.0"))
    assert [c.value for c in commands["EXPOSE"]] == [("8080",)]
    assert compose["services"]["site"]["ports"] == ["8080:8080"]


def test_a_dispatcher_on_ipv6_alone_is_checked_on_ipv6(tmp_path):
    commands, _ = exported(tmp_path, ini_text("[::]:9091"))
    [check] = commands["HEALTHCHECK"]
    assert "http://[::1]:9091/_lb/stats.json" in check.value[3]


def test_files_that_cannot_be_written_are_one_line_and_exit_1(tmp_path, capsys):
    ini = tmp_path / "site.ini"
    ini.write_text(ini_text())
    (tmp_path / "file").write_text("")
    args = ["export", "docker", str(ini), "--output-dir"]
    assert cli.main([*args, str(tmp_path / "file")]) == 1
    assert f"cannot create {tmp_path / 'file'}: File exists" in capsys.readouterr().err
    (tmp_path / "Dockerfile").mkdir()
    assert cli.main([*args, str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert f"cannot read {tmp_path / 'Dockerfile'}" in error
    assert error.count("\n") == 1


def test_a_path_that_is_not_one_line_is_refused(tmp_path, capsys):
    odd = tmp_path / "new\nline"
    odd.mkdir()
    (odd / "site.ini").write_text(ini_text())
    assert cli.main(["export", "docker", str(odd / "site.ini")]) == 1
    assert "cannot be written in a generated file" in capsys.readouterr().err


def test_output_dir_is_for_docker_alone(tmp_path, capsys):
    ini = tmp_path / "site.ini"
    ini.write_text(ini_text())
    args = ["export", "kubernetes", str(ini), "--output-dir", str(tmp_path)]
    assert cli.main(args) == 1
    assert "--output-dir is for docker" in capsys.readouterr().err
