"""pyramid_lb.event_loop: the epoll main loop, tried with raw sockets on a real
server, each behaviour beside waitress's own loop, which must agree."""

import hashlib
import select
import socket
import threading
import time

import pytest
from waitress.channel import HTTPChannel

from pyramid_lb import event_loop as loops
from pyramid_lb import server as front
from tests.processes import wait_until

BIG = bytes(range(256)) * 256  # 64 KB, a piece of a large answer


class App:
    """``/wait`` waits for ``gate``; ``/big/N`` answers N pieces of
    :data:`BIG`; anything else answers its own path."""

    def __init__(self):
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/wait":
            self.entered.set()
            self.gate.wait(10)
        if path.startswith("/big/"):
            pieces = [BIG] * int(path[5:])
        else:
            pieces = [path.encode()]
        length = sum(map(len, pieces))
        start_response("200 OK", [("Content-Length", str(length))])
        return pieces


@pytest.fixture(params=["epoll", "wasyncore"])
def serve(request):
    """``serve(**options)``: (app, server, its loop, port) for an :class:`App`,
    the loop in a thread; the epoll loop and waitress's own loop in turn."""
    started = []

    def start(**options):
        app = App()
        server = front.create_server(
            app, {"listen": "127.0.0.1:0", "threads": 2, **options}
        )
        if request.param == "wasyncore":
            loops.WasyncoreLoop(front._map(server), 1.0).attach(server)
        main_loop = front.loop_of(server)
        stop = threading.Event()

        def run():
            while not stop.is_set():
                main_loop.step(0.01)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        started.append((app, server, stop, thread))
        return app, server, main_loop, server.effective_port

    start.kind = request.param
    try:
        yield start
    finally:
        for app, server, stop, thread in started:
            app.gate.set()
            stop.set()
            thread.join(2)
            assert front.finish(server, 2)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def request(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: x", *headers, "", ""]
    return "\r\n".join(lines).encode()


def read_answer(stream) -> tuple[bytes, dict, bytes]:
    """Status line, headers (lower-cased names) and body of one answer."""
    status = stream.readline()
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers.get("content-length", 0)))
    return status, headers, body


def channels(server) -> list:
    return [c for c in front._map(server).values() if isinstance(c, HTTPChannel)]


def count_pulls(main_loop, server) -> list:
    """Record each pull of the server's trigger (each wake-up of its loop)."""
    trigger = server.trigger
    pulls, pull = [], trigger.pull_trigger

    def counted(*args):
        pulls.append(threading.current_thread().name)
        pull(*args)

    trigger.pull_trigger = counted
    return pulls


def test_keep_alive_answers_come_in_order_and_whole(serve):
    app, server, _, port = serve()
    with connect(port) as sock, sock.makefile("rb") as stream:
        for n in range(50):
            sock.sendall(request(f"/n{n}"))
            status, _, body = read_answer(stream)
            assert (status, body) == (b"HTTP/1.1 200 OK\r\n", f"/n{n}".encode())


def test_a_keep_alive_answer_wakes_the_loop_only_under_waitress_loop(serve):
    """The worker sends a small answer itself; the epoll loop, still
    registered for the next request, needs no wake-up for it. (Each request
    waits for the one before to be done with: one that comes sooner waits,
    muted, for a wake-up.)"""
    app, server, main_loop, port = serve()
    pulls = count_pulls(main_loop, server)
    with connect(port) as sock, sock.makefile("rb") as stream:
        for n in range(20):
            sock.sendall(request(f"/n{n}"))
            assert read_answer(stream)[2] == f"/n{n}".encode()
            wait_until(lambda: not channels(server)[0].requests, 2)
    if serve.kind == "epoll":
        assert pulls == []
    else:
        assert len(pulls) >= 20


