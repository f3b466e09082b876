"""The HTTP/1.1 client to the instances, against a canned server on loopback."""

import hashlib
import io
import os
import select
import socket
import struct
import threading
import time

import pytest

from pyramid_lb.dispatcher import upstream
from pyramid_lb.dispatcher.upstream import (
    MAX_HEAD,
    NO_BODY,
    SMALL_BODY,
    BadResponse,
    Body,
    ConnectFailed,
    Pool,
    ReadTimeout,
    ShortBody,
    StaleConnection,
    UpstreamError,
    exchange,
)
from tests.dispatcher.canned import CLOSE, HANG, RESET, Canned, Gate, in_turn
from tests.dispatcher.site import free_port

GET = b"GET / HTTP/1.1\r\nHost: instance\r\n\r\n"
HEAD = b"HEAD / HTTP/1.1\r\nHost: instance\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
GARBAGE = b"this is not HTTP\r\n\r\n"


def post(length: int) -> bytes:
    return b"POST /p HTTP/1.1\r\nHost: instance\r\nContent-Length: %d\r\n\r\n" % length


@pytest.fixture
def serve():
    """Start canned servers, each with a pool to it; all closed at the end."""
    started = []

    def start(answer, *, read_bodies=True, rcvbuf=None, pool_class=Pool, **options):
        server = Canned(answer, read_bodies=read_bodies, rcvbuf=rcvbuf)
        options.setdefault("read_timeout", 1.0)
        options.setdefault("connect_timeout", 1.0)
        pool = pool_class("127.0.0.1", server.port, **options)
        started.append((server, pool))
        return server, pool

    try:
        yield start
    finally:
        for server, pool in started:
            pool.clear()
            server.stop()


def fetch(pool, head=GET, body=NO_BODY, *, head_only=False, replayable=False):
    """One whole exchange: the response (released) and its body."""
    response = exchange(pool, head, body, head_only, replayable)
    try:
        received = response.take_buffered() + b"".join(response.stream())
    finally:
        response.release()
    return response, received


def wait_readable(sock: socket.socket) -> None:
    """Wait until the instance's close (or bytes) reached a pooled socket."""
    readable, _, _ = select.select([sock], [], [], 1.0)
    assert readable, "the pooled connection never became readable"


def only_idle(pool: Pool) -> socket.socket:
    assert len(pool._idle) == 1
    return pool._idle[0]


class Zeros(io.RawIOBase):
    """A large body that takes no memory: ``length`` zero bytes."""

    def __init__(self, length: int, seekable: bool = True):
        self.length, self.position, self._seekable = length, 0, seekable

    def readable(self):
        return True

    def seekable(self):
        return self._seekable

    def tell(self):
        return self.position

    def seek(self, offset, whence=0):
        self.position = offset
        return offset

    def read(self, size=-1):
        size = min(size, self.length - self.position)
        self.position += size
        return bytes(size)


# -- bodies and framing -------------------------------------------------------


