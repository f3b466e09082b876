"""Real processes for tests: started on ports chosen at run time, always reaped."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
SERVING_IPV4 = re.compile(r"Serving on http://(?:127\.0\.0\.1|0\.0\.0\.0):(\d+)")


class Process:
    """A child process whose output goes to a file (no pipe to fill up)."""

    def __init__(self, argv, log_path: Path, env=None, cwd=ROOT):
        self.argv = [str(arg) for arg in argv]
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        # Own session: the whole group can be signalled, and a Ctrl-C in the
        # terminal running pytest does not reach it twice.
        self.popen = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, pattern: str | re.Pattern, timeout: float = 15.0):
        """The first match of ``pattern`` in the output, waiting for it."""
        pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.output())
            if match:
                return match
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.argv} exited ({self.popen.returncode}) before printing "
                    f"{pattern.pattern!r}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.argv} did not print {pattern.pattern!r} within "
                    f"{timeout}s:\n{self.output()}"
                )
            time.sleep(0.02)

    def port(self, timeout: float = 15.0) -> int:
        """The IPv4 TCP port a waitress server in this process listens on.

        ``localhost:0`` gives one port for 127.0.0.1 and another for ::1;
        tests talk IPv4 unless they say otherwise.
        """
        return int(self.wait_for_output(SERVING_IPV4, timeout).group(1))

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        return self.popen.wait(timeout)

    def stop(self) -> None:
        """Terminate the whole process group, killing it if it lingers."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.popen.poll() is None:
            self.popen.wait(5)
        self._log.close()


class Instance:
    """A fixture instance started by :meth:`Processes.backend`."""

    def __init__(self, name: str, process: Process, url: str):
        self.name = name
        self.process = process
        self.url = url

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: the instance dies without a word, as in a crash."""
        self.process.popen.kill()
        self.process.popen.wait(5)


#: Log INFO and up to stderr, so that the tests see "Serving on ..." lines.
LOGGING_INI = """
[loggers]
keys = root

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = INFO
handlers = console

[handler_console]
class = StreamHandler
args = (sys.stderr,)
formatter = generic

[formatter_generic]
format = %(levelname)s [%(name)s] %(message)s
"""

DISPATCHER_INI = """
[app:main]
use = egg:pyramid_lb#dispatcher
{settings}

[server:main]
use = egg:pyramid_lb#waitress
host = 127.0.0.1
port = 0
outbuf_high_watermark = 1048576
{server}
"""


class Processes:
    """Starts processes for one test and stops all of them afterwards."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.started: list[Process] = []

    def start(self, argv, name: str | None = None, env=None, cwd=ROOT) -> Process:
        name = name or Path(str(argv[0])).name
        log_path = self.tmp_path / f"{name}-{len(self.started)}.log"
        process = Process(argv, log_path, env=env, cwd=cwd)
        self.started.append(process)
        return process

    def pserve(self, ini, *args, env=None) -> tuple[Process, str]:
        """``pserve INI http_port=0 ...``; returns it and its base URL."""
        process = self.start(
            [BIN / "pserve", ini, "http_port=0", *args], name="pserve", env=env
        )
        port = process.port()
        if port == 6543:
            raise AssertionError(f"{ini}: http_port=0 did not reach [server:main]")
        return process, f"http://127.0.0.1:{port}"

    def backend(self, name: str, log_dir: Path | None = None) -> Instance:
        """A fixture instance (tests/fixtureapps/backend.py) on a free port."""
        process = self.start(
            [sys.executable, "-m", "tests.fixtureapps.backend", name, log_dir or ""],
            name=name,
        )
        return Instance(name, process, f"http://127.0.0.1:{process.port()}")

    def dispatcher(self, backends, server=None, **settings) -> tuple[Process, str]:
        """``pserve`` of a dispatcher over ``backends`` (instances or URLs);
        ``server`` adds keys to its server section."""
        urls = [getattr(b, "url", b) for b in backends]
        # Even shares at once, for tests that count where requests go.
        settings = {"backends": " ".join(urls), "slow_start": "0", **settings}
        path = self.tmp_path / f"dispatcher-{len(self.started)}.ini"
        path.write_text(
            DISPATCHER_INI.format(
                settings="\n".join(f"{k} = {v}" for k, v in settings.items()),
                server="\n".join(f"{k} = {v}" for k, v in (server or {}).items()),
            )
            + LOGGING_INI
        )
        process = self.start([BIN / "pserve", path], name="dispatcher")
        return process, f"http://127.0.0.1:{process.port()}"

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.stop()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll ``predicate`` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def get(url: str, **kw) -> requests.Response:
    kw.setdefault("timeout", 10)
    return requests.get(url, **kw)


def slow_download(port: int, target: str, size: int, midway) -> int:
    """GET ``target`` on 127.0.0.1:``port`` as a slow client (a small receive
    buffer, a pause between reads), calling ``midway()`` once 2 MB are in;
    how many body bytes arrived before the end or the close."""
    with socket.create_connection(("127.0.0.1", port), 10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
        length, called = len(body), False
        while length < size:
            piece = sock.recv(65536)
            if not piece:
                break
            length += len(piece)
            if not called and length > 2 << 20:
                midway()
                called = True
            time.sleep(0.002)  # the rest waits in buffers meanwhile
    return length