def test_bytes_that_come_while_a_request_is_served_wait_for_it(serve):
    """A request sent while the one before it is being served is read after
    its answer, and the loop does not spin on it meanwhile."""
    app, server, main_loop, port = serve()
    with connect(port) as sock, sock.makefile("rb") as stream:
        sock.sendall(request("/wait"))
        assert app.entered.wait(5)
        sock.sendall(request("/after"))
        if serve.kind == "epoll":
            (channel,) = channels(server)
            wait_until(lambda: channel in main_loop.muted, 2)
            handled = []
            dispatch = main_loop.dispatch
            main_loop.dispatch = lambda obj, ev: (
                handled.append(obj),
                dispatch(obj, ev),
            )
            time.sleep(0.3)
            assert handled.count(channel) == 0  # taken off the epoll set
        assert len(channels(server)[0].requests) == 1  # /after is not read yet
        app.gate.set()
        assert read_answer(stream)[2] == b"/wait"
        assert read_answer(stream)[2] == b"/after"
    if serve.kind == "epoll":
        assert not main_loop.muted


def test_a_client_that_hangs_up_during_a_request_gets_its_answer_then_eof(serve):
    app, server, main_loop, port = serve()
    with connect(port) as sock, sock.makefile("rb") as stream:
        sock.sendall(request("/wait"))
        assert app.entered.wait(5)
        sock.shutdown(socket.SHUT_WR)
        if serve.kind == "epoll":  # the loop saw the close, and waits
            (channel,) = channels(server)
            wait_until(lambda: channel in main_loop.muted, 2)
        app.gate.set()
        assert read_answer(stream)[2] == b"/wait"
        assert stream.read() == b""
    wait_until(lambda: not channels(server), 3)
    if serve.kind == "epoll":
        wait_until(lambda: set(main_loop.registered) <= set(front._map(server)), 3)


def test_a_large_answer_reaches_a_slow_reader_whole(serve):
    """32 MB past a 1 MB high watermark: the worker waits for the loop to
    send, the loop sends as the client reads."""
    app, server, _, port = serve(outbuf_high_watermark=1 << 20)
    with connect(port) as sock, sock.makefile("rb") as stream:
        sock.sendall(request("/big/512"))
        time.sleep(0.3)  # let every buffer on the way fill up
        status, headers, body = read_answer(stream)
    assert int(headers["content-length"]) == len(body) == 512 * len(BIG)
    assert hashlib.sha256(body).digest() == hashlib.sha256(BIG * 512).digest()


def test_closed_connections_free_their_descriptors_for_new_ones(serve):
    """Each answer to ``Connection: close`` ends in EOF; the descriptors the
    kernel hands out again serve the next connections as new ones."""
    app, server, main_loop, port = serve()
    for n in range(100):
        with connect(port) as sock, sock.makefile("rb") as stream:
            sock.sendall(request(f"/c{n}", "Connection: close"))
            assert read_answer(stream)[2] == f"/c{n}".encode()
            assert stream.read() == b""
    wait_until(lambda: not channels(server), 3)
    if serve.kind == "epoll":
        wait_until(lambda: set(main_loop.registered) <= set(front._map(server)), 3)


def test_idle_connections_are_swept(serve):
    """The idle sweep tells the loop nothing: the next full look sees it."""
    app, server, _, port = serve(channel_timeout=1, cleanup_interval=1)
    with connect(port) as sock, sock.makefile("rb") as stream:
        sock.sendall(request("/once"))
        assert read_answer(stream)[2] == b"/once"
        started = time.monotonic()
        assert stream.read() == b""  # closed by the server
        assert time.monotonic() - started < 4


def test_past_the_connection_limit_a_client_waits_its_turn(serve):
    """The map holds the listener and its trigger too: a limit of 4 admits
    two clients; a third is answered once one of them leaves."""
    app, server, _, port = serve(connection_limit=4)
    first, second = connect(port), connect(port)
    try:
        for sock in (first, second):
            sock.sendall(request("/in"))
            assert sock.recv(4096).endswith(b"/in")
        with connect(port) as third:
            third.sendall(request("/third"))
            third.settimeout(0.5)
            with pytest.raises(TimeoutError):
                third.recv(4096)
            first.close()
            third.settimeout(5)
            assert third.recv(4096).endswith(b"/third")
    finally:
        first.close()
        second.close()


