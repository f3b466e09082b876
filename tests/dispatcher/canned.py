"""A real TCP server for tests that answers requests with scripted bytes.

``Canned(answer)`` listens on 127.0.0.1, port 0, and serves each connection
in a thread: it reads a request (head, then a Content-Length body, hashed as
it arrives), records it, and sends the reply ``answer`` gives for it. A
reply is bytes, or a list of steps run in order:

- bytes: written with one ``sendall``;
- a ``Gate``: wait until the test opens it (to make a body arrive in
  separate reads, deterministically); ``stop`` opens every gate;
- ``CLOSE``: close the connection; ``RESET``: close it with a TCP reset;
- ``HANG``: answer nothing and keep the connection open until the server
  stops.

``answer`` is either a reply, given to every request, or a callable taking
the ``Received`` request and returning its reply (``in_turn`` builds one
that gives replies in order). With ``read_bodies=False`` the server replies
after the head, without reading the body; ``rcvbuf`` shrinks its receive
buffers, so that a client's writes block soon when it stops reading.

``requests`` lists what arrived, ``connections`` counts the connections
accepted, and ``close_idle``/``reset_idle`` close those waiting for a
request, as an instance's keep-alive timeout would.
"""

from __future__ import annotations

import hashlib
import io
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

CLOSE = "close"
RESET = "reset"
HANG = "hang"
#: Bodies up to this size are kept whole in ``Received.body``.
KEPT_BODY = 1 << 20
#: Longest a step waits for the test (a Gate) before the server gives up.
GATE_TIMEOUT = 5.0


class Gate:
    """A point in a reply where the server waits for the test."""

    def __init__(self):
        self._event = threading.Event()

    def open(self) -> None:
        self._event.set()

    def wait(self) -> None:
        if not self._event.wait(GATE_TIMEOUT):
            # Not TimeoutError: an OSError would pass for the client leaving.
            raise RuntimeError("the test never opened the gate")


@dataclass
class Received:
    """One request as the server read it."""

    connection: int  # 0 for the first connection accepted, and so on
    head: bytes
    length: int = 0
    digest: str = hashlib.sha256().hexdigest()
    body: bytes | None = b""  # None when longer than KEPT_BODY or not read

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]


def in_turn(*replies) -> Callable[[Received], object]:
    """An answer giving ``replies`` to successive requests, then ``HANG``."""
    left = list(replies)

    def answer(request: Received):
        return left.pop(0) if left else HANG

    return answer


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@dataclass
class _Connection:
    number: int
    sock: socket.socket
    thread: threading.Thread | None = None
    idle: bool = True
    buffer: bytearray = field(default_factory=bytearray)


class Canned:
    """The server; a context manager that stops it and closes everything."""

    def __init__(self, answer, *, read_bodies: bool = True, rcvbuf: int | None = None):
        self._answer = answer if callable(answer) else (lambda request: answer)
        self.read_bodies = read_bodies
        self.requests: list[Received] = []
        #: How many connections were accepted.
        self.connections = 0
        self._lock = threading.Lock()
        self._open: list[_Connection] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._gates: list[Gate] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf is not None:  # inherited by accepted connections
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def __enter__(self) -> Canned:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def close_idle(self) -> int:
        """Close the connections waiting for a request; how many there were.

        Returns once the server's side of each is closed.
        """
        with self._lock:
            idle = [c for c in self._open if c.idle]
        for connection in idle:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for connection in idle:
            connection.thread.join(GATE_TIMEOUT)
        return len(idle)

    def reset_idle(self) -> int:
        """Like ``close_idle``, with a TCP reset instead of an orderly close."""
        with self._lock:
            idle = [c for c in self._open if c.idle]
        for connection in idle:
            _linger_zero(connection.sock)
            try:
                connection.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        for connection in idle:
            connection.thread.join(GATE_TIMEOUT)
        return len(idle)

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._acceptor.join(GATE_TIMEOUT)
        self._listener.close()
        for gate in self._gates:
            gate.open()
        with self._lock:
            open_now = list(self._open)
        for connection in open_now:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(GATE_TIMEOUT)
            if thread.is_alive():
                raise RuntimeError("a canned connection thread did not stop")

    # -- serving ---------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            # Each write its own segment, at once (no Nagle delay).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                connection = _Connection(self.connections, sock)
                self.connections += 1
                self._open.append(connection)
                thread = threading.Thread(
                    target=self._serve, args=(connection,), daemon=True
                )
                connection.thread = thread
                self._threads.append(thread)
            thread.start()

    def _serve(self, connection: _Connection) -> None:
        sock = connection.sock
        try:
            while not self._stopping.is_set():
                request = self._read_request(connection)
                if request is None:
                    return
                with self._lock:
                    self.requests.append(request)
                reply = self._answer(request)
                if not self._reply(connection, reply):
                    return
        except OSError:  # the client went away
            pass
        finally:
            with self._lock:
                self._open.remove(connection)
            sock.close()

    def _read_request(self, connection: _Connection) -> Received | None:
        sock, buffer = connection.sock, connection.buffer
        connection.idle = not buffer
        while b"\r\n\r\n" not in buffer:
            data = sock.recv(65536)
            if not data:
                return None
            connection.idle = False
            buffer += data
        end = buffer.index(b"\r\n\r\n") + 4
        head = bytes(buffer[:end])
        del buffer[:end]
        length = _content_length(head)
        request = Received(connection.number, head, length)
        if not self.read_bodies:
            request.body = None
            return request
        digest = hashlib.sha256()
        kept = bytearray() if length <= KEPT_BODY else None
        left = length
        while left:
            if not buffer:
                data = sock.recv(min(left, 1 << 20))
                if not data:
                    return None
                buffer += data
            piece = bytes(buffer[:left])
            del buffer[: len(piece)]
            left -= len(piece)
            digest.update(piece)
            if kept is not None:
                kept += piece
        request.digest = digest.hexdigest()
        request.body = None if kept is None else bytes(kept)
        return request

    def _reply(self, connection: _Connection, reply) -> bool:
        """Send a reply; False when the connection is to end."""
        sock = connection.sock
        steps = reply if isinstance(reply, list) else [reply]
        for number, step in enumerate(steps, 1):
            if isinstance(step, bytes):
                if number == len(steps):
                    # Idle before the client can have the whole reply, so
                    # that close_idle() right after it finds the connection.
                    connection.idle = True
                sock.sendall(step)
            elif isinstance(step, Gate):
                self._gates.append(step)  # for stop() to open
                if self._stopping.is_set():
                    return False
                step.wait()
            elif step == CLOSE:
                return False
            elif step == RESET:
                _linger_zero(sock)
                return False
            elif step == HANG:
                self._stopping.wait()
                return False
            else:
                raise ValueError(f"unknown reply step {step!r}")
        return True


def _linger_zero(sock: socket.socket) -> None:
    """Make the next close send a reset rather than an orderly FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def call(app, method="GET", path="/", **environ):
    """Run a WSGI app in process, as a server would (its body closed at the
    end): (status, headers as a dict, body). A key of ``environ`` given as
    None is left out."""
    env = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "example.org",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "example.org:8080",
        "REMOTE_ADDR": "192.0.2.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        **environ,
    }
    env = {key: value for key, value in env.items() if value is not None}
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = status, dict(headers)

    body = app(env, start_response)
    try:
        data = b"".join(body)
    finally:
        getattr(body, "close", lambda: None)()
    return seen["status"], seen["headers"], data
