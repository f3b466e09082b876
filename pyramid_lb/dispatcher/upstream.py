"""HTTP/1.1 to the instances: pooled keep-alive connections and strict response parsing.

Responses are parsed by httptools (llhttp, the parser of Node.js): it is
strict where smuggling hides (Content-Length with Transfer-Encoding,
duplicate lengths, bad chunk sizes, bare LF) and measured 2.3 µs for a small
response against 3.9 µs for our best regex-based parser and 29 µs for
http.client.
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


class UpstreamError(Exception):
    """An exchange with an instance failed.

    ``sent`` says whether the request may have reached the instance (so a
    non-idempotent request must not be sent again); ``received`` whether
    any byte of the response arrived.
    """

    sent = True
    received = False
    status = 502

    def __init__(self, message: str, *, sent: bool | None = None):
        super().__init__(message)
        if sent is not None:
            self.sent = sent


class ConnectFailed(UpstreamError):
    """No connection could be made: the request was never sent."""

    sent = False


class StaleConnection(UpstreamError):
    """A pooled connection turned out closed before the request went out."""

    sent = False


class ReadTimeout(UpstreamError):
    status = 504


class BadResponse(UpstreamError):
    """The instance answered something that is not valid HTTP/1.1."""

    received = True


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
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


def _midway(error: UpstreamError) -> UpstreamError:
    error.received = True
    return error


class Pool:
    """Idle keep-alive connections to one instance, at most ``max_idle``.

    Connections are taken and given back from any thread; ``list.pop`` and
    ``list.append`` are atomic, so no lock is needed. The most recently used
    connection is taken first: it is the least likely to have timed out.
    """

    def __init__(
        self,
        host: str,
        port: int,
        max_idle: int = 32,
        connect_timeout: float = 2.0,
        read_timeout: float = 60.0,
    ):
        self.address = (host, port)
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._timeval = _timeval(read_timeout)
        self._idle: list[socket.socket] = []

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
        while idle:
            try:
                sock = idle.pop()
            except IndexError:
                break
            if check and _is_closed(sock):
                sock.close()
                continue
            return sock, True
        return self.connect(), False

    def give_back(self, sock: socket.socket) -> None:
        if len(self._idle) < self.max_idle:
            self._idle.append(sock)
        else:
            sock.close()

    def clear(self) -> None:
        """Close every idle connection (the instance went away)."""
        while self._idle:
            try:
                self._idle.pop().close()
            except IndexError:
                break


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

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # later ones are chunked trailers: dropped
            self.headers.append((name, value))

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
# "Via: waitress" next to an app's Server header).
DROPPED_RESPONSE_HEADERS = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"server",
    )
)


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
        dropped = DROPPED_RESPONSE_HEADERS
        for name, value in parsed.headers:
            lowered = name.lower()
            if lowered in dropped:
                if lowered == b"connection":
                    tokens = value.lower()
                    if b"close" in tokens:
                        keep_alive = False
                    elif b"keep-alive" in tokens:
                        keep_alive = True
                    named = {token.strip() for token in tokens.split(b",")}
                elif lowered == b"transfer-encoding":
                    framed = True
                continue
            if lowered == b"content-length":
                framed = True
                self.length = int(value)
            elif lowered == b"x-request-id":
                self.request_id = value
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
        if named:
            headers = [h for h in headers if h[0].lower().encode() not in named]
        self.headers = headers
        self.no_body = head_only or status == 204 or status == 304
        # Without a length or chunked framing the body runs until the close.
        self.until_close = not framed and not self.no_body
        self.keep_alive = keep_alive and not self.until_close
        if self.no_body:
            parsed.complete = True
            if parsed.chunks:  # bytes after a body-less response: out of sync
                self.keep_alive = False
                parsed.chunks.clear()

    @property
    def complete(self) -> bool:
        return self.parsed.complete

    def read_small(self) -> bytes | None:
        """The whole body if it is small and of declared length, else None.

        Read before the head is passed on, so that a failure halfway can
        still become a clean 502 rather than a cut-off response.
        """
        length = self.length
        if self.no_body or length is None or length > SMALL_BODY:
            return None
        body = self.take_buffered()
        if not self.parsed.complete:
            body += b"".join(self.stream())
        return body

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
                error = ReadTimeout("the instance stopped sending its body")
                raise _midway(error) from None
            except OSError as exc:
                error = UpstreamError(f"reading the body failed: {exc}")
                raise _midway(error) from None
            if not data:
                if self.until_close:
                    parsed.complete = True
                    break
                raise _midway(
                    UpstreamError("the instance closed the connection mid-body")
                )
            try:
                feed(data)
            except httptools.HttpParserError as exc:
                raise _midway(BadResponse(f"invalid response body: {exc}")) from None
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
                raise ValueError("the request body is shorter than its Content-Length")
        else:
            self.file = source
            try:
                self.start = source.tell() if source.seekable() else None
            except (AttributeError, OSError):
                pass

    def send(self, sock: socket.socket, head: bytes) -> None:
        if self.file is None:
            sock.sendall(head + self.data if self.data else head)
            return
        sock.sendall(head)
        read, left = self.file.read, self.length
        while left > 0:
            chunk = read(min(BODY_CHUNK, left))
            if not chunk:
                raise ValueError("the request body is shorter than its Content-Length")
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
        if (
            not reused
            or exc.received
            or isinstance(exc, ReadTimeout)
            or (exc.sent and not replayable)
            or not body.rewind()
        ):
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
    try:
        body.send(sock, head)
    except BlockingIOError:  # SO_SNDTIMEO expired
        raise UpstreamError("sending the request timed out") from None
    except OSError as exc:
        if reused and exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
            raise StaleConnection("pooled connection was closed") from None
        raise UpstreamError(f"sending the request failed: {exc}") from None
    parsed = _Parsed()
    feed = parsed.parser.feed_data
    received = 0
    while not parsed.head_done:
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:  # SO_RCVTIMEO expired
            raise ReadTimeout(f"no response within {pool.read_timeout:g}s") from None
        except OSError as exc:
            error = UpstreamError(f"reading the response failed: {exc}")
            error.received = received > 0
            raise error from None
        if not data:
            error = UpstreamError(
                "the instance closed the connection without a response"
                if not received
                else "the instance closed the connection mid-response"
            )
            error.received = received > 0
            raise error
        received += len(data)
        try:
            feed(data)
        except httptools.HttpParserUpgrade:
            raise BadResponse("the instance switched protocols unasked") from None
        except httptools.HttpParserError as exc:
            raise BadResponse(f"invalid response: {exc}") from None
    return Response(pool, sock, parsed, head_only)
