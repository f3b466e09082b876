"""pyramid_lb.server: waitress hardened, tried with raw sockets on a real
dispatcher in front of a canned instance that records what reaches it."""

import hashlib
import inspect
import io
import logging
import re
import resource
import signal
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import waitress
from waitress.buffers import ReadOnlyFileBasedBuffer
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer, MultiSocketServer
from waitress.task import ErrorTask, Task, ThreadedTaskDispatcher, WSGITask

from pyramid_lb import server as front
from tests.dispatcher.canned import Canned
from tests.processes import slow_download, wait_until

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
LIMIT = 1000
#: Sent right after each refused request, on the same connection: it must
#: never reach the instance.
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


# -- the waitress internals this module builds on -------------------------------


def test_the_waitress_seams_are_where_this_module_expects_them():
    """If this fails, the installed waitress changed what pyramid_lb.server
    relies on: fix the module before allowing that release in pyproject."""
    assert HTTPChannel.parser_class is HTTPRequestParser
    assert "channel_class" in vars(BaseWSGIServer)
    assert issubclass(front.StrictChannel, HTTPChannel)
    parser = front.StrictRequestParser(waitress.adjustments.Adjustments())
    for name in ("error", "expect_continue", "headers_finished", "completed"):
        assert hasattr(parser, name)
    server = front.create_server(lambda e, s: [], {"listen": "127.0.0.1:0"})
    try:
        assert server.channel_class is front.StrictChannel
        assert server.adj.asyncore_use_poll is True
        assert server.adj.connection_limit == front.FRONT_DEFAULTS["connection_limit"]
    finally:
        server.close()


def test_every_listening_socket_gets_the_strict_parser():
    server = front.create_server(
        lambda e, s: [], {"listen": "127.0.0.1:0 127.0.0.1:0", "threads": 1}
    )
    try:
        assert isinstance(server, MultiSocketServer)
        listeners = [o for o in server.map.values() if isinstance(o, BaseWSGIServer)]
        assert len(listeners) == 2
        assert {type(o.channel_class) for o in listeners} == {type}
        assert all(o.channel_class is front.StrictChannel for o in listeners)
    finally:
        server.close()


def test_the_section_wins_over_the_defaults_and_the_app_supplies_its_own():
    class App:
        server_defaults = {"max_request_body_size": 1234}

        def __call__(self, environ, start_response):
            return []

    server = front.create_server(
        App(), {"listen": "127.0.0.1:0", "connection_limit": "500"}
    )
    try:
        assert server.adj.connection_limit == 500
        assert server.adj.max_request_body_size == 1234
    finally:
        server.close()


def test_waitress_asks_its_task_dispatcher_only_what_the_router_answers():
    """AdminRouter stands in for waitress's task dispatcher: if waitress
    calls anything else on it, or passes it something else, fix the router."""
    source = Path(waitress.__file__).parent
    uses = re.compile(r"(?<!asyncore\.)\b(?:task_)?dispatcher\.(\w+)\(")
    called = set()
    for module in ("server.py", "channel.py", "task.py", "runner.py"):
        called |= set(uses.findall((source / module).read_text()))
    assert called == {"add_task", "set_thread_count", "shutdown"}
    assert "self.server.add_task(self)" in (source / "channel.py").read_text()
    for name in called:  # called positionally: the same arguments and defaults
        ours, theirs = (
            [p.default for p in inspect.signature(method).parameters.values()]
            for method in (
                getattr(front.AdminRouter, name),
                getattr(ThreadedTaskDispatcher, name),
            )
        )
        assert ours == theirs, name


def test_only_an_app_with_an_admin_prefix_gets_the_router():
    class App:
        admin_prefix = "/_lb"

        def __call__(self, environ, start_response):
            return []

    plain = front.create_server(lambda e, s: [], {"listen": "127.0.0.1:0"})
    plain.close()
    assert type(plain.task_dispatcher) is ThreadedTaskDispatcher
    server = front.create_server(
        App(), {"listen": "127.0.0.1:0 127.0.0.1:0", "threads": 3}
    )
    try:
        router = server.task_dispatcher
        assert isinstance(router, front.AdminRouter)
        assert [o.task_dispatcher for o in front._listeners(server)] == [router] * 2
        assert len(router.main.threads) == 3
        assert len(router.admin.threads) == front.ADMIN_THREADS
    finally:
        server.close()
    assert router.main.threads == router.admin.threads == set()