def test_a_wake_up_from_outside_a_request_looks_at_every_connection():
    server = front.create_server(lambda e, s: [], {"listen": "127.0.0.1:0"})
    try:
        main_loop = front.loop_of(server)
        main_loop.step(0)
        pulls = count_pulls(main_loop, server)
        thread = threading.Thread(target=server.pull_trigger)
        thread.start()
        thread.join()
        assert main_loop.rescan_asked and len(pulls) == 1
        main_loop.step(0)
        assert not main_loop.rescan_asked
    finally:
        assert front.finish(server, 1)


def test_every_listening_socket_shares_one_loop():
    server = front.create_server(lambda e, s: [], {"listen": "127.0.0.1:0 127.0.0.1:0"})
    try:
        main_loop = front.loop_of(server)
        assert front.loop_of(server) is main_loop
        assert all(
            listener.event_loop is main_loop and listener.pull_trigger == main_loop.wake
            for listener in front._listeners(server)
        )
    finally:
        assert front.finish(server, 1)


# -- the loop's own bookkeeping, driven step by step -----------------------------


@pytest.fixture
def stepped():
    """A server whose loop the test steps itself: (server, loop)."""
    server = front.create_server(lambda e, s: [], {"listen": "127.0.0.1:0"})
    main_loop = front.loop_of(server)
    main_loop.step(0)
    try:
        yield server, main_loop
    finally:
        assert front.finish(server, 1)


class Busy:
    """A connection being served: neither readable nor writable."""

    _fileno, accepting = 10_001, False

    def readable(self):
        return False

    def writable(self):
        return False


def test_a_hang_up_on_a_connection_being_served_mutes_it(stepped):
    """Reported at every wait, a hang-up would spin the loop until the
    answer is done: poll2 would not have polled the connection at all."""
    server, main_loop = stepped
    busy = Busy()
    main_loop.map[busy._fileno] = busy
    try:
        main_loop.dispatch(busy, select.EPOLLHUP)
        assert busy in main_loop.muted
    finally:
        del main_loop.map[busy._fileno]


def test_a_registration_dropped_by_a_worker_during_a_rescan(stepped):
    """A worker may close its connection (and drop its registration) while
    the main thread walks the registrations."""
    server, main_loop = stepped
    for fd in range(10_000, 10_010):  # closed connections, not in the map
        main_loop.registered[fd] = (object(), 0)

    class Map(dict):
        def __contains__(self, fd):
            main_loop.registered.pop(10_005, None)  # the worker's removed()
            return super().__contains__(fd)

    main_loop.map = Map(main_loop.map)
    try:
        main_loop.rescan(time.monotonic())
        assert not set(main_loop.registered) - set(main_loop.map)
    finally:
        main_loop.map = front._map(server)


def test_a_graceful_stop_starts_from_fresh_registrations(stepped):
    """SIGTERM may come between an epoll_ctl() and its note in
    ``registered``: the stop's reset makes them all again from the map."""
    server, main_loop = stepped
    old = main_loop.epoll
    main_loop.registered[server._fileno] = (server, select.EPOLLOUT)  # out of step
    main_loop.reset()
    main_loop.step(0)
    assert main_loop.epoll is not old and old.closed
    assert main_loop.registered[server._fileno] == (server, loops.READ)


def test_the_idle_sweep_makes_the_loop_look_at_every_connection(stepped):
    server, main_loop = stepped
    main_loop.rescan_due = time.monotonic() + 60  # no timed rescan here
    main_loop.step(0)
    assert not main_loop.rescan_asked
    server.next_channel_cleanup = 0  # due: the next readable() sweeps
    main_loop.update_servers()
    assert main_loop.rescan_asked