@pytest.mark.parametrize(
    "reply, body, pooled",
    [
        pytest.param(OK, b"ok", True, id="content-length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"", True, id="empty"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
            b'5;name=value\r\nhello\r\n6;a;b="c d"\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n',
            b"hello world",
            True,
            id="chunked with extensions and trailers",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n",
            b"abc",
            True,
            id="chunked last",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\n\r\nuntil the close", CLOSE],
            b"until the close",
            False,
            id="close-delimited",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzipped", CLOSE],
            b"zipped",
            False,
            id="transfer-encoding without chunked runs until the close",
        ),
        pytest.param(
            [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                b"Transfer-Encoding: gzip\r\n\r\n3\r\nabc\r\n",
                CLOSE,
            ],
            b"3\r\nabc\r\n",
            False,
            id="chunked not last runs until the close",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"],
            b"ok",
            False,
            id="connection close",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\n\r\nok", CLOSE],
            b"ok",
            False,
            id="connection close among tokens",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\n"
            b"Content-Length: 2\r\n\r\nok",
            b"ok",
            False,
            id="a second connection header does not undo close",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: x-closed\r\nContent-Length: 2\r\n\r\nok",
            b"ok",
            True,
            id="a token containing close is not close",
        ),
        pytest.param(
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"ok",
            False,
            id="http/1.0",
        ),
        pytest.param(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
            b"ok",
            True,
            id="http/1.0 keep-alive",
        ),
        pytest.param(
            [b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\nok", CLOSE],
            b"ok",
            False,
            id="http/1.0 keep-alive without a length",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"
            b"Content-Length: 8\r\n\r\nsmuggled",
            b"ok",
            False,
            id="a response after the body is not taken for it",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokgarbage",
            b"ok",
            False,
            id="garbage after the body",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nokX",
            b"ok",
            False,
            id="bytes after a closing response",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\r\n",
            b"ok",
            True,
            id="a stray CRLF after the body",
        ),
    ],
)
def test_body_and_reuse(serve, reply, body, pooled):
    server, pool = serve(reply)
    response, received = fetch(pool)
    assert response.status == 200
    assert received == body
    assert response.keep_alive is pooled
    assert len(pool._idle) == (1 if pooled else 0)
    assert fetch(pool)[1] == body
    assert server.connections == (1 if pooled else 2)
    assert [r.connection for r in server.requests] == ([0, 0] if pooled else [0, 1])


def test_until_close_flags(serve):
    server, pool = serve([b"HTTP/1.1 200 OK\r\n\r\nbody", CLOSE])
    response = exchange(pool, GET)
    try:
        assert response.until_close
        assert not response.keep_alive
        assert response.length is None
        assert response.arrived_whole() is None
    finally:
        response.close()


def test_body_split_across_writes(serve):
    """Each piece arrives in its own read, and the parser resumes mid-chunk."""
    gates = [Gate() for _ in range(4)]
    _, pool = serve(
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhe",
            gates[0],
            b"llo\r\n1",
            gates[1],
            b"0\r\n0123456789",
            gates[2],
            b"ABCDEF\r\n0\r",
            gates[3],
            b"\n\r\n",
        ]
    )
    response = exchange(pool, GET)
    try:
        assert response.take_buffered() == b"he"
        assert response.take_buffered() == b""
        pieces = response.stream()
        gates[0].open()
        assert next(pieces) == b"llo"
        gates[1].open()
        assert next(pieces) == b"0123456789"
        gates[2].open()
        assert next(pieces) == b"ABCDEF"
        assert not response.complete
        gates[3].open()
        assert list(pieces) == []
        assert response.complete
    finally:
        response.release()
    assert len(pool._idle) == 1


def test_body_in_many_writes(serve):
    chunks = [b"%x\r\n%s\r\n" % (n, bytes([65 + n % 26]) * n) for n in range(1, 300)]
    expected = b"".join(bytes([65 + n % 26]) * n for n in range(1, 300))
    length = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(expected)
    server, pool = serve(
        in_turn(
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", *chunks]
            + [b"0\r\n\r\n"],
            [length] + [expected[i : i + 7] for i in range(0, len(expected), 7)],
        )
    )
    assert fetch(pool)[1] == expected
    assert fetch(pool)[1] == expected
    assert server.connections == 1


def test_several_chunks_with_the_head(serve):
    _, pool = serve(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\na\r\n1\r\nb\r\n1\r\nc\r\n0\r\n\r\n"
    )
    response = exchange(pool, GET)
    try:
        assert response.complete
        assert response.take_buffered() == b"abc"
    finally:
        response.release()
    assert len(pool._idle) == 1


def test_stream_joins_chunks_of_one_read(serve):
    gate = Gate()
    _, pool = serve(
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            gate,
            b"1\r\na\r\n1\r\nb\r\n0\r\n\r\n",
        ]
    )
    response = exchange(pool, GET)
    try:
        gate.open()
        assert list(response.stream()) == [b"ab"]
    finally:
        response.release()


def test_response_after_the_body_is_not_streamed(serve):
    """A response following the body in the same read is no part of it."""
    gate = Gate()
    _, pool = serve(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbo",
            gate,
            b"dyHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled",
        ]
    )
    response = exchange(pool, GET)
    try:
        assert response.keep_alive
        gate.open()
        assert response.take_buffered() + b"".join(response.stream()) == b"body"
        assert response.complete
        assert not response.keep_alive
    finally:
        response.release()
    assert pool._idle == []