@pytest.mark.parametrize("prefix", ["/", "", "_lb", 5])
def test_an_admin_prefix_must_be_a_path(prefix):
    class App:
        admin_prefix = prefix

    with pytest.raises(ValueError, match=re.escape(f"admin_prefix = {prefix!r}")):
        front.create_server(App(), {"listen": "127.0.0.1:0"})


class Recorder:
    def __init__(self):
        self.tasks = []
        self.calls = []

    def add_task(self, task):
        self.tasks.append(task)

    def set_thread_count(self, count):
        self.calls.append(("set_thread_count", count))

    def shutdown(self, cancel_pending=True, timeout=5):
        self.calls.append(("shutdown", cancel_pending, timeout))
        return True


@pytest.mark.parametrize(
    ("paths", "url_prefix", "admin"),
    [
        pytest.param(["/_lb"], "", True, id="the prefix"),
        pytest.param(["/_lb/"], "", True, id="the prefix and a slash"),
        pytest.param(["/_lb/stats.json"], "", True, id="under the prefix"),
        pytest.param(["//_lb/metrics"], "", True, id="leading slashes, as waitress"),
        pytest.param(["/_lbx"], "", False, id="a longer name"),
        pytest.param(["/app/_lb/stats"], "", False, id="the prefix further on"),
        pytest.param(["/", "/_lb/stats"], "", False, id="the first request decides"),
        pytest.param(["/_lb/stats", "/"], "", True, id="an admin one first"),
        pytest.param(["/app/_lb/stats"], "/app", True, id="under url_prefix"),
        pytest.param(["/_lb/stats"], "/app", True, id="outside url_prefix"),
        pytest.param(["/app"], "/app", False, id="url_prefix itself"),
        pytest.param([None], "", False, id="a request refused unparsed"),
        pytest.param([], "", False, id="no request"),
    ],
)
def test_the_router_sends_a_connection_by_its_next_request(paths, url_prefix, admin):
    main, admins = Recorder(), Recorder()
    router = front.AdminRouter(main, admins, "/_lb", url_prefix)
    requests = [SimpleNamespace(path=p) if p else SimpleNamespace() for p in paths]
    channel = SimpleNamespace(requests=requests)
    router.add_task(channel)
    assert (admins.tasks, main.tasks) == (([channel], []) if admin else ([], [channel]))


def test_the_router_passes_on_thread_counts_and_stops_both():
    main, admin = Recorder(), Recorder()
    router = front.AdminRouter(main, admin, "/_lb")
    router.set_thread_count(7)
    assert router.shutdown(timeout=3) is True
    assert main.calls == [("set_thread_count", 7), ("shutdown", True, 3)]
    (stop, (name, cancel, timeout)) = admin.calls
    assert stop == ("set_thread_count", 0)  # told first: both stop meanwhile
    assert (name, cancel) == ("shutdown", True) and 2.5 < timeout <= 3


class Threaded:
    def __init__(self, threads):
        self.server_defaults = {} if threads is None else {"threads": threads}

    def __call__(self, environ, start_response):
        return []


@pytest.mark.parametrize(
    ("section", "needed", "threads", "warned"),
    [
        pytest.param("2", 8, 2, True, id="fewer than needed: kept, and said"),
        pytest.param(8, 8, 8, False, id="as many as needed"),
        pytest.param("12", 8, 12, False, id="more"),
        pytest.param(None, 8, 8, False, id="unset: the app's number"),
        pytest.param("2", None, 2, False, id="the app needs no number"),
    ],
)
def test_fewer_threads_than_the_dispatcher_needs_are_kept_with_a_warning(
    caplog, section, needed, threads, warned
):
    options = {"listen": "127.0.0.1:0"}
    if section is not None:
        options["threads"] = section
    with caplog.at_level(logging.WARNING, logger="pyramid_lb.server"):
        server = front.create_server(Threaded(needed), options)
    server.close()
    assert server.adj.threads == threads
    messages = [r.getMessage() for r in caplog.records if r.name == front.log.name]
    if warned:
        (message,) = messages
        assert message.startswith("threads = 2 in the server section, fewer than ")
        assert "the 8 the dispatcher needs" in message
        assert "wait inside waitress, unseen, without the queue's timeout" in message
    else:
        assert messages == []


