"""HTTP/1.1 to the instances: pooled keep-alive connections and strict response parsing.

Responses are parsed by httptools (llhttp, the parser of Node.js): it is
strict where smuggling hides (Content-Length with Transfer-Encoding,
duplicate lengths, bad chunk sizes, bare LF) and measured 2.3 µs for a small
response against 3.9 µs for our best regex-based parser and 29 µs for
http.client. Bytes that follow a response on the connection are never taken
for part of it: the connection is closed instead of reused.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator

import httptools

RECV_SIZE = 65536
#: Request bodies up to this size are sent with the head in one write.
SMALL_BODY = 65536
BODY_CHUNK = 262144
#: A response head (with any interim responses) larger than this is refused,
#: as nginx does past its 4-8 KiB buffer ("upstream sent too big header").
MAX_HEAD = 65536
# Errors of a write on a pooled connection the instance has closed.
_GONE = frozenset((errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN))


#: Where an exchange was when it failed.
CONNECT = "connect"  # no byte of the request went out
SEND = "send"  # the request was going out: the instance may have it
HEAD = "head"  # the request is out; the answer's head did not come whole
BODY = "body"  # the answer was coming: its head, maybe some of its body


class UpstreamError(Exception):
    """An exchange with an instance failed, in ``phase`` (one of the above).

    ``sent`` says whether the request may have reached the instance (so a
    non-idempotent one must not go out again), ``received`` whether any
    byte of an answer came back; both follow from where it failed.
    """

    status = 502

    def __init__(self, message: str, phase: str, received: bool = False):
        super().__init__(message)
        self.phase = phase
        self.received = received or phase == BODY

    @property
    def sent(self) -> bool:
        return self.phase != CONNECT


class ConnectFailed(UpstreamError):
    """No connection could be made: the request was never sent."""

    def __init__(self, message: str):
        super().__init__(message, CONNECT)


class StaleConnection(UpstreamError):
    """A pooled connection turned out closed before the request went out."""

    def __init__(self, message: str = "pooled connection was closed"):
        super().__init__(message, CONNECT)


class ReadTimeout(UpstreamError):
    status = 504


class BadResponse(UpstreamError):
    """The instance answered something that is not valid HTTP/1.1."""

    def __init__(self, message: str, phase: str = HEAD):
        super().__init__(message, phase, received=True)


class ShortBody(Exception):
    """The client's body ended before its Content-Length: the client's fault."""

    def __init__(self):
        super().__init__("the request body is shorter than its Content-Length")


def may_resend(error: UpstreamError, idempotent: bool) -> bool:
    """Whether a request whose exchange failed with ``error`` may go out again.

    Never once some of an answer came; otherwise when it never went out, or
    when running it twice does no harm (``idempotent``), a request that
    timed out on a stuck instance included (the retry budget keeps a slow
    cluster from being stormed).
    """
    if error.received:
        return False
    return idempotent or not error.sent


def _is_closed(sock: socket.socket) -> bool:
    """Whether an idle pooled connection was closed (or spoke out of turn).

    An idle connection has nothing to read: anything readable, even the
    end of the stream, means the instance closed it or is out of sync.
    """
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


def _timeval(seconds: float) -> bytes:
    # At least 1 µs: a zero timeval means no timeout at all.
    micro = max(1, round(seconds * 1_000_000))
    return struct.pack("ll", micro // 1_000_000, micro % 1_000_000)


class Pool:
    """Idle keep-alive connections to one instance, at most ``pool_size``.

    Connections are taken and given back from any thread; ``list.pop`` and
    ``list.append`` are atomic, so no lock is needed. The most recently used
    connection is taken first: it is the least likely to have timed out.
    """

    def __init__(
        self,
        host: str,
        port: int,
        pool_size: int = 32,
        connect_timeout: float = 2.0,
        read_timeout: float = 60.0,
    ):
        self.address = (host, port)
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._timeval = _timeval(read_timeout)
        self._idle: list[socket.socket] = []
        #: Set when the instance is gone for good: connections still out are
        #: closed when they come back instead of kept.
        self.closed = False

    def connect(self) -> socket.socket:
        try:
            sock = socket.create_connection(self.address, self.connect_timeout)
        except TimeoutError:
            raise ConnectFailed(
                f"connect to {self.address[0]}:{self.address[1]} timed out after "
                f"{self.connect_timeout:g}s"
            ) from None
        except OSError as exc:
            raise ConnectFailed(
                f"connect to {self.address[0]}:{self.address[1]} failed: "
                f"{exc.strerror or exc}"
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Blocking mode with kernel timeouts: one system call per recv or
        # send, where Python's own timeouts add a poll() before each (and
        # each call releases and retakes the GIL, costly with many threads).
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._timeval)
        return sock

    def take(self, check: bool = True) -> tuple[socket.socket, bool]:
        """A connection and whether it was reused from the pool.

        With ``check``, a pooled connection is first checked to be still
        open (one system call), for requests that must not be sent twice.
        """
        idle = self._idle
        while True:
            try:
                sock = idle.pop()
            except IndexError:  # empty, maybe emptied by another thread
                return self.connect(), False
            if check and _is_closed(sock):
                sock.close()
                continue
            return sock, True

    def give_back(self, sock: socket.socket) -> None:
        if len(self._idle) < self.pool_size and not self.closed:
            self._idle.append(sock)
        else:
            sock.close()

    def close(self) -> None:
        """Close every idle connection, and each one that comes back later."""
        self.closed = True
        self.clear()

    def clear(self) -> None:
        """Close every idle connection (the instance went away)."""
        idle = self._idle
        while True:
            try:
                sock = idle.pop()
            except IndexError:
                return
            sock.close()


class _Parsed:
    """httptools callbacks: collect the head, then body pieces."""

    __slots__ = (
        "parser",
        "reason",
        "headers",
        "head_done",
        "chunks",
        "complete",
        "status",
        "version",
        "extra",
        "head_size",
    )

    def __init__(self):
        self.parser = httptools.HttpResponseParser(self)
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.chunks: list[bytes] = []
        self.complete = False
        self.status = 0
        self.version = "1.1"
        #: Bytes came after the response: the connection is out of step.
        self.extra = False
        #: The size of the head (interim ones included), as the callbacks
        #: saw it: status line, names, values and their separators.
        self.head_size = 0

    def on_message_begin(self) -> None:
        if self.complete:
            # Stop before the bytes after the response are parsed as part of
            # it (a second response would overwrite the status, and its body
            # would be passed on as this one's).
            raise ValueError("bytes after the response")

    def on_status(self, reason: bytes) -> None:
        self.reason = reason
        self.head_size += len(reason) + 15  # "HTTP/1.1 200 " and CRLF

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # later ones are chunked trailers: dropped
            self.headers.append((name, value))
            self.head_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim response (100 Continue, 103 Early Hints): skip it.
            self.headers = []
            return
        self.status = status
        self.version = self.parser.get_http_version()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True


# Response headers not passed on: hop-by-hop ones (RFC 9110 section 7.6.1),
# and Server, which the dispatcher's own server sets (waitress would add
# "Via: waitress" next to an app's Server header). Proxy-* ones are dropped
# too, as on the way in.
DROPPED_RESPONSE_HEADERS = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"server",
    )
)
# What Response does with a header, by name: pass it on (0) or not (1), or
# read it as well.
_PASS, _DROP, _CONNECTION, _TRANSFER_ENCODING, _CONTENT_LENGTH, _REQUEST_ID = range(6)
_KINDS = {
    b"connection": _CONNECTION,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"content-length": _CONTENT_LENGTH,
    b"x-request-id": _REQUEST_ID,
}
# Header name as received -> (name for WSGI, kind); bounded so that an
# instance inventing names cannot grow it forever. One lookup per header
# instead of lowering, comparing and decoding each.
_names: dict[bytes, tuple[str, int]] = {}


def _header_kind(name: bytes) -> tuple[str, int]:
    lowered = name.lower()
    kind = _KINDS.get(lowered, _PASS)
    if kind == _PASS and (
        lowered in DROPPED_RESPONSE_HEADERS or lowered.startswith(b"proxy-")
    ):
        kind = _DROP
    known = (name.decode("latin-1"), kind)
    if len(_names) < 2048:
        _names[name] = known
    return known


class Response:
    """An instance's response: status, headers, then the body streamed.

    ``headers`` are the end-to-end ones, as (str, str) pairs for WSGI.
    """

    __slots__ = (
        "pool",
        "sock",
        "parsed",
        "status",
        "reason",
        "headers",
        "keep_alive",
        "until_close",
        "no_body",
        "length",
        "request_id",
    )

    def __init__(self, pool: Pool, sock: socket.socket, parsed: _Parsed, head_only):
        self.pool = pool
        self.sock = sock
        self.parsed = parsed
        self.status = status = parsed.status
        self.reason = parsed.reason
        keep_alive = parsed.version == "1.1"
        framed = False
        #: The body's length when the instance declared it (llhttp checked it).
        self.length = None
        self.request_id = None
        headers = []
        named = None
        get = _names.get
        for name, value in parsed.headers:
            known = get(name) or _header_kind(name)
            kind = known[1]
            if kind:
                if kind == _CONTENT_LENGTH:
                    framed = True
                    self.length = int(value)
                elif kind == _REQUEST_ID:
                    self.request_id = value
                else:
                    if kind == _CONNECTION:
                        # Tokens, from every Connection header: "x-close" is
                        # no "close", and a second one must not undo a first.
                        tokens = {t.strip() for t in value.lower().split(b",")}
                        named = tokens if named is None else named | tokens
                    elif kind == _TRANSFER_ENCODING:
                        # Chunked only when it is the last coding, as llhttp
                        # reads it; any other runs until the close.
                        last = value.rsplit(b",", 1)[-1]
                        framed = last.strip().lower() == b"chunked"
                    continue
            headers.append((known[0], value.decode("latin-1")))
        if named:
            if b"close" in named:
                keep_alive = False
            elif b"keep-alive" in named:
                keep_alive = True
            headers = [h for h in headers if h[0].lower().encode() not in named]
        self.headers = headers
        self.no_body = head_only or status == 204 or status == 304
        # Without a length or chunked framing the body runs until the close.
        self.until_close = not framed and not self.no_body
        # Not after HEAD either: plain WSGI apps under waitress send the body
        # anyway, late bytes that the next request would read as its answer.
        self.keep_alive = (
            keep_alive and not self.until_close and not parsed.extra and not head_only
        )
        if self.no_body:
            parsed.complete = True
            if parsed.chunks:  # bytes after a body-less response: out of sync
                self.keep_alive = False
                parsed.chunks.clear()

    @property
    def complete(self) -> bool:
        return self.parsed.complete

    def arrived_whole(self) -> bytes | None:
        """The whole body if it came with the head (most answers), else None.

        Nothing more is read: a body still arriving is streamed as it comes,
        so that its first bytes reach the client as soon as the instance
        sends them (long polling, progress output).
        """
        return self.take_buffered() if self.parsed.complete else None

    def take_buffered(self) -> bytes:
        """The body bytes that arrived with the head."""
        chunks = self.parsed.chunks
        if not chunks:
            return b""
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        return body

    def stream(self) -> Iterator[bytes]:
        """The rest of the body, piece by piece as it arrives."""
        parsed = self.parsed
        chunks = parsed.chunks
        feed = parsed.parser.feed_data
        recv = self.sock.recv
        while not parsed.complete:
            try:
                data = recv(RECV_SIZE)
            except BlockingIOError:  # SO_RCVTIMEO expired
                raise ReadTimeout(
                    "the instance stopped sending its body", BODY
                ) from None
            except OSError as exc:
                raise UpstreamError(f"reading the body failed: {exc}", BODY) from None
            if not data:
                if self.until_close:
                    parsed.complete = True
                    break
                raise UpstreamError("the instance closed the connection mid-body", BODY)
            try:
                feed(data)
            except Exception as exc:  # the parser's (see _exchange_on)
                if not parsed.complete:
                    error = BadResponse(f"invalid response body: {exc}", BODY)
                    raise error from None
                self.keep_alive = False  # bytes after the body
            if chunks:
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                yield body

    def release(self) -> None:
        """Give the connection back if the exchange ended cleanly, else close."""
        sock, self.sock = self.sock, None
        if sock is None:
            return
        if self.keep_alive and self.parsed.complete and not self.parsed.chunks:
            self.pool.give_back(sock)
        else:
            sock.close()

    def close(self) -> None:
        """Close the connection whatever state the exchange is in."""
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()


class Body:
    """A request body that can be sent again, for retries.

    Small bodies are read into memory; larger ones stay in the server's
    buffer (waitress spools them to a file) and are rewound to resend.
    """

    __slots__ = ("data", "file", "length", "start")

    def __init__(self, source, length: int):
        self.length = length
        self.file = self.start = None
        self.data = b""
        if length <= SMALL_BODY:
            self.data = source.read(length) if length else b""
            if len(self.data) != length:
                raise ShortBody
        else:
            self.file = source
            try:
                self.start = source.tell() if source.seekable() else None
            except (AttributeError, OSError):
                pass

    def send_file(self, sock: socket.socket) -> None:
        """Send the body from the file (the head has gone out)."""
        read, left = self.file.read, self.length
        while left > 0:
            chunk = read(min(BODY_CHUNK, left))
            if not chunk:
                raise ShortBody
            sock.sendall(chunk)
            left -= len(chunk)

    def rewind(self) -> bool:
        """Get ready to send again; False when the body cannot be replayed."""
        if self.file is None:
            return True
        if self.start is None:
            return False
        self.file.seek(self.start)
        return True


NO_BODY = Body(None, 0)


def exchange(
    pool: Pool,
    head: bytes,
    body: Body = NO_BODY,
    head_only: bool = False,
    replayable: bool = False,
) -> Response:
    """Send a request (``head`` and ``body``) and read the response's head.

    A pooled connection that fails before any byte of an answer is replaced
    by a fresh one, transparently, when that cannot run the request twice:
    it had not gone out, or the request is ``replayable`` (idempotent). A
    non-replayable request only goes out on a pooled connection checked to
    be open. Raises UpstreamError.
    """
    sock, reused = pool.take(check=not replayable)
    try:
        return _exchange_on(pool, sock, reused, head, body, head_only)
    except UpstreamError as exc:
        sock.close()
        # A timeout is the instance being slow, not a stale connection: not
        # sent to it again (the proxy may try another).
        if (
            not reused
            or isinstance(exc, ReadTimeout)
            or not may_resend(exc, replayable)
        ):
            raise
        rewound = body.rewind()
        if not rewound:
            raise
        pool.clear()  # the instance closed one: the others are likely gone too
    except BaseException:
        sock.close()
        raise
    sock = pool.connect()
    try:
        return _exchange_on(pool, sock, False, head, body, head_only)
    except BaseException:
        sock.close()
        raise


def _exchange_on(pool, sock, reused, head, body, head_only) -> Response:
    # The first write is a plain send(): when it fails, not a byte of the
    # request left, so it may go out again anywhere. Once one has, the
    # instance may have started on it (it can act before the whole body is
    # in), so a later failure counts as sent.
    data = body.data
    first = head + data if data else head
    try:
        sent = sock.send(first)
    except OSError as exc:
        if reused and exc.errno in _GONE:
            raise StaleConnection from None
        raise UpstreamError(f"sending the request failed: {exc}", CONNECT) from None
    try:
        if sent < len(first):  # SO_SNDTIMEO expired partway
            sock.sendall(first[sent:])
        if body.file is not None:
            body.send_file(sock)
    except BlockingIOError:  # SO_SNDTIMEO expired
        raise UpstreamError("sending the request timed out", SEND) from None
    except OSError as exc:
        raise UpstreamError(f"sending the request failed: {exc}", SEND) from None
    parsed = _Parsed()
    feed = parsed.parser.feed_data
    received = 0
    while not parsed.head_done:
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:  # SO_RCVTIMEO expired
            raise ReadTimeout(
                f"no response within {pool.read_timeout:g}s", HEAD, received > 0
            ) from None
        except OSError as exc:
            raise UpstreamError(
                f"reading the response failed: {exc}", HEAD, received > 0
            ) from None
        if not data:
            raise UpstreamError(
                "the instance closed the connection mid-response"
                if received
                else "the instance closed the connection without a response",
                HEAD,
                received > 0,
            )
        received += len(data)
        try:
            feed(data)
        except Exception as exc:
            # Only the parser's errors come here: HttpParserError (callbacks'
            # included) and HttpParserUpgrade. Not named: a second import of
            # httptools (coverage --source=<module> makes one) gives classes
            # that are not those the parser raises.
            if not parsed.complete:
                raise BadResponse(f"invalid response: {exc}") from None
            parsed.extra = True  # bytes after the response, or an upgrade
        # Checked after every read: while the head is not done, every byte
        # so far is head; once it is, its size is what the parser saw.
        if (received if not parsed.head_done else parsed.head_size) > MAX_HEAD:
            raise BadResponse(f"the response head is larger than {MAX_HEAD} bytes")
    status = parsed.status
    if status < 200 or status > 599:
        # Interim 1xx were skipped. Outside 100-599 is invalid (RFC 9110
        # section 15).
        raise BadResponse(
            "the instance switched protocols unasked"
            if status == 101
            else f"invalid response status {status}"
        )
    return Response(pool, sock, parsed, head_only)
