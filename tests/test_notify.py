"""sd_notify: the datagrams, and what ``pyramid-lb serve`` tells systemd when."""

import logging
import os
import re
import signal
import socket
import tempfile
import threading
import time
import uuid

import pytest
import requests

from pyramid_lb import notify
from pyramid_lb.notify import Notifier
from tests.dispatcher.site import free_base_port, stats, write_ini
from tests.processes import BIN, wait_until


@pytest.fixture
def receiver():
    """A datagram socket bound to a path, as systemd's; its address."""
    with tempfile.TemporaryDirectory(prefix="sdn-", dir="/tmp") as directory:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            path = os.path.join(directory, "notify")
            sock.bind(path)
            sock.settimeout(5)
            yield sock, path


def messages(sock):
    """Every datagram waiting on ``sock``, each as its list of lines."""
    found = []
    sock.settimeout(0.2)
    try:
        while True:
            found.append(sock.recv(4096).decode().split("\n"))
    except TimeoutError:
        return found


def test_a_path_socket_gets_one_datagram(receiver):
    sock, path = receiver
    assert Notifier(path).notify("READY=1", "STATUS=1/1 instances ready")
    assert sock.recv(4096) == b"READY=1\nSTATUS=1/1 instances ready"


def test_an_abstract_socket_is_named_with_an_at_sign():
    name = f"pyramid_lb-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier("@" + name).notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize(
    "environ",
    [pytest.param({}, id="unset"), pytest.param({"NOTIFY_SOCKET": ""}, id="empty")],
)
def test_without_the_variable_nothing_is_sent(environ):
    notifier = Notifier.from_environ(environ)
    assert not notifier.enabled
    assert not notifier.notify("READY=1")
    notifier.serving()
    notifier.instances_ready(1, 1)  # and nothing raises


def test_the_variable_is_taken_out_of_what_instances_inherit(receiver):
    environ = {"NOTIFY_SOCKET": receiver[1], "OTHER": "1"}
    assert Notifier.from_environ(environ).enabled
    assert environ == {"OTHER": "1"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("/nonexistent/notify", id="no such socket"),
        pytest.param("vsock:2:1234", id="a kind not spoken"),
    ],
)
def test_errors_never_raise_and_are_logged_once_at_debug(caplog, name):
    caplog.set_level(logging.DEBUG, logger="pyramid_lb.dispatcher")
    notifier = Notifier(name)
    for _ in range(3):
        assert not notifier.notify("READY=1")
    wait_until(lambda: caplog.records, timeout=5)
    time.sleep(0.1)  # any second line would be there by now
    assert [r.levelname for r in caplog.records] == ["DEBUG"]
    assert name in caplog.records[0].getMessage()


def test_ready_waits_for_both_serving_and_an_instance(receiver):
    sock, path = receiver
    notifier = Notifier(path)
    notifier.instances_ready(1, 2)  # not serving yet: a status only
    notifier.serving()
    notifier.instances_ready(2, 2)
    notifier.reloading()
    notifier.reloaded("done")
    notifier.stopping()
    notifier.stopping()
    notifier.instances_ready(1, 2)  # stopping: no news
    sent = messages(sock)
    reloading, usec = sent[3][0], sent[3][1]
    assert reloading == "RELOADING=1"
    assert 0 < int(usec.removeprefix("MONOTONIC_USEC=")) <= notify.monotonic_usec()
    del sent[3][1]
    assert sent == [
        ["STATUS=1/2 instances ready"],
        ["READY=1", "STATUS=1/2 instances ready"],
        ["STATUS=2/2 instances ready"],
        ["RELOADING=1", "STATUS=rolling restart"],
        ["READY=1", "STATUS=rolling restart done; 2/2 instances ready"],
        ["STOPPING=1", "STATUS=stopping"],
    ]


def test_no_ready_while_no_instance_is(receiver):
    sock, path = receiver
    notifier = Notifier(path)
    notifier.serving()
    notifier.instances_ready(0, 2)
    assert messages(sock) == [["STATUS=0/2 instances ready"]]


# -- pyramid-lb serve under a service manager of the test's own ---------------


class Manager:
    """The test's stand-in for systemd: receives the datagrams and notes, as
    each arrives, what the dispatcher had logged by then."""

    def __init__(self, sock):
        self.sock = sock
        self.received = []  # (lines, output so far)
        self.process = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)

    def _receive(self):
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            output = self.process.output() if self.process else ""
            self.received.append((data.decode().split("\n"), output))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def wait_for(self, line, after=0, timeout=20):
        """The index of the first message from ``after`` on holding ``line``."""

        def found():
            for index, (lines, _) in enumerate(self.received[after:], after):
                if line in lines:
                    return index + 1  # 0 is a found index too
            return None

        return wait_until(found, timeout=timeout) - 1


@pytest.mark.parametrize(
    "args",
    [pytest.param((), id="dispatcher"), pytest.param(("--no-dispatcher",), id="none")],
)
def test_serve_tells_ready_reloading_and_stopping(processes, tmp_path, receiver, args):
    sock, path = receiver
    # A warm-up: the instances take a while to be ready, the dispatcher not.
    ini = write_ini(tmp_path, instances=2, warmup=1, base_port=free_base_port())
    with Manager(sock) as manager:
        process = processes.start(
            [BIN / "pyramid-lb", "serve", ini, *args],
            name="dispatcher",
            env={"NOTIFY_SOCKET": path},
        )
        manager.process = process
        ready = manager.wait_for("READY=1")
        lines, output = manager.received[ready]
        # Nothing before it said ready; by then an instance was, and the
        # dispatcher served (or, without one, supervised).
        assert ready == 0, manager.received
        assert re.search(r"STATUS=[12]/[12] instances ready", "\n".join(lines))
        assert re.search(r"\] [12]/[12] instances ready", output), output
        serving = "Serving on" if not args else "supervising the instances"
        assert serving in output
        if not args:
            url = re.search(r"Serving on (http://\S+)", output).group(1)
            assert any(i["state"] == "up" for i in stats(url))
        # The instances never inherit the socket.
        assert "NOTIFY_SOCKET" not in os.environ
        wait_until(lambda: "2/2 instances ready" in process.output(), timeout=20)

        process.signal(signal.SIGHUP)
        reloading = manager.wait_for("RELOADING=1", after=ready + 1)
        again = manager.wait_for("READY=1", after=reloading + 1, timeout=30)
        assert "rolling restart (SIGHUP) started" in manager.received[reloading][1]
        # READY=1 goes out as the rollout ends, its "done" line just after.
        wait_until(lambda: "rolling restart (SIGHUP) done" in process.output(), 10)
        status = "\n".join(manager.received[again][0])
        assert re.search(r"STATUS=rolling restart done; \d/\d instances", status)

        if not args:
            # Asked at /_lb/reload (or `pyramid-lb reload`): said alike.
            response = requests.post(
                url + "/_lb/reload", headers={"X-Requested-With": "test"}, timeout=10
            )
            assert response.status_code == 202
            reloading = manager.wait_for("RELOADING=1", after=again + 1)
            again = manager.wait_for("READY=1", after=reloading + 1, timeout=30)
            said = manager.received[reloading][1]
            assert "rolling restart (POST /_lb/reload) started" in said

        process.signal(signal.SIGTERM)
        stopping = manager.wait_for("STOPPING=1", after=again + 1)
        assert process.wait(20) == 0
        assert stopping == len(manager.received) - 1  # the last word