def test_a_dispatcher_cannot_also_have_waitress_trust_proxies():
    class App:
        server_defaults = {}

    with pytest.raises(ValueError, match="trusted_proxy = '10.0.0.1'.*trusted_proxies"):
        front.create_server(App(), {"trusted_proxy": "10.0.0.1"})


# -- a real dispatcher, raw sockets ------------------------------------------------


@pytest.fixture(scope="module")
def instance():
    with Canned(OK) as server:
        yield server


@pytest.fixture(scope="module")
def port(module_processes, instance):
    _, url = module_processes.dispatcher(
        [f"http://127.0.0.1:{instance.port}"],
        max_body_size=str(LIMIT),
        health_check_interval="60",
    )
    return int(url.rpartition(":")[2])


def exchange(port, data: bytes, then: bytes = b"", timeout: float = 5.0):
    """Send ``data`` (and ``then`` after a pause); what came back, and whether
    the dispatcher closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout) as sock:
        sock.sendall(data)
        if then:
            time.sleep(0.1)
            try:
                sock.sendall(then)
            except OSError:  # already closed by the dispatcher
                pass
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return received, False
            except ConnectionResetError:
                return received, True
            if not data:
                return received, True
            received += data
            if b"\r\n\r\n" in received and not then:
                sock.settimeout(0.5)  # an answer: is the connection kept?
        return received, False


def paths(instance):
    return [r.request_line.split()[1] for r in instance.requests]


FRAMING = [
    pytest.param(
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        id="content-length and transfer-encoding",
    ),
    pytest.param(
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n",
        id="transfer-encoding then content-length",
    ),
    pytest.param(
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding:\r\n"
        b" chunked\r\n\r\n0\r\n\r\n",
        id="obs-folded transfer-encoding",
    ),
    pytest.param(
        b"POST /a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n",
        id="transfer-encoding in http/1.0",
    ),
    pytest.param(
        b"POST /a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        id="transfer-encoding alone in http/1.0",
    ),
    pytest.param(
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"
        b"0\r\n\r\n",
        id="chunked twice",
    ),
    pytest.param(
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        id="two transfer-encoding headers",
    ),
    pytest.param(
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-Note: one\r\n two\r\n\r\n",
        id="obs-folded header",
    ),
]


@pytest.mark.parametrize("request_", FRAMING)
def test_doubtful_framing_is_400_and_the_connection_closed(port, instance, request_):
    before = len(instance.requests)
    answer, closed = exchange(port, request_ + SMUGGLED)
    version = request_.split(b"\r\n")[0][-3:]
    assert answer.startswith(b"HTTP/%s 400 Bad Request\r\n" % version), answer
    assert len(re.findall(rb"HTTP/1\.[01] \d\d\d ", answer)) == 1
    assert closed
    assert paths(instance)[before:] == []


def test_chunked_alone_is_forwarded_with_its_length(port, instance):
    before = len(instance.requests)
    answer, _ = exchange(
        port,
        b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    (received,) = instance.requests[before:]
    assert received.body == b"abc"
    assert b"\r\nContent-Length: 3\r\n" in received.head
    assert b"transfer-encoding" not in received.head.lower()


def test_a_body_of_exactly_the_limit_is_forwarded(port, instance):
    before = len(instance.requests)
    head = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % LIMIT
    answer, _ = exchange(port, head + b"x" * LIMIT)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert [len(r.body) for r in instance.requests[before:]] == [LIMIT]


def test_a_body_over_the_limit_is_refused_before_it_is_sent(port, instance):
    before = len(instance.requests)
    head = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (LIMIT + 1)
    # Only the head goes out: the answer must not wait for the body.
    answer, closed = exchange(port, head)
    assert answer.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n"), answer
    assert closed
    assert instance.requests[before:] == []


@pytest.mark.parametrize(
    ("length", "first"),
    [
        pytest.param(LIMIT + 1, b"HTTP/1.1 413 ", id="over the limit: 413, no 100"),
        pytest.param(LIMIT, b"HTTP/1.1 100 Continue\r\n\r\n", id="at the limit: 100"),
    ],
)
def test_expect_100_continue(port, length, first):
    head = (
        b"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    )
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(head)
        answer = sock.recv(65536)
        assert answer.startswith(first), answer
        if length <= LIMIT:
            sock.sendall(b"x" * length)
            answer = b""
            while b"\r\n\r\nok" not in answer:
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        else:
            assert b"100 Continue" not in answer


def test_absolute_form_goes_on_in_origin_form_with_its_authority(port, instance):
    before = len(instance.requests)
    answer, _ = exchange(
        port, b"GET http://abs.example:8080/p/q?x=1 HTTP/1.1\r\nHost: other\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    (received,) = instance.requests[before:]
    assert received.request_line == b"GET /p/q?x=1 HTTP/1.1"
    assert b"\r\nHost: abs.example:8080\r\n" in received.head
    assert b"\r\nX-Forwarded-Host: abs.example:8080\r\n" in received.head


# -- overload: idle and slow clients ------------------------------------------------


def _raise_open_files(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def idle_keep_alive(port, count):
    """``count`` connections that each had an answer and stay open, idle."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), 10)
        sock.sendall(b"GET /idle HTTP/1.1\r\nHost: x\r\n\r\n")
        sockets.append(sock)
    for sock in sockets:
        answer = b""
        while not answer.endswith(b"\r\n\r\nok"):
            piece = sock.recv(4096)
            assert piece, f"closed after {answer!r}"
            answer += piece
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    return sockets