@pytest.mark.parametrize(
    ("reply", "body"),
    [
        pytest.param(OK, b"ok", id="declared length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n",
            b"ok",
            id="chunked",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (SMALL_BODY + 1)
            + bytes(SMALL_BODY + 1),
            None,
            id="larger than one read",
        ),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", b"", id="no body"),
    ],
)
def test_a_body_that_came_with_the_head_is_taken_whole(serve, reply, body):
    _, pool = serve(reply)
    response = exchange(pool, GET)
    try:
        assert response.arrived_whole() == body
    finally:
        response.close()


def test_a_body_still_arriving_is_not_waited_for(serve):
    gate = Gate()
    _, pool = serve([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no", gate, b"k"])
    response = exchange(pool, GET)
    try:
        assert response.arrived_whole() is None
        assert response.take_buffered() == b"o"
        gate.open()
        assert b"".join(response.stream()) == b"k"
        assert response.complete
    finally:
        response.release()
    assert len(pool._idle) == 1


# -- responses without a body and interim responses ---------------------------


def test_head_with_content_length(serve):
    server, pool = serve(
        in_turn(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", OK)
    )
    response = exchange(pool, HEAD, head_only=True)
    try:
        assert response.no_body
        assert response.complete
        assert response.length == 1000
        assert ("Content-Length", "1000") in response.headers
        assert response.arrived_whole() == b""
        assert list(response.stream()) == []
    finally:
        response.release()
    # Not reused: an instance may send a body after HEAD anyway (plain WSGI
    # apps under waitress do), which the next request would read.
    assert pool._idle == []
    assert fetch(pool)[1] == b"ok"
    assert server.connections == 2


def test_body_sent_after_head_is_never_read_as_the_next_answer(serve):
    server, pool = serve(in_turn(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", OK))
    response = exchange(pool, HEAD, head_only=True)
    response.release()
    assert fetch(pool)[1] == b"ok"


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody", id="with a length"
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nX", id="empty"),
    ],
)
def test_head_answered_with_a_body(serve, reply):
    """Bytes after a body-less response: the connection is out of step."""
    _, pool = serve(reply)
    response, received = fetch(pool, HEAD, head_only=True)
    assert received == b""
    assert not response.keep_alive
    assert pool._idle == []


@pytest.mark.parametrize(
    "reply, status",
    [
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", 204, id="204"),
        pytest.param(
            b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
            204,
            id="204 claiming chunked",
        ),
        pytest.param(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\nETag: x\r\n\r\n",
            304,
            id="304 with the length of the full body",
        ),
    ],
)
def test_no_body_statuses(serve, reply, status):
    server, pool = serve(in_turn(reply, OK))
    response, received = fetch(pool)
    assert response.status == status
    assert response.no_body
    assert received == b""
    assert fetch(pool)[1] == b"ok"
    assert server.connections == 1


def test_response_after_204_is_not_taken_for_it(serve):
    server, pool = serve(
        in_turn(
            b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 Smuggled\r\n"
            b"Content-Length: 8\r\n\r\nsmuggled",
            OK,
        )
    )
    response, received = fetch(pool)
    assert (response.status, response.reason, received) == (204, b"No Content", b"")
    assert response.headers == []
    assert not response.keep_alive
    assert fetch(pool)[1] == b"ok"
    assert server.connections == 2


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            id="one write",
        ),
        pytest.param(
            [
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            ],
            id="separate writes",
        ),
    ],
)
def test_interim_responses_skipped(serve, reply):
    server, pool = serve(reply)
    response, received = fetch(pool)
    assert (response.status, response.reason) == (200, b"OK")
    assert response.headers == [("Content-Length", "2")]
    assert received == b"ok"
    fetch(pool)
    assert server.connections == 1


