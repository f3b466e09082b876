"""The reverse proxy: a WSGI app that forwards each request to an instance.

It strips hop-by-hop headers both ways, writes the forwarded headers, Via
and X-Request-ID, streams response bodies, and retries on another instance
only when that cannot run a request twice. Imports neither Pyramid nor
waitress.

What the instance is told about the client is the dispatcher's own view:
every forwarded header a client sent is dropped, and only what came from a
peer in ``trusted_proxies`` (applied with the add-on's rules, see
:mod:`pyramid_lb.forwarded`) goes into that view. The port it forwards is
the one in the client's Host (else the scheme's default), not the port the
dispatcher listens on, so that an app behind a port mapping builds the
URLs its clients used.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from random import getrandbits
from time import perf_counter
from urllib.parse import quote

from pyramid_lb.addresses import parse_host
from pyramid_lb.dispatcher.cluster import Attempt, Backend, Cluster
from pyramid_lb.dispatcher.queueing import CLOSED, FULL, GONE
from pyramid_lb.dispatcher.stats import Tally
from pyramid_lb.dispatcher.upstream import (
    NO_BODY,
    Body,
    Response,
    ShortBody,
    UpstreamError,
    exchange,
    may_resend,
)
from pyramid_lb.server import PARKED, end_here

log = logging.getLogger("pyramid_lb.dispatcher")

#: RFC 9110 section 9.2.2.
IDEMPOTENT_METHODS = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))

#: Request headers, besides every X-Forwarded-*, that state where a request
#: came from. An instance trusts the dispatcher, so a client's own would pass
#: for facts: they are dropped, and the dispatcher writes its own view.
FORWARDING_HEADERS = (
    "Forwarded",
    "X-Real-IP",
    "CF-Connecting-IP",
    "True-Client-IP",
    "X-Client-IP",
    "Client-IP",
    "X-Cluster-Client-IP",
    "Front-End-Https",
    "X-Url-Scheme",
)
# Request headers never forwarded as they came: hop-by-hop ones (RFC 9110
# section 7.6.1), Expect (waitress already answered 100-continue), Proxy
# (httpoxy), those the proxy writes itself, and the forwarding ones.
_DROPPED = frozenset(
    (
        "HTTP_CONNECTION",
        "HTTP_KEEP_ALIVE",
        "HTTP_TE",
        "HTTP_TRAILER",
        "HTTP_TRANSFER_ENCODING",
        "HTTP_UPGRADE",
        "HTTP_EXPECT",
        "HTTP_PROXY",
        "HTTP_HOST",
        "HTTP_VIA",
        "HTTP_X_REQUEST_ID",
        *("HTTP_" + name.upper().replace("-", "_") for name in FORWARDING_HEADERS),
    )
)
_DROPPED_PREFIXES = ("HTTP_PROXY_", "HTTP_X_FORWARDED_")
_DEFAULT_PORTS = {"http": "80", "https": "443"}
# environ key -> header name, or None when it is not forwarded; bounded
# so that a client inventing header names cannot grow it forever.
_names: dict[str, str | None] = {}


def _header_name(key: str) -> str | None:
    name = _names.get(key, False)
    if name is not False:
        return name
    if key[:5] != "HTTP_" or key in _DROPPED or key.startswith(_DROPPED_PREFIXES):
        name = None
    else:
        name = key[5:].replace("_", "-").title()
    if len(_names) < 2048:
        _names[key] = name
    return name


def _connection_tokens(value: str) -> set[str]:
    return {
        "HTTP_" + token.strip().upper().replace("-", "_")
        for token in value.split(",")
        if token.strip()
    }


# Host values seen, checked: (name, port or None), or None when invalid.
# Bounded like _names; the same few hosts come again and again.
_hosts: dict[str, tuple[str, str | None] | None] = {}


def _checked_host(value: str) -> tuple[str, str | None] | None:
    known = _hosts.get(value, False)
    if known is not False:
        return known
    parsed = parse_host(value)
    if len(_hosts) < 1024:
        _hosts[value] = parsed
    return parsed


def _host_problem(environ) -> str | None:
    """Why the request's Host cannot be used (RFC 9112 section 3.2), or None.

    A request in absolute form (``GET http://host/path``) has its authority
    as its host, and goes on in origin form (section 3.2.2). Two Host
    headers reach WSGI joined by a comma, which no host holds.
    """
    uri = environ.get("REQUEST_URI") or ""
    if uri[:1] not in ("/", "*", ""):
        scheme, found, rest = uri.partition("://")
        if not found or scheme.lower() not in _DEFAULT_PORTS:
            return "the request target is neither a path nor an http(s) URL"
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=-1)
        authority, tail = (rest, "") if cut < 0 else (rest[:cut], rest[cut:])
        environ["HTTP_HOST"] = authority
        environ["REQUEST_URI"] = tail if tail[:1] == "/" else "/" + tail
    host = environ.get("HTTP_HOST")
    if host is None:
        if environ.get("SERVER_PROTOCOL") == "HTTP/1.0":
            return None
        return "an HTTP/1.1 request needs a Host header"
    if _checked_host(host) is None:
        return "the Host header is not one host[:port]"
    return None


def via_names(value: str) -> list[str]:
    """The received-by names of a Via header, lower-cased, comments dropped."""
    while True:  # innermost comments first: they can nest
        shorter = _COMMENT.sub("", value)
        if shorter == value:
            break
        value = shorter
    names = []
    for element in value.split(","):
        words = element.split()
        if len(words) >= 2:
            names.append(words[1].lower())
    return names


_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")


def _forwarded_node(addr: str) -> str:
    if ":" in addr:  # IPv6 must be bracketed and quoted (RFC 7239 section 6)
        return f'"[{addr}]"'
    return addr or "unknown"


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _quote_value(value: str) -> str:
    """A Forwarded parameter value: a token, or else a quoted string."""
    if _TOKEN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


#: Retries a cluster always has, and the seconds the budget counts over.
RETRY_FLOOR = 10
RETRY_WINDOW = 10


class RetryBudget:
    """Retries allowed as a share of recent requests, plus a small floor.

    Counts requests and retries per second over the last ``window`` seconds.
    Counting is not locked: a lost increment under contention only nudges
    numbers that are a guide.
    """

    def __init__(
        self,
        ratio: float = 0.2,
        floor: int = RETRY_FLOOR,
        window: int = RETRY_WINDOW,
        clock=time.monotonic,
    ):
        self.ratio = ratio
        self.floor = floor
        self.window = window
        self._clock = clock
        slots = self._slots = window + 1
        self._second = [0] * slots
        self._requests = [0] * slots
        self._retries = [0] * slots

    def _slot(self) -> int:
        now = int(self._clock())
        slot = now % self._slots
        if self._second[slot] != now:
            self._second[slot] = now
            self._requests[slot] = self._retries[slot] = 0
        return slot

    def request(self) -> None:
        self._requests[self._slot()] += 1

    def try_spend(self) -> bool:
        """Whether one more retry is allowed now; counts it if so."""
        slot = self._slot()
        now = self._second[slot]
        live = [i for i in range(self._slots) if now - self._second[i] < self.window]
        requests = sum(self._requests[i] for i in live)
        retries = sum(self._retries[i] for i in live)
        if retries >= max(self.floor, self.ratio * requests):
            return False
        self._retries[slot] += 1
        return True


def error_response(
    start_response, status: int, message: str, headers=(), exc_info=None
):
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}: {message}\n".encode()
    start_response(
        f"{status} {phrase}",
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            *headers,
        ],
        *((exc_info,) if exc_info else ()),
    )
    return [body]


class Proxy:
    """A WSGI app forwarding every request to an instance of ``cluster``."""

    def __init__(
        self,
        cluster: Cluster,
        strategy,
        retries: int = 2,
        budget: RetryBudget | None = None,
        max_body_size: int = 1 << 30,
        via_name: str | None = None,
        retry_after: int = 1,
        sticky=None,
        trusted=None,
        cache=None,
    ):
        self.cluster = cluster
        #: A :class:`~pyramid_lb.dispatcher.cache.Cache` (``cache = memory``),
        #: or None.
        self.cache = cache
        #: A :class:`~pyramid_lb.forwarded.ProxyHeaders` for the peers whose
        #: forwarded headers are believed; None: nobody's.
        self.trusted = trusted
        self.strategy = strategy
        self.retries = retries
        self.budget = budget or RetryBudget()
        self.max_body_size = max_body_size
        self.retry_after = str(retry_after)
        #: A :class:`~pyramid_lb.dispatcher.sticky.Sticky`, for session affinity.
        self.sticky = sticky
        #: Requests answered without an instance (503, 508, 413...).
        self.unrouted = Tally()
        self.lock = threading.Lock()
        #: One line per request, at INFO; turned off by giving it a higher level.
        self.access_log = logging.getLogger("pyramid_lb.access")
        # The Via pseudonym: a request arriving with it already passed here.
        name = via_name or f"{socket.gethostname()}-{os.getpid()}"
        self.via = f"1.1 {name} (pyramid_lb)"
        #: Compared with the names in a request's Via, to find loops.
        self.via_name = name.lower()

    def __call__(self, environ, start_response):
        return Task(self, environ, start_response).run()

    # -- the request as the instance sees it ------------------------------------

    def request_head(self, environ, request_id: str) -> bytes:
        """The request line and headers as the instance should see them.

        ``environ`` has a checked Host (see ``_host_problem``) and, from a
        trusted peer, the forwarded headers applied: REMOTE_ADDR, the scheme
        and HTTP_HOST are then the client's, and X-Forwarded-For, Forwarded
        and X-Forwarded-Prefix hold only their trusted part.
        """
        get = environ.get
        uri = get("REQUEST_URI")
        if not uri:
            uri = quote(get("SCRIPT_NAME", "") + get("PATH_INFO", ""))
            if get("QUERY_STRING"):
                uri += "?" + environ["QUERY_STRING"]
        scheme = environ["wsgi.url_scheme"]
        host = get("HTTP_HOST")
        if host:
            port = _checked_host(host)[1] or _DEFAULT_PORTS.get(scheme, "")
        else:  # HTTP/1.0 without Host: the server's own name
            port = get("SERVER_PORT", "")
            host = get("SERVER_NAME", "")
            if port and port != _DEFAULT_PORTS.get(scheme):
                host = f"{host}:{port}"
        client = get("REMOTE_ADDR", "")
        lines = [f"{environ['REQUEST_METHOD']} {uri} HTTP/1.1\r\nHost: {host}"]
        append = lines.append
        hop_by_hop = get("HTTP_CONNECTION")
        named = _connection_tokens(hop_by_hop) if hop_by_hop else ()
        name_of = _header_name
        for key, value in environ.items():
            if key[:5] == "HTTP_":
                name = name_of(key)
                if name is not None and key not in named:
                    append(f"{name}: {value}")
        content_type = get("CONTENT_TYPE")
        if content_type:
            append(f"Content-Type: {content_type}")
        element = (
            f"for={_forwarded_node(client)};proto={scheme};host={_quote_value(host)}"
        )
        chain = client
        if self.trusted is not None:
            # What is left of these is their trusted part. The client found
            # in it goes last, where an instance trusting only the dispatcher
            # looks (as nginx's realip does with $proxy_add_x_forwarded_for).
            forwarded_for = get("HTTP_X_FORWARDED_FOR")
            if forwarded_for:
                chain = f"{forwarded_for}, {client}"
            forwarded = get("HTTP_FORWARDED")
            if forwarded:
                element = f"{forwarded}, {element}"
            prefix = get("HTTP_X_FORWARDED_PREFIX")
            if prefix:
                append(f"X-Forwarded-Prefix: {prefix}")
        via = get("HTTP_VIA")
        append(
            f"X-Forwarded-For: {chain}\r\n"
            f"X-Forwarded-Proto: {scheme}\r\n"
            f"X-Forwarded-Host: {host}\r\n"
            f"X-Forwarded-Port: {port}\r\n"
            f"Forwarded: {element}\r\n"
            f"Via: {f'{via}, {self.via}' if via else self.via}\r\n"
            f"X-Request-ID: {request_id}\r\n"
        )
        return "\r\n".join(lines).encode("latin-1")


class Task:
    """One request on its way through the proxy: what came in, where it went.

    Made for each request (waitress's ``Task`` is the model), so that its
    state travels as one object: the environ and start_response, the id,
    the body, the instances tried and when it started.
    """

    __slots__ = (
        "proxy",
        "environ",
        "start_response",
        "started",
        "request_id",
        "method",
        "idempotent",
        "length",
        "body",
        "tried",
        "why",
        "waited",
    )

    def __init__(self, proxy: Proxy, environ, start_response):
        self.proxy = proxy
        self.environ = environ
        self.start_response = start_response
        self.started = perf_counter()
        request_id = environ.get("HTTP_X_REQUEST_ID")
        if not request_id or len(request_id) > 200 or not request_id.isprintable():
            # Unique, not secret: no system call (os.urandom makes one).
            request_id = f"{getrandbits(128):032x}"
        self.request_id = request_id
        self.method = environ["REQUEST_METHOD"]
        self.idempotent = (
            self.method in IDEMPOTENT_METHODS or "HTTP_IDEMPOTENCY_KEY" in environ
        )
        self.length = 0
        self.body = NO_BODY
        self.tried: list[Backend] = []
        #: Why no (other) instance took the request, once that is so.
        self.why = "no instance is available to take the request"
        #: Its wait in the queue, if the server parked it (it may come with
        #: a slot taken).
        self.waited = environ.pop(PARKED, None)

    def run(self):
        """The WSGI answer: the instance's, or one of the proxy's own."""
        refusal = self.admit()
        if refusal is not None:
            if self.waited is not None:
                self.waited.abandon()  # the slot it came with is not needed
            return self.refuse(*refusal)
        cache = self.proxy.cache
        if cache is not None:
            return cache.serve(self)
        return self.forward()

    def admit(self) -> tuple[int, str] | None:
        """Check the request and read its body; why it cannot be forwarded
        (a status and a message), or None."""
        environ, proxy = self.environ, self.proxy
        problem = _host_problem(environ)
        if problem is not None:
            return 400, problem
        if proxy.trusted is not None:
            try:
                proxy.trusted.rewrite(environ)
            except ValueError as exc:  # a trusted header that cannot be applied
                peer = environ.get("REMOTE_ADDR")
                log.warning("request %s from %s: %s", self.request_id, peer, exc)
                return 400, str(exc)
        via = environ.get("HTTP_VIA")
        if via and proxy.via_name in via_names(via):
            log.warning(
                "request %s came back to this dispatcher: a loop", self.request_id
            )
            return 508, "this request went round in a loop"
        length = environ.get("CONTENT_LENGTH")
        if length:
            if not length.isdigit():
                return 400, "invalid Content-Length"
            self.length = int(length)
        if self.length > proxy.max_body_size:
            return 413, f"the request body is larger than {proxy.max_body_size} bytes"
        if self.length:
            try:
                self.body = Body(environ["wsgi.input"], self.length)
            except ShortBody as exc:
                return 400, str(exc)
        return None

    # -- forwarding and retries -----------------------------------------------

    def forward(self):
        """Send the request to an instance (its pinned one first), retrying
        on another while that cannot run it twice; the WSGI answer."""
        proxy, environ = self.proxy, self.environ
        # Before the head is built: in insert mode it takes its cookie out.
        pinned, pin = proxy.sticky.pinned(environ) if proxy.sticky else (None, None)
        head = proxy.request_head(environ, self.request_id)
        if self.length or self.method in ("POST", "PUT", "PATCH"):
            head += b"Content-Length: %d\r\n" % self.length
        head += b"\r\n"
        proxy.budget.request()
        head_only = self.method == "HEAD"
        error: UpstreamError | None = None
        reached = False  # whether any instance may have had the request
        while True:
            backend = self.choose(pinned)
            if backend is None:
                break
            try:
                with proxy.cluster.attempt(
                    backend, retry=len(self.tried) > 1
                ) as attempt:
                    response = exchange(
                        backend.pool, head, self.body, head_only, self.idempotent
                    )
                    return self.respond(attempt, response, pin)
            except UpstreamError as exc:
                error, reached = exc, reached or exc.sent
                refusal = self.retry_refusal(exc)
                log.warning(
                    "request %s %s %s to instance %s failed: %s%s",
                    self.request_id,
                    self.method,
                    environ.get("PATH_INFO", ""),
                    backend.name,
                    exc,
                    f"; not retried: {refusal}" if refusal else "",
                )
                if refusal:
                    self.why = refusal
                    break
            except ShortBody as exc:  # the client's body ended early
                return self.refuse(400, str(exc))
        retry_after = [("Retry-After", proxy.retry_after)]
        if error is None:
            return self.refuse(503, self.why, retry_after)
        if not reached:  # no instance had it: worth trying again shortly
            last = self.tried[-1].name
            return self.refuse(
                503, f"instance {last}: {error}; {self.why}", retry_after
            )
        return self.refuse(error.status, str(error))

    def choose(self, pinned: Backend | None) -> Backend | None:
        """The next instance to try (the pinned one first), with a slot taken
        on it; while every one it may go to is full, it waits in the queue.
        None, with ``why`` said, when there is none."""
        proxy, tried = self.proxy, self.tried
        cluster, queue = proxy.cluster, proxy.cluster.queue
        want = pinned if pinned is not None and not tried else None
        while True:
            waited, self.waited = self.waited, None
            if waited is not None:  # parked by the server, before this thread
                bound = None
                backend, ended = queue.outcome(waited)
            else:
                backend = want or proxy.strategy.choose(self.environ, tried)
                # Nobody overtakes the queue.
                if backend is not None and not queue.depth and cluster.take(backend):
                    tried.append(backend)
                    return backend
                if backend is None and not cluster.untried(tried):
                    if tried:
                        self.why = "no other instance is available to try it on"
                    return None
                # Pinned, or hashed to it: that one; else any.
                bound = None
                if backend is not None and (
                    backend is want or proxy.strategy.binds(self.environ)
                ):
                    bound = backend
                backend, ended = queue.wait(cluster, bound, tried)
            if backend is not None:
                tried.append(backend)
                return backend
            if ended == GONE and bound is not None:
                want = None  # its instance left rotation: balanced as usual
                continue
            self.why = _wait_ended(ended, bound, queue)
            return None

    def retry_refusal(self, error: UpstreamError) -> str | None:
        """Why the request is not tried on another instance after ``error``,
        or None to try. The retry budget is spent last, once nothing else
        stands in the way."""
        proxy = self.proxy
        if len(self.tried) > proxy.retries:
            return f"tried on {len(self.tried)} instances (retries = {proxy.retries})"
        if not may_resend(error, self.idempotent):
            return (
                "part of an answer came back"
                if error.received
                else f"it may have run there, and {self.method} is not idempotent"
            )
        if not self.body.rewind():
            return "its body cannot be sent again"
        if not proxy.cluster.untried(self.tried):
            return "no other instance is available to try it on"
        if not proxy.budget.try_spend():
            return (
                "the retry budget is spent (retry_budget: too many retries of "
                "late across the instances)"
            )
        return None

    # -- the answer -------------------------------------------------------------

    def respond(self, attempt: Attempt, response: Response, pin: str | None):
        """Pass the instance's answer on: whole if it came with its head,
        else streamed as it comes."""
        try:
            proxy, backend = self.proxy, attempt.backend
            status = response.status
            attempt.answered(status)
            headers = response.headers
            headers.append(("Via", proxy.via))
            if response.request_id is None:
                headers.append(("X-Request-ID", self.request_id))
            if proxy.sticky is not None:
                cookie = proxy.sticky.cookie_for(self.environ, backend, pin)
                if cookie is not None:
                    headers.append(("Set-Cookie", cookie))
                    # A shared cache must not hand this client's pin to others.
                    if not any(name.lower() == "cache-control" for name, _ in headers):
                        headers.append(("Cache-Control", "private"))
            reason = response.reason.decode("latin-1")
            if not reason:
                try:
                    reason = HTTPStatus(status).phrase
                except ValueError:
                    reason = "Unknown"
            self.start_response(f"{status} {reason}", headers)
        except BaseException:
            response.close()
            raise
        whole = response.arrived_whole()
        if whole is None:
            attempt.keep()
            return Streamed(self, attempt, response)
        response.release()
        end_here(attempt.end)  # waitress only has the body left to queue
        self.log(status, len(whole), backend)
        return [whole] if whole else []

    def refuse(self, status: int, message: str, headers=()):
        """Answer ``status`` without (a response from) an instance."""
        body = error_response(self.start_response, status, message, headers)
        proxy = self.proxy
        with proxy.lock:
            proxy.unrouted.add(status, perf_counter() - self.started)
        self.log(status, len(body[0]), self.tried[-1] if self.tried else None)
        return body

    def log(self, status: int, size: int, backend: Backend | None) -> None:
        """One line of the access log. The path goes without its query
        string, which can carry secrets (tokens, keys)."""
        access_log = self.proxy.access_log
        if access_log.isEnabledFor(logging.INFO):
            environ = self.environ
            access_log.info(
                '%s "%s %s" %d %d %.1fms %s %s',
                environ.get("REMOTE_ADDR", "-"),
                self.method,
                environ.get("PATH_INFO", ""),
                status,
                size,
                (perf_counter() - self.started) * 1000,
                backend.name if backend is not None else "-",
                self.request_id,
            )


def _wait_ended(ended: str, bound: Backend | None, queue) -> str:
    """Why a request that went to the queue got no instance."""
    busy = f"instance {bound.name}" if bound else "every instance"
    if ended == FULL:
        if not queue.size:
            return f"{busy} is busy, and there is no queue (queue_size = 0)"
        return f"{busy} is busy and {queue.size} requests wait already (queue_size)"
    if ended == CLOSED:
        return "the dispatcher is stopping"
    if ended == GONE:
        return "no instance is available to take the request"
    return f"{busy} stayed busy for {queue.timeout:g}s (queue_timeout)"


class Streamed:
    """An answer's body, as it arrives from the instance.

    Its ``close()``, which the WSGI server calls however the body ends,
    gives the connection back to the pool (or closes it, when the body did
    not end cleanly) and ends the attempt (httpcore's pooled byte stream is
    the model): no way out forgets either.
    """

    __slots__ = ("task", "attempt", "response", "size", "status")

    def __init__(self, task: Task, attempt: Attempt, response: Response):
        self.task = task
        self.attempt = attempt
        self.response = response
        self.size = 0
        self.status = response.status  # as the client got it, for the log

    def __iter__(self) -> Iterator[bytes]:
        first = self.response.take_buffered()
        if first:
            self.size += len(first)
            yield first
        try:
            for piece in self.response.stream():
                self.size += len(piece)
                yield piece
        except UpstreamError as exc:
            log.warning(
                "request %s: instance %s failed mid-response: %s",
                self.task.request_id,
                self.attempt.backend.name,
                exc,
            )
            if self.size:  # part of the body is out: only a cut tells the client
                raise
            # Nothing of the body went out, nor the head (waitress sends it
            # with the first byte): the client still gets a clean 502/504.
            self.status = exc.status
            yield from error_response(
                self.task.start_response, exc.status, str(exc), exc_info=sys.exc_info()
            )

    def close(self) -> None:
        if self.attempt.ended:
            return
        self.response.release()
        end_here(self.attempt.end)  # called once the body is out
        self.task.log(self.status, self.size, self.attempt.backend)