def test_thousands_of_idle_and_slow_clients_lock_nobody_out(port):
    """2,000 idle keep-alive connections and 300 slowloris ones (a header
    line a second, never done) at once; a normal client is answered as
    usual all along."""
    _raise_open_files(4096)
    idle = idle_keep_alive(port, 2000)
    slow = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port), 10)
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
            slow.append(sock)
        latencies = []
        deadline = time.monotonic() + 8
        line = 0
        while time.monotonic() < deadline:
            line += 1
            for sock in slow:
                sock.sendall(b"X-Slow-%d: 1\r\n" % line)
            for _ in range(10):
                started = time.perf_counter()
                (answer,) = idle_keep_alive(port, 1)  # a new client each time
                latencies.append(time.perf_counter() - started)
                answer.close()
                time.sleep(0.08)
        latencies.sort()
        assert latencies[len(latencies) // 2] < 0.1, latencies
    finally:
        for sock in idle + slow:
            sock.close()


# -- the app's own endpoints, however busy the proxy is ------------------------------


class Blocking:
    """Answers its path; ``/slow`` waits for ``release``, ``/gate`` for ``gate``."""

    admin_prefix = "/_lb"

    def __init__(self):
        self.release = threading.Event()
        self.gate = threading.Event()
        self.waiting = 0
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        event = {"/slow": self.release, "/gate": self.gate}.get(path)
        if event is not None:
            with self.lock:
                self.waiting += 1
            event.wait(5)
            with self.lock:
                self.waiting -= 1
        body = path.encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]


class Client:
    """One keep-alive connection to 127.0.0.1."""

    def __init__(self, port, timeout=1.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout)
        self.received = b""

    def send(self, *paths):
        self.sock.sendall(
            b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in paths)
        )

    def answer(self) -> bytes:
        """The body of the next answer, a 200."""
        while True:
            head, found, rest = self.received.partition(b"\r\n\r\n")
            if found:
                length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)[1])
                if len(rest) >= length:
                    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
                    self.received = rest[length:]
                    return rest[:length]
            data = self.sock.recv(65536)
            assert data, f"closed after {self.received!r}"
            self.received += data

    def timed(self, path) -> float:
        """Seconds until ``path`` is answered."""
        started = time.perf_counter()
        self.send(path)
        assert self.answer() == path
        return time.perf_counter() - started

    def silent(self, seconds=0.2) -> bool:
        self.sock.settimeout(seconds)
        try:
            return not self.sock.recv(1, socket.MSG_PEEK)
        except (TimeoutError, BlockingIOError):
            return True
        finally:
            self.sock.settimeout(1.0)

    def close(self):
        self.sock.close()