def test_no_reason_phrase(serve):
    _, pool = serve(b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n")
    response, _ = fetch(pool)
    assert (response.status, response.reason) == (200, b"")


# -- the pool -----------------------------------------------------------------


def test_keep_alive_reuses_one_connection(serve):
    server, pool = serve(OK)
    for _ in range(3):
        assert fetch(pool)[1] == b"ok"
    assert server.connections == 1
    assert [r.connection for r in server.requests] == [0, 0, 0]


def test_pool_size(serve):
    server, pool = serve(OK, pool_size=1)
    first, second = exchange(pool, GET), exchange(pool, GET)
    sockets = [first.sock, second.sock]
    assert sockets[0] is not sockets[1]
    for response in (first, second):
        assert response.take_buffered() == b"ok"
        response.release()
    assert pool._idle == [sockets[0]]
    assert sockets[1].fileno() == -1
    assert server.connections == 2


def test_pool_size_zero_pools_nothing(serve):
    server, pool = serve(OK, pool_size=0)
    fetch(pool)
    fetch(pool)
    assert pool._idle == []
    assert server.connections == 2


def test_release_and_close_are_idempotent(serve):
    _, pool = serve(OK)
    response = exchange(pool, GET)
    response.close()
    response.close()
    response.release()
    assert pool._idle == []


def test_abandoned_stream_closes_the_connection(serve):
    gate = Gate()
    _, pool = serve([b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab", gate, b"cd"])
    response = exchange(pool, GET)
    sock = response.sock
    response.release()  # the body is unread: never pooled
    gate.open()
    assert pool._idle == []
    assert sock.fileno() == -1


def test_clear(serve):
    _, pool = serve(OK)
    responses = [exchange(pool, GET) for _ in range(3)]
    sockets = [r.sock for r in responses]
    for response in responses:
        response.arrived_whole()
        response.release()
    assert len(pool._idle) == 3
    pool.clear()
    assert pool._idle == []
    assert all(sock.fileno() == -1 for sock in sockets)


@pytest.mark.parametrize("replayable", [False, True], ids=["checked", "replayable"])
def test_connection_closed_while_idle_is_replaced(serve, replayable):
    """The instance closed a pooled connection: a fresh one, one request."""
    server, pool = serve(OK)
    fetch(pool)
    assert server.close_idle() == 1
    wait_readable(only_idle(pool))
    response, received = fetch(pool, replayable=replayable)
    assert (response.status, received) == (200, b"ok")
    assert server.connections == 2
    assert [r.connection for r in server.requests] == [0, 1]


@pytest.mark.parametrize("replayable", [False, True], ids=["checked", "replayable"])
def test_connection_reset_while_idle_is_replaced(serve, replayable):
    server, pool = serve(OK)
    fetch(pool)
    assert server.reset_idle() == 1
    wait_readable(only_idle(pool))
    response, received = fetch(pool, replayable=replayable)
    assert received == b"ok"
    assert [r.connection for r in server.requests] == [0, 1]


def test_bytes_on_an_idle_connection_discard_it(serve):
    """An instance speaking out of turn: the check keeps it from a request."""
    gate = Gate()
    server, pool = serve(
        in_turn(
            [OK, gate, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad"],
            OK,
        )
    )
    fetch(pool)
    gate.open()
    wait_readable(only_idle(pool))
    assert fetch(pool)[1] == b"ok"
    assert server.connections == 2


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(lambda: NO_BODY, id="no body"),
        pytest.param(lambda: Body(io.BytesIO(b"x" * 1000), 1000), id="small"),
        pytest.param(
            lambda: Body(Zeros(3 * SMALL_BODY), 3 * SMALL_BODY), id="from a file"
        ),
    ],
)
@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_replayable_request_retried_with_its_body(serve, body, reset):
    server, pool = serve(OK)
    fetch(pool)
    (server.reset_idle if reset else server.close_idle)()
    wait_readable(only_idle(pool))
    body = body()
    head = post(body.length) if body.length else GET
    assert fetch(pool, head, body, replayable=True)[1] == b"ok"
    assert len(server.requests) == 2
    request = server.requests[1]
    assert request.connection == 1
    assert request.length == body.length
    if body.file is None:
        assert request.body == body.data
    else:
        assert request.digest == hashlib.sha256(bytes(body.length)).hexdigest()


def test_request_not_sent_twice_once_sent(serve):
    """A checked connection fails after the request went: no second try."""
    server, pool = serve(in_turn(OK, CLOSE))
    fetch(pool)
    with pytest.raises(UpstreamError) as caught:
        exchange(pool, post(4), Body(io.BytesIO(b"data"), 4))
    assert type(caught.value) is UpstreamError
    assert (caught.value.sent, caught.value.received) == (True, False)
    assert server.connections == 1
    assert len(server.requests) == 2


def test_body_cut_off_on_a_pooled_connection_is_not_resent(serve):
    """The instance resets mid-body: it saw the head, so no retry.

    (It was reported as a stale connection, not sent, and sent again.)
    """
    server, pool = serve(in_turn(OK, RESET), read_bodies=False)
    fetch(pool)
    length = 64 << 20
    with pytest.raises(UpstreamError) as caught:
        exchange(pool, post(length), Body(Zeros(length), length))
    assert not isinstance(caught.value, StaleConnection)
    assert caught.value.sent
    assert "sending the request failed" in str(caught.value)
    assert len(server.requests) == 2
    assert server.connections == 1


def test_unreplayable_body_not_retried(serve):
    server, pool = serve(OK)
    fetch(pool)
    server.reset_idle()
    wait_readable(only_idle(pool))
    length = 2 * SMALL_BODY
    with pytest.raises(StaleConnection) as caught:
        exchange(pool, post(length), Body(Zeros(length, False), length), False, True)
    assert not caught.value.sent
    assert server.connections == 1


def test_read_timeout_on_a_pooled_connection_not_retried(serve):
    server, pool = serve(in_turn(OK, HANG), read_timeout=0.2)
    fetch(pool)
    with pytest.raises(ReadTimeout):
        exchange(pool, GET, replayable=True)
    assert server.connections == 1


def test_retry_fails_too(serve):
    server, pool = serve(in_turn(OK, GARBAGE))
    fetch(pool)
    server.close_idle()
    wait_readable(only_idle(pool))
    with pytest.raises(BadResponse):
        exchange(pool, GET, replayable=True)
    assert server.connections == 2


def test_retry_cannot_connect(serve):
    server, pool = serve(OK)
    fetch(pool)
    server.stop()
    wait_readable(only_idle(pool))
    with pytest.raises(ConnectFailed):
        exchange(pool, GET, replayable=True)
    assert pool._idle == []


class SendClosedPool(Pool):
    """New connections shut for writing: the first write fails, nothing sent."""

    def connect(self):
        sock = super().connect()
        sock.shutdown(socket.SHUT_WR)
        return sock


def test_first_write_fails_on_a_new_connection(serve):
    server, pool = serve(OK, pool_class=SendClosedPool)
    with pytest.raises(UpstreamError) as caught:
        exchange(pool, GET, replayable=True)
    assert type(caught.value) is UpstreamError
    assert (caught.value.sent, caught.value.received) == (False, False)
    assert pool._idle == []


class SmallBuffersPool(Pool):
    def connect(self):
        sock = super().connect()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return sock


@pytest.mark.parametrize(
    "length", [pytest.param(SMALL_BODY, id="with the head"), pytest.param(8 << 20)]
)
def test_send_timeout(serve, length):
    """The instance stops reading: the request times out, counted as sent."""
    server, pool = serve(
        HANG,
        read_bodies=False,
        rcvbuf=4096,
        pool_class=SmallBuffersPool,
        read_timeout=0.2,
    )
    if length <= SMALL_BODY:
        body = Body(io.BytesIO(bytes(length)), length)
    else:
        body = Body(Zeros(length), length)
    started = time.monotonic()
    with pytest.raises(UpstreamError, match="sending the request timed out") as caught:
        exchange(pool, post(length), body)
    assert caught.value.sent
    assert time.monotonic() - started < 1.5
    assert len(server.requests) == 1


# -- errors -------------------------------------------------------------------


def test_connection_refused():
    port = free_port()
    pool = Pool("127.0.0.1", port)
    with pytest.raises(ConnectFailed, match="failed") as caught:
        exchange(pool, GET)
    assert (caught.value.sent, caught.value.received) == (False, False)
    assert caught.value.status == 502


def test_connect_timeout():
    """A full accept queue drops the SYN: the connect times out."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        with socket.create_connection(address):  # fills the queue
            pool = Pool(*address, connect_timeout=0.2)
            started = time.monotonic()
            with pytest.raises(ConnectFailed, match="timed out after 0.2s") as caught:
                exchange(pool, GET)
            assert time.monotonic() - started < 1.0
    assert not caught.value.sent


def half_head(count):
    return b"".join(b"X-Filler-%05d: 0123456789\r\n" % i for i in range(count))


@pytest.mark.parametrize(
    ("second", "refused"),
    [
        pytest.param(half_head(1600) + b"Content-Length: 2\r\n\r\nok", True, id="over"),
        pytest.param(
            b"Content-Length: 70000\r\n\r\n" + bytes(70000), False, id="under"
        ),
    ],
)
def test_head_limit_holds_across_reads(serve, second, refused):
    """A head ending in the read that takes it past the limit is refused; the
    body read with it does not count."""
    gate = Gate()
    first = b"HTTP/1.1 200 OK\r\n" + half_head(1600)  # about 3/4 of the limit
    assert MAX_HEAD // 2 < len(first) < MAX_HEAD
    _, pool = serve([first, gate, second])
    threading.Timer(0.2, gate.open).start()
    if refused:
        with pytest.raises(BadResponse, match="head is larger than"):
            exchange(pool, GET)
        return
    response = exchange(pool, GET)
    try:
        assert response.status == 200
    finally:
        response.close()


@pytest.mark.parametrize(
    "reply, error, message, received",
    [
        pytest.param(
            CLOSE,
            UpstreamError,
            "closed the connection without a response",
            False,
            id="closed without answering",
        ),
        pytest.param(
            RESET, UpstreamError, "reading the response failed", False, id="reset"
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nContent-", CLOSE],
            UpstreamError,
            "closed the connection mid-response",
            True,
            id="closed mid-head",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nContent-", RESET],
            UpstreamError,
            "reading the response failed",
            True,
            id="reset mid-head",
        ),
        pytest.param(GARBAGE, BadResponse, "invalid response", True, id="garbage"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            BadResponse,
            "Content-Length",
            True,
            id="content-length with transfer-encoding",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            BadResponse,
            "Content-Length",
            True,
            id="transfer-encoding with content-length",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
            BadResponse,
            "Duplicate Content-Length",
            True,
            id="duplicate content-length",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
            BadResponse,
            "Content-Length",
            True,
            id="content-length list",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
            BadResponse,
            "invalid response",
            True,
            id="bare LF",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\nContent-Length: 2\r\n\r\nok",
            BadResponse,
            "invalid response",
            True,
            id="obsolete line folding",
        ),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: upgrade\r\n\r\n",
            BadResponse,
            "switched protocols unasked",
            True,
            id="101",
        ),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            BadResponse,
            "switched protocols unasked",
            True,
            id="101 without upgrade headers",
        ),
        pytest.param(
            b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n",
            BadResponse,
            "invalid response status 0",
            True,
            id="status 000",
        ),
        pytest.param(
            b"HTTP/1.1 600 Six\r\nContent-Length: 0\r\n\r\n",
            BadResponse,
            "invalid response status 600",
            True,
            id="status 600",
        ),
        pytest.param(
            [b"HTTP/1.1 100 Continue\r\n\r\n" * (MAX_HEAD // 10), HANG],
            BadResponse,
            "head is larger than",
            True,
            id="endless interim responses",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\n" + b"X-Filler: 0123456789\r\n" * 10000, HANG],
            BadResponse,
            "head is larger than",
            True,
            id="head too large",
        ),
    ],
)
def test_exchange_errors(serve, reply, error, message, received):
    server, pool = serve(reply)
    with pytest.raises(error, match=message) as caught:
        exchange(pool, GET)
    assert type(caught.value) is error
    assert caught.value.sent
    assert caught.value.received is received
    assert caught.value.status == 502
    assert pool._idle == []
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "reply, error, message",
    [
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n"],
            BadResponse,
            "chunk size",
            id="bad chunk size",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", CLOSE],
            UpstreamError,
            "closed the connection mid-body",
            id="truncated body",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nha", CLOSE],
            UpstreamError,
            "closed the connection mid-body",
            id="truncated chunk",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", RESET],
            UpstreamError,
            "reading the body failed",
            id="reset mid-body",
        ),
    ],
)
def test_errors_mid_body(serve, reply, error, message):
    gate = Gate()
    # The head arrives alone, so that the error is surely mid-body.
    head, _, rest = reply[0].partition(b"\r\n\r\n")
    _, pool = serve([head + b"\r\n\r\n", gate, rest, *reply[1:]])
    response = exchange(pool, GET)
    try:
        gate.open()
        with pytest.raises(error, match=message) as caught:
            b"".join(response.stream())
    finally:
        response.release()
    assert type(caught.value) is error
    assert caught.value.received
    assert pool._idle == []


def test_read_timeout(serve):
    server, pool = serve(HANG, read_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(ReadTimeout, match="no response within 0.3s") as caught:
        exchange(pool, GET)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 0.3 + 0.5
    assert caught.value.status == 504
    assert (caught.value.sent, caught.value.received) == (True, False)
    assert len(server.requests) == 1


def test_read_timeout_mid_head(serve):
    _, pool = serve([b"HTTP/1.1 200 OK\r\n", HANG], read_timeout=0.2)
    with pytest.raises(ReadTimeout) as caught:
        exchange(pool, GET)
    assert caught.value.received


def test_read_timeout_mid_body(serve):
    _, pool = serve(
        [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", HANG], read_timeout=0.2
    )
    response = exchange(pool, GET)
    try:
        assert response.take_buffered() == b"half"
        started = time.monotonic()
        with pytest.raises(ReadTimeout, match="stopped sending") as caught:
            list(response.stream())
        assert time.monotonic() - started < 0.2 + 0.5
    finally:
        response.release()
    assert caught.value.received
    assert caught.value.status == 504


# -- headers ------------------------------------------------------------------


def test_response_headers(serve):
    _, pool = serve(
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: keep-alive, X-Private\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Content-Type: text/plain\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"Upgrade: h2c\r\n"
        b"Set-Cookie: a=1\r\n"
        b"Trailer: X-Sum\r\n"
        b"TE: trailers\r\n"
        b"Proxy-Authenticate: Basic\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Proxy-Authentication-Info: nextnonce=x\r\n"
        b"Server: waitress\r\n"
        b"X-Private: secret\r\n"
        b"connection: x-other\r\n"
        b"X-Other: also hop-by-hop\r\n"
        b"x-request-id: abc-123\r\n"
        b"Set-Cookie: b=2\r\n"
        b"Vary: Accept\r\n"
        b"vary: Cookie\r\n"
        b"\r\n"
        b"2\r\nok\r\n0\r\nX-Sum: 2\r\n\r\n"
    )
    response, received = fetch(pool)
    assert received == b"ok"
    assert response.headers == [
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "a=1"),
        ("x-request-id", "abc-123"),
        ("Set-Cookie", "b=2"),
        ("Vary", "Accept"),
        ("vary", "Cookie"),
    ]
    assert response.request_id == b"abc-123"
    assert response.length is None
    assert response.keep_alive


def test_no_request_id(serve):
    _, pool = serve(OK)
    response, _ = fetch(pool)
    assert response.request_id is None
    assert response.length == 2


def test_header_values_are_latin_1(serve):
    _, pool = serve(b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9\r\nContent-Length: 0\r\n\r\n")
    response, _ = fetch(pool)
    assert response.headers[0] == ("X-Name", "caf\xe9")


def test_invented_header_names_do_not_grow_the_cache(serve, monkeypatch):
    monkeypatch.setattr(upstream, "_names", {})  # not to fill the real one
    names = b"".join(b"X-Invented-%d: 1\r\n" % n for n in range(2100))
    _, pool = serve(b"HTTP/1.1 200 OK\r\n" + names + b"Content-Length: 0\r\n\r\n")
    response, _ = fetch(pool)
    assert len(response.headers) == 2101
    assert response.headers[-2] == ("X-Invented-2099", "1")
    assert len(upstream._names) == 2048


# -- request bodies -----------------------------------------------------------


@pytest.mark.parametrize(
    "length",
    [
        pytest.param(1, id="one byte"),
        pytest.param(1000, id="small"),
        pytest.param(SMALL_BODY, id="largest sent with the head"),
        pytest.param(SMALL_BODY + 1, id="smallest from the file"),
        pytest.param(3 << 20, id="3 MiB"),
    ],
)
def test_request_body_sent_intact(serve, tmp_path, length):
    data = os.urandom(length)
    path = tmp_path / "body"
    path.write_bytes(b"prefix" + data + b"suffix")
    server, pool = serve(OK)
    with path.open("rb") as source:
        source.seek(6)
        body = Body(source, length)
        assert (body.file is None) is (length <= SMALL_BODY)
        assert fetch(pool, post(length), body)[1] == b"ok"
        assert body.rewind()
        assert fetch(pool, post(length), body)[1] == b"ok"
    digest = hashlib.sha256(data).hexdigest()
    assert [(r.length, r.digest) for r in server.requests] == [(length, digest)] * 2
    assert server.requests[0].request_line == b"POST /p HTTP/1.1"


def test_rewind_goes_back_to_where_the_body_started():
    source = io.BytesIO(b"head" + bytes(SMALL_BODY + 10))
    source.seek(4)
    body = Body(source, SMALL_BODY + 10)
    source.read(100)
    assert body.rewind()
    assert source.tell() == 4


def test_small_body_always_rewinds():
    body = Body(io.BytesIO(b"data"), 4)
    assert body.data == b"data"
    assert body.rewind()
    assert NO_BODY.rewind()


class Unseekable:
    """A stream without seekable(), tell() nor seek()."""

    def __init__(self, length):
        self.left = length

    def read(self, size):
        size = min(size, self.left)
        self.left -= size
        return bytes(size)


class TellFails(Zeros):
    def tell(self):
        raise OSError("cannot tell")


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(lambda n: Zeros(n, seekable=False), id="not seekable"),
        pytest.param(Unseekable, id="no seekable method"),
        pytest.param(TellFails, id="tell fails"),
    ],
)
def test_body_that_cannot_be_replayed(serve, source):
    length = SMALL_BODY + 1
    body = Body(source(length), length)
    assert not body.rewind()
    server, pool = serve(OK)
    assert fetch(pool, post(length), body)[1] == b"ok"
    assert server.requests[0].digest == hashlib.sha256(bytes(length)).hexdigest()


@pytest.mark.parametrize("length", [10, SMALL_BODY])
def test_short_small_body(length):
    with pytest.raises(ShortBody, match="shorter than its Content-Length"):
        Body(io.BytesIO(b"short"), length)


def test_short_large_body(serve):
    server, pool = serve(OK)
    length = 2 * SMALL_BODY
    with pytest.raises(ShortBody, match="shorter than its Content-Length"):
        exchange(pool, post(length), Body(io.BytesIO(bytes(SMALL_BODY + 1)), length))
    assert pool._idle == []


# -- details ------------------------------------------------------------------


@pytest.mark.parametrize(
    "seconds, timeval",
    [
        pytest.param(2.5, (2, 500_000), id="seconds and microseconds"),
        pytest.param(0.3, (0, 300_000), id="rounded"),
        pytest.param(1e-9, (0, 1), id="never zero, which means no timeout"),
    ],
)
def test_timeval(seconds, timeval):
    assert struct.unpack("ll", upstream._timeval(seconds)) == timeval


def test_sockets_get_kernel_timeouts(serve):
    _, pool = serve(OK, read_timeout=1.5)
    sock = pool.connect()
    with sock:
        assert sock.gettimeout() is None
        size = struct.calcsize("ll")
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            raw = sock.getsockopt(socket.SOL_SOCKET, option, size)
            assert struct.unpack("ll", raw) == (1, 500_000)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


# -- the resend rule ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "idempotent", "again"),
    [
        pytest.param(ConnectFailed("refused"), False, True, id="never sent"),
        pytest.param(StaleConnection(), False, True, id="stale pooled connection"),
        pytest.param(
            UpstreamError("reset", upstream.SEND), False, False, id="maybe sent: POST"
        ),
        pytest.param(
            UpstreamError("reset", upstream.SEND), True, True, id="maybe sent: GET"
        ),
        pytest.param(
            UpstreamError("closed", upstream.HEAD), True, True, id="no answer: GET"
        ),
        pytest.param(
            UpstreamError("closed", upstream.HEAD, received=True),
            True,
            False,
            id="part of a head",
        ),
        pytest.param(
            UpstreamError("cut", upstream.BODY), True, False, id="part of a body"
        ),
        pytest.param(ReadTimeout("slow", upstream.HEAD), True, True, id="timeout: GET"),
        pytest.param(
            ReadTimeout("slow", upstream.HEAD), False, False, id="timeout: POST"
        ),
        pytest.param(BadResponse("garbage"), True, False, id="garbage came back"),
    ],
)
def test_may_resend(error, idempotent, again):
    assert upstream.may_resend(error, idempotent) is again


def test_the_phase_says_what_may_have_happened():
    assert not ConnectFailed("x").sent and not ConnectFailed("x").received
    assert UpstreamError("x", upstream.SEND).sent
    assert UpstreamError("x", upstream.BODY).received
    assert ReadTimeout("x", upstream.HEAD).status == 504
