"""The instance runner, ``python -m pyramid_lb.dispatcher.instance INI PORT``."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from pyramid_lb.process import PORT_IN_USE
from tests.dispatcher.site import free_port
from tests.processes import ROOT, get, wait_until

RUNNER = [sys.executable, "-m", "pyramid_lb.dispatcher.instance"]
FIXTURES = ROOT / "tests" / "fixtureapps"
PLAIN_INI = (FIXTURES / "instance_plain.ini").read_text()

# Stands in for the supervisor: spawns the runner as its own child, as the
# supervisor does, and tells the test the runner's pid.
PARENT = """
import os, subprocess, sys
env = dict(os.environ, PYRAMID_LB_PARENT=str(os.getpid()))
argv = [sys.executable, "-m", "pyramid_lb.dispatcher.instance", *sys.argv[1:]]
child = subprocess.Popen(argv, env=env)
print("instance pid", child.pid, flush=True)
child.wait()
"""

BAD_SETTING_INI = """
[app:main]
use = egg:pyramid_lb#demo_app
demo.session_secret = test-secret
pyramid_lb.check_timeout = soon

[server:main]
use = egg:waitress#main
listen = 127.0.0.1:%(http_port)s
"""


def fetch(process, url, **kw) -> requests.Response:
    """GET ``url`` as soon as the server answers (failing if it exits first)."""

    def attempt():
        if process.popen.poll() is not None:
            raise AssertionError(
                f"exited ({process.popen.returncode}):\n{process.output()}"
            )
        try:
            return get(url, **kw)
        except requests.ConnectionError:
            return None

    return wait_until(attempt, timeout=15)


def serving(processes, argv, env=None, host="127.0.0.1", name="instance"):
    """Start ``argv`` followed by a free port; once it answers, it and its URL.

    Another process may take the port before the runner binds it (the suite
    runs in parallel with others): then the start is tried on another port.
    """
    for _ in range(3):
        port = free_port("::1" if ":" in host else "")
        process = processes.start([*argv, port], name=name, env=env)
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        try:
            fetch(process, url + "/healthz")
            return process, url
        except AssertionError:
            if "address already in use" not in process.output():
                raise
    raise AssertionError("three ports taken in a row")


def start(processes, ini, env=None):
    """The runner serving ``ini`` on a free port, and its URL."""
    return serving(processes, [*RUNNER, ini], env=env)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_serves_the_demo_on_the_given_port(processes):
    process, url = start(
        processes, ROOT / "development.ini", env={"PYRAMID_LB_INSTANCE": "web-7"}
    )
    facts = get(url + "/whoami").json()
    assert facts["instance"] == "web-7"
    assert facts["pid"] == process.pid
    assert facts["client_addr"] == "127.0.0.1"
    assert facts["scheme"] == "http"
    assert f"Serving on http://127.0.0.1:{url.rsplit(':', 1)[1]}" in process.output()


def test_port_wins_over_the_files_default_http_port(processes):
    # pserve FILE http_port=N would serve this file on 6543 (see the ini).
    process, url = start(processes, FIXTURES / "instance_listen.ini")
    assert get(url + "/whoami").json()["pid"] == process.pid


def test_forwarded_headers_from_the_dispatcher_reach_the_addon(processes):
    process, url = start(processes, ROOT / "development.ini")
    headers = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    facts = get(url + "/whoami", headers=headers).json()
    assert facts["client_addr"] == "203.0.113.9"
    assert facts["scheme"] == "https"


def test_waitress_applies_forwarded_headers_for_an_app_without_the_addon(
    processes,
):
    process, url = start(
        processes,
        FIXTURES / "instance_plain.ini",
        env={
            "PYRAMID_LB_INSTANCE": "plain-1",
            "PYRAMID_LB_TRUSTED_PROXIES": "127.0.0.1",
        },
    )
    headers = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    facts = get(url, headers=headers).json()
    assert facts["instance"] == "plain-1"
    assert facts["remote_addr"] == "203.0.113.9"
    assert facts["scheme"] == "https"


@pytest.mark.parametrize(
    "env, server_line",
    [
        pytest.param({"PYRAMID_LB_TRUSTED_PROXIES": "192.0.2.1"}, "", id="dispatcher"),
        pytest.param({}, "trusted_proxy = 192.0.2.1", id="ini trusted_proxy"),
    ],
)
def test_forwarded_headers_from_elsewhere_are_not_applied(
    processes, tmp_path, env, server_line
):
    # Only the dispatcher's (or the ini's) proxy is trusted, not the client.
    ini = tmp_path / "plain.ini"
    ini.write_text(PLAIN_INI.replace("[DEFAULT]", f"{server_line}\n[DEFAULT]"))
    process, url = start(processes, ini, env=env)
    facts = get(url, headers={"X-Forwarded-For": "203.0.113.9"}).json()
    assert facts["remote_addr"] == "127.0.0.1"
    assert facts["x_forwarded_for"] is None


def test_another_server_gets_the_port_through_http_port(processes):
    process, url = start(processes, FIXTURES / "instance_other_server.ini")
    assert get(url).json()["pid"] == process.pid
    process.signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    assert "is not waitress: it listens where http_port" in process.output()


def test_another_server_stops_even_if_it_swallows_sigterm(processes):
    """wsgiref catches the SystemExit of a SIGTERM that lands while it sends
    an answer: the runner raises it again until the server ends."""
    process, url = start(processes, FIXTURES / "instance_other_server.ini")
    port = int(url.rpartition(":")[2])
    with socket.create_connection(("127.0.0.1", port)) as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.sendall(b"GET /big?mb=50 HTTP/1.0\r\nHost: x\r\n\r\n")
        slow.recv(1024)  # the answer has begun: the server blocks sending it
        time.sleep(0.2)
        process.signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


def test_sigterm_stops_at_once_despite_drain_on_sigterm(processes):
    process, url = start(processes, ROOT / "production.ini")  # drain_on_sigterm=10
    started = time.monotonic()
    process.signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    assert time.monotonic() - started < 8  # not the 10 s drain
    assert "pyramid_lb.drain_on_sigterm = 10 is overridden" in process.output()


def test_dies_with_its_parent(processes):
    parent, url = serving(
        processes,
        [sys.executable, "-c", PARENT, ROOT / "development.ini"],
        name="parent",
    )
    pid = int(parent.wait_for_output(r"instance pid (\d+)").group(1))
    try:
        facts = get(url + "/whoami").json()
        assert facts["pid"] == pid
        parent.popen.kill()
        parent.popen.wait(5)
        wait_until(lambda: not alive(pid), timeout=5)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_does_not_start_when_its_parent_is_already_gone(processes):
    # The supervisor that spawned it died before it could set PR_SET_PDEATHSIG.
    finished = subprocess.Popen([sys.executable, "-c", ""])
    finished.wait()
    process = processes.start(
        [*RUNNER, ROOT / "development.ini", free_port("")],
        env={"PYRAMID_LB_PARENT": str(finished.pid)},
    )
    assert process.wait(timeout=15) == 1
    assert "is gone; not starting" in process.output()


def run_failing(argv, timeout=30):
    """Run the runner to its end; return its exit status, stdout and stderr."""
    done = subprocess.run(
        [*RUNNER, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYRAMID_LB_")},
    )
    return done.returncode, done.stdout, done.stderr


def assert_one_line(stderr: str, *words: str) -> None:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize(
    "ini_text, args, code, words",
    [
        pytest.param(None, [], 2, ["nope.ini", "no such file"], id="missing file"),
        pytest.param(
            BAD_SETTING_INI, [], 1, ["pyramid_lb.check_timeout", "'soon'"], id="setting"
        ),
        pytest.param(
            PLAIN_INI.replace("[DEFAULT]", "threads = many\n[DEFAULT]"),
            [],
            1,
            ["[server:main]", "many"],
            id="server setting",
        ),
        pytest.param(
            PLAIN_INI,
            ["--server", "nope"],
            1,
            ["nope.ini has no [server:nope] section"],
            id="section",
        ),
        pytest.param(
            PLAIN_INI.replace(
                "listen = 127.0.0.1:%(http_port)s", "listen = 127.0.0.1:99999"
            ),
            [],
            1,
            [
                "[server:main] listen = '127.0.0.1:99999' is not valid: the port of "
                "'127.0.0.1:99999' is above 65535; expected a TCP port from 1 to 65535"
            ],
            id="listen port wrapped by waitress",
        ),
    ],
)
def test_errors_are_one_line(tmp_path, ini_text, args, code, words):
    ini = tmp_path / "nope.ini"
    if ini_text is not None:
        ini.write_text(ini_text)
    status, out, err = run_failing([ini, free_port(""), *args])
    assert (status, out) == (code, "")
    assert_one_line(err, *words)


def test_usage_error():
    status, out, err = run_failing([FIXTURES / "instance_plain.ini", "--", "-1"])
    assert (status, out) == (2, "")
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        "pyramid_lb.dispatcher.instance: error: argument port: -1 is not a TCP port "
        "(0 to 65535)"
    )


def test_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run_failing([FIXTURES / "instance_plain.ini", port])
    # Its own status: the supervisor moves the instance to another port.
    assert (code, out) == (PORT_IN_USE, "")
    assert_one_line(err, f"cannot listen on 127.0.0.1:{port}: address already in use")


def test_serves_on_ipv6_when_the_ini_asks(processes, tmp_path):
    try:
        free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    ini = tmp_path / "ipv6.ini"
    ini.write_text(PLAIN_INI.replace("127.0.0.1:%(http_port)s", "[::1]:%(http_port)s"))
    process, url = serving(processes, [*RUNNER, ini], host="::1")
    assert get(url).json()["remote_addr"] == "::1"