@pytest.fixture
def serve():
    """``serve(app, options)``: a server for ``app`` on 127.0.0.1, its loop in a
    thread. Afterwards the app's events are set, the clients closed, and the
    server stopped as on SIGTERM; it must leave no thread behind."""
    before = set(threading.enumerate())
    started, clients = [], []

    def start(app, options, own_paths=()):
        server = front.create_server(
            app, {"listen": "127.0.0.1:0", **options}, own_paths
        )
        stop = threading.Event()
        main_loop = front.loop_of(server)

        def loop():
            while not stop.is_set():
                main_loop.step(0.01)

        thread = threading.Thread(target=loop, daemon=True)
        started.append((app, server, stop, thread))
        thread.start()
        return server

    def connect(port):
        clients.append(Client(port))
        return clients[-1]

    start.connect = connect
    try:
        yield start
    finally:
        for app, server, stop, thread in started:
            app.release.set()
            app.gate.set()
            for client in clients:
                client.close()
            stop.set()
            thread.join(2)
            assert front.finish(server, 2)
        wait_until(lambda: set(threading.enumerate()) <= before, 2)


def ports_of(server) -> list[int]:
    listening = getattr(server, "effective_listen", None)  # several sockets
    return [port for _, port in listening] if listening else [server.effective_port]


def pending(server) -> list[int]:
    """How many requests each connection has received and not answered."""
    return sorted(
        len(channel.requests)
        for channel in front._map(server).values()
        if isinstance(channel, HTTPChannel) and channel.requests
    )


#: What "at once" allows on a loaded machine (the suite runs on two cores):
#: the requests it is compared with wait until the test releases them.
AT_ONCE = 0.5


@pytest.mark.parametrize(
    "listen",
    [
        pytest.param("127.0.0.1:0", id="one listening socket"),
        pytest.param("127.0.0.1:0 127.0.0.1:0", id="two listening sockets"),
    ],
)
def test_the_admin_endpoints_answer_while_every_proxy_thread_waits(serve, listen):
    """Both threads wait on /slow and two more /slow wait for a thread; each
    listening socket answers /_lb/stats at once all the same."""
    app = Blocking()
    server = serve(app, {"listen": listen, "threads": 2})
    ports = ports_of(server)
    blocked = [serve.connect(ports[i % len(ports)]) for i in range(4)]
    for client in blocked:
        client.send(b"/slow")
    wait_until(lambda: app.waiting == 2, 2)
    wait_until(lambda: pending(server) == [1, 1, 1, 1], 2)
    for port in ports:
        admin = serve.connect(port)
        assert admin.timed(b"/_lb/stats") < AT_ONCE
        assert admin.timed(b"/_lb") < AT_ONCE  # and again, on the same connection
    assert app.waiting == 2 and all(client.silent(0) for client in blocked)
    app.release.set()
    assert [client.answer() for client in blocked] == [b"/slow"] * 4


def test_each_request_on_a_keep_alive_connection_goes_by_its_own_path(serve):
    """A connection's proxied request, then an admin one while the proxy's
    threads are busy, then a proxied one again, which waits its turn."""
    app = Blocking()
    (port,) = ports_of(serve(app, {"threads": 2}))
    kept = serve.connect(port)
    assert kept.timed(b"/first") < 1
    for client in (serve.connect(port), serve.connect(port)):
        client.send(b"/slow")
    wait_until(lambda: app.waiting == 2, 2)
    assert kept.timed(b"/_lb/stats.json") < AT_ONCE
    kept.send(b"/proxied")
    assert kept.silent(0.2)
    app.release.set()
    assert kept.answer() == b"/proxied"
    assert kept.timed(b"/_lb/metrics") < AT_ONCE


def test_a_pipelined_admin_request_goes_to_its_threads_after_a_proxied_one(serve):
    """/gate and /_lb/stats arrive together; when /gate is answered, the
    admin request does not queue behind the /slow waiting for a thread."""
    app = Blocking()
    server = serve(app, {"threads": 2})
    (port,) = ports_of(server)
    serve.connect(port).send(b"/slow")
    wait_until(lambda: app.waiting == 1, 2)
    kept = serve.connect(port)
    kept.send(b"/gate", b"/_lb/stats")
    wait_until(lambda: app.waiting == 2 and pending(server) == [1, 2], 2)
    serve.connect(port).send(b"/slow")  # next in line for a proxy thread
    wait_until(lambda: pending(server) == [1, 1, 2], 2)
    app.gate.set()
    assert kept.answer() == b"/gate"
    started = time.perf_counter()
    assert kept.answer() == b"/_lb/stats"
    assert time.perf_counter() - started < AT_ONCE


# -- stopping --------------------------------------------------------------------------


class Parking(Blocking):
    """Keeps every request to ``/park...`` until the test resumes it, and
    answers with what it was resumed with."""

    def __init__(self):
        super().__init__()
        self.parked = []

    def park(self, resume):
        self.parked.append(resume)
        return True

    def __call__(self, environ, start_response):
        token = environ.get(front.PARKED)
        if token is None:
            return super().__call__(environ, start_response)
        body = f"{environ['PATH_INFO']} {token}".encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]


def test_an_app_may_park_a_request_before_a_thread_has_it(serve):
    """Parked: no thread runs it, the admin paths still answer; resumed
    from another thread, it runs with the token in its environ."""
    app = Parking()
    (port,) = ports_of(serve(app, {"threads": 1}))
    parked = serve.connect(port)
    parked.send(b"/park")
    wait_until(lambda: app.parked, 2)
    assert parked.silent(0.2)
    assert serve.connect(port).timed(b"/_lb/stats") < AT_ONCE
    assert app.parked == [app.parked[0]], "the admin request was parked"
    resumer = threading.Thread(target=app.parked[0], args=("slot-1",))
    resumer.start(), resumer.join(2)
    assert parked.answer() == b"/park slot-1"
    # The next request on the connection is parked again, on its own.
    parked.send(b"/park-again")
    wait_until(lambda: len(app.parked) == 2, 2)
    app.parked[1]("slot-2")
    assert parked.answer() == b"/park-again slot-2"


class Token:
    def __init__(self):
        self.abandoned = 0

    def abandon(self):
        self.abandoned += 1


def parked_connection(serve):
    """A server whose one connection has a request parked: its app, and the
    connection."""
    app = Parking()
    server = serve(app, {"threads": 1})
    (port,) = ports_of(server)
    serve.connect(port).send(b"/park")
    wait_until(lambda: app.parked, 2)
    (channel,) = [c for c in front._map(server).values() if isinstance(c, HTTPChannel)]
    return app, channel


def test_a_parked_request_of_a_closed_connection_is_abandoned(serve):
    """Waitress runs no task for a connection closed meanwhile: the token
    is told, so that what it holds (the dispatcher's slot) is not lost."""
    app, channel = parked_connection(serve)
    channel.handle_close()  # as when its client leaves
    token = Token()
    app.parked[0](token)
    assert token.abandoned == 1
    # Closed between its resume and its thread: the same.
    late, token.abandoned = Token(), 0
    channel.requests[0].parked = late
    channel.service()
    assert late.abandoned == 1
    # Cancelled by a stop, which forgets its requests: nothing to run.
    channel.cancel()
    channel.service()


def test_a_parked_request_whose_client_leaves_as_its_thread_starts_is_abandoned(
    serve,
):
    """The main loop may close the connection between the server's look at
    ``connected`` and waitress's own, which then runs no task: the token is
    told all the same."""
    app, channel = parked_connection(serve)
    token = Token()
    channel.requests[0].parked = token

    class ClosedAsItStarts(channel.task_class):
        def __init__(self, channel, request):
            super().__init__(channel, request)
            channel.connected = False  # as handle_close, on the main thread

    channel.task_class = ClosedAsItStarts
    channel.service()
    assert token.abandoned == 1, "the slot it holds leaked"


def test_a_token_the_app_was_given_is_the_apps(serve):
    """Once in the environ, what the token holds is the app's to use or
    give back: the server does not abandon it after the answer."""
    app = Parking()
    (port,) = ports_of(serve(app, {"threads": 1}))
    client = serve.connect(port)
    client.send(b"/park")
    wait_until(lambda: app.parked, 2)
    token = Token()
    app.parked[0](token)
    assert client.answer().startswith(b"/park ")
    assert token.abandoned == 0


class Handing(Parking):
    """Parks the first request; ``/end`` resumes the first parked request from inside
    ``end_here``, as the dispatcher does when an exchange frees a slot, or
    from outside it with ``/end-elsewhere``. Records each path's thread."""

    def __init__(self):
        super().__init__()
        self.threads = {}
        self.served = threading.Event()

    def park(self, resume):
        return not self.parked and super().park(resume)  # the first only

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        self.threads[path] = threading.current_thread()
        if path == "/end":
            front.end_here(lambda: self.parked[0]("slot"))
        elif path == "/end-elsewhere":
            self.parked[0]("slot")
            self.served.wait(2)  # by another thread, while this one is busy
        elif path == "/park":
            self.served.set()
        return super().__call__(environ, start_response)


@pytest.mark.parametrize(
    "path, same_thread", [("/end", True), ("/end-elsewhere", False)]
)
def test_a_slot_freed_at_an_answers_end_runs_its_parked_request_on_that_thread(
    serve, path, same_thread
):
    """No other thread is woken for it: the one freeing the slot runs it
    once its own answer is out. Resumed any other way, another thread does."""
    app = Handing()
    (port,) = ports_of(serve(app, {"threads": 4}))
    parked = serve.connect(port)
    parked.send(b"/park")
    wait_until(lambda: app.parked, 2)
    ending = serve.connect(port)
    ending.send(path.encode())
    assert ending.answer() == path.encode()
    assert parked.answer() == b"/park slot"
    assert (app.threads["/park"] is app.threads[path]) is same_thread


def test_sigterm_finishes_a_download_in_flight(processes):
    """SIGTERM in the middle of a 20 MB download to a slow client: all of it
    arrives, new connections are refused, and the dispatcher exits."""
    backend = processes.backend("big")
    dispatcher, url = processes.dispatcher([backend], server={"graceful_timeout": 20})
    port = int(url.rpartition(":")[2])

    def stop():
        dispatcher.signal(signal.SIGTERM)
        # Listening no more, while the download goes on.
        wait_until(lambda: refused(port), 5)

    assert slow_download(port, "/big?mb=20&length=yes", 20 << 20, stop) == 20 << 20
    assert dispatcher.wait(15) == 0
    assert "finishing 1 connections with requests in flight" in dispatcher.output()


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_an_instances_health_paths_answer_while_its_threads_are_busy(serve):
    """An instance whose one thread runs a slow view (the dispatcher's cap
    lets it have that many) still answers its health checks at once."""
    app = Blocking()
    app.admin_prefix = None  # an app of its own: only its health paths
    (port,) = ports_of(serve(app, {"threads": 1}, own_paths=("/healthz", "/readyz")))
    serve.connect(port).send(b"/slow")
    wait_until(lambda: app.waiting == 1, 2)
    prober = serve.connect(port)
    assert prober.timed(b"/healthz") < AT_ONCE
    assert prober.timed(b"/readyz") < AT_ONCE
    other = serve.connect(port)
    other.send(b"/other")
    assert other.silent(0.2), "another path waits for the thread"
    app.release.set()
    assert other.answer() == b"/other"


# -- answers: the head goes out with the body -----------------------------------------


class Recording:
    """A channel as a task sees it, recording what it is given to send."""

    def __init__(self, app):
        self.adj = waitress.adjustments.Adjustments()
        self.server = SimpleNamespace(
            adj=self.adj, application=app, effective_port=80, server_name="h"
        )
        self.addr = ("127.0.0.1", 1234)
        self.writes = []

    def write_soon(self, data):
        if isinstance(data, ReadOnlyFileBasedBuffer):
            data = data.get(len(data))
        self.writes.append(bytes(data))
        return len(data)

    def check_client_disconnected(self):
        return False


def answer_app(status, headers, body):
    def app(environ, start_response):
        start_response(status, list(headers))
        if body == "file":
            return environ["wsgi.file_wrapper"](io.BytesIO(b"from a file"))
        return iter(body) if isinstance(body, tuple) else body

    return app


#: status, headers, body, whether the head goes with the first piece
ANSWERS = [
    pytest.param("200 OK", [("Content-Length", "5")], [b"hello"], True, id="length"),
    pytest.param("200 OK", [], [b"hello"], True, id="one piece, no length"),
    pytest.param("200 OK", [], (b"hel", b"lo"), True, id="pieces, no length"),
    pytest.param(
        "200 OK", [("Content-Length", "5")], (b"hel", b"lo"), True, id="pieces"
    ),
    pytest.param(
        "200 OK", [("Content-Length", "5")], [b"", b"hi"], True, id="empty first"
    ),
    pytest.param("200 OK", [("Content-Length", "9")], [b"hello"], True, id="too short"),
    pytest.param("200 OK", [("Content-Length", "3")], [b"hello"], False, id="too long"),
    pytest.param("200 OK", [("Content-Length", "0")], [], False, id="empty"),
    pytest.param("204 No Content", [], [b"ignored"], False, id="204 with a body"),
    pytest.param("304 Not Modified", [], [], False, id="304"),
    pytest.param("200 OK", [], [b"x" * (front.MERGED_BODY + 1)], False, id="large"),
    pytest.param(
        "200 OK", [("Content-Length", "11")], "file", False, id="file wrapper"
    ),
    pytest.param("200 OK", [("Server", "app"), ("Date", "x")], [b"hi"], True, id="own"),
]
REQUESTS = [
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="1.1"),
    pytest.param(b"GET / HTTP/1.0\r\n\r\n", id="1.0"),
    pytest.param(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", id="1.0 kept"),
    pytest.param(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", id="head"),
]


def answered(task_class, app, head):
    """What a task of ``task_class`` sends for ``app``, and what it decided."""
    request = front.StrictRequestParser(waitress.adjustments.Adjustments())
    request.received(head)
    channel = Recording(app)
    task = task_class(channel, request)
    task.service()
    sent = re.sub(rb"\r\nDate: [^\r]*", b"", b"".join(channel.writes))
    decided = {
        k: v
        for k, v in vars(task).items()
        if k not in ("channel", "request", "environ", "start_time")
    }
    return sent, decided, len(channel.writes)


@pytest.mark.parametrize("head", REQUESTS)
@pytest.mark.parametrize(("status", "headers", "body", "merged"), ANSWERS)
def test_an_answer_is_sent_as_waitress_sends_it_in_fewer_writes(
    caplog, head, status, headers, body, merged
):
    app = answer_app(status, headers, body)
    with caplog.at_level(logging.WARNING, logger="waitress"):
        theirs = answered(WSGITask, app, head)
        warned = [r.getMessage() for r in caplog.records]
        caplog.clear()
        ours = answered(front.StrictTask, app, head)
        assert [r.getMessage() for r in caplog.records] == warned
    assert ours[:2] == theirs[:2]  # the same bytes, the same decisions
    assert ours[2] == theirs[2] - merged


def test_a_small_answer_is_one_write():
    app = answer_app("200 OK", [("Content-Length", "5")], [b"hello"])
    sent, _, writes = answered(front.StrictTask, app, REQUESTS[0].values[0])
    assert writes == 1
    assert sent.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n")
    assert sent.endswith(b"\r\n\r\nhello")


def test_an_error_answer_is_one_write():
    request = front.StrictRequestParser(waitress.adjustments.Adjustments())
    request.received(b"GET / HTTP/1.1\r\nHost: x\r\nA : b\r\n\r\n")
    sent = []
    for task_class in (ErrorTask, front.StrictErrorTask):
        channel = Recording(None)
        task_class(channel, request).service()
        sent.append(channel.writes)
    theirs, ours = sent
    assert len(ours) == 1 < len(theirs)
    assert re.sub(rb"Date: [^\r]*", b"", ours[0]) == re.sub(
        rb"Date: [^\r]*", b"", b"".join(theirs)
    )
    assert ours[0].startswith(b"HTTP/1.0 400 Bad Request\r\n")


def test_the_waitress_write_the_tasks_mirror_is_the_one_they_were_written_for():
    """HeadWithBody.write does what Task.write does, in one write: if waitress
    changes it, check the mixin again."""
    source = inspect.getsource(Task.write)
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == "f9a97135b3b5d691"
    assert front.StrictChannel.task_class is front.StrictTask
    assert front.StrictChannel.error_task_class is front.StrictErrorTask
