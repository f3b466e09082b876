"""Waitress, hardened for the front line: strict framing, early refusals, many
connections, and a stop that finishes the answers still being sent.

``egg:pyramid_lb#waitress`` (:func:`pyramid_lb.process.serve_paste`) is
waitress with these changes, for ``[server:dispatcher]`` (and
``[server:main]`` if you like); ``pyramid-lb serve`` applies them to a
``egg:waitress#main`` section too.

- Requests are parsed by :class:`StrictRequestParser`, which refuses with a
  400, and closes the connection, bodies whose framing RFC 9112 puts in
  doubt: Content-Length with Transfer-Encoding, Transfer-Encoding in
  HTTP/1.0 or applied twice, folded header lines. Waitress accepts each of
  these: it hides Transfer-Encoding from the app and keeps the connection
  open, so what followed on it would be forwarded as a request of its own.
- A request refused before its body is read (too large) gets no ``100
  Continue`` and its body is not read: waitress sends the 100 and spools
  the whole body before answering 413.
- Most heads (no Transfer-Encoding, origin form, nothing waitress would
  refuse) are parsed by :mod:`pyramid_lb.request_head`, to waitress's
  result in under half its time; any other goes through the checks above
  and waitress's parser, given it in a form that its header regex reads in
  linear time (waitress alone takes seconds, the GIL held, on a 32 KB line
  of spaces after the colon, and minutes on 256 KB).
- An answer's head goes out with the first piece of its body, in one
  ``send()``: waitress sends them apart, and the client wakes up twice.
- epoll (:mod:`pyramid_lb.event_loop`) and a connection limit in the
  thousands, so that idle keep-alive clients and slowloris ones cannot lock
  the others out, and a keep-alive request wakes the main loop once
  (waitress's defaults are select() and 100 connections, and its loop
  wakes three times per request and asks every connection each time).
- On SIGTERM or Ctrl-C, :func:`run` stops accepting, closes idle
  connections, and lets requests in flight finish, answers being sent
  included, for ``graceful_timeout`` seconds; waitress alone stops its main
  loop at once and cuts off whatever is still in its buffers.
- An app's own endpoints (``app.admin_prefix``: the dispatcher's ``/_lb``)
  have :data:`ADMIN_THREADS` threads of their own, so they answer while
  every other thread waits on an instance (:class:`AdminRouter`).
- An app with a ``park(resume)`` method may keep a request before any
  thread has it, and give it one later (:class:`AdminRouter`): the
  dispatcher's queue, where a waiting request costs no thread.

These rely on waitress internals (``HTTPChannel.parser_class`` and
``task_class``, the server's ``channel_class``, the parser's attributes and
``parse_header``, ``Task.write``, the servers' ``task_dispatcher``, the
channel's ``requests``); ``tests/test_server.py`` and
``tests/test_request_head.py`` pin them for the waitress versions
pyproject.toml allows.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any

import waitress
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError, get_header_lines
from waitress.server import BaseWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask

from pyramid_lb.event_loop import event_loop, serving
from pyramid_lb.request_head import FIELD_LINE_RE, canonical_head, parse_plain_head
from pyramid_lb.settings import SettingsError, seconds

log = logging.getLogger(__name__)

#: Server settings for the front line, under any the ini file gives.
FRONT_DEFAULTS = {
    "asyncore_use_poll": True,
    # Each connection costs a file descriptor and a little memory, no thread.
    "connection_limit": 10000,
    # Idle keep-alive connections are closed after this (waitress: 120 s).
    "channel_timeout": 60,
    "cleanup_interval": 10,
}
#: ``graceful_timeout`` when the section does not say.
GRACEFUL_TIMEOUT = 30.0
#: Our keys in a server section (waitress rejects keys it does not know).
OWN_KEYS = ("graceful_timeout",)
#: Threads for the paths under ``app.admin_prefix``, besides ``threads``.
ADMIN_THREADS = 2
#: A first piece of body up to this size goes out in one piece with the
#: head (copying more would cost more than the ``send()`` it saves).
MERGED_BODY = 64 * 1024
#: The environ key with what ``app.park`` resumed a parked request with.
PARKED = "pyramid_lb.parked"


class StrictRequestParser(HTTPRequestParser):
    """Waitress's request parser, refusing bodies whose framing is in doubt.

    Every refusal is a 400, and waitress's error answer closes the
    connection (RFC 9112 section 6.1). The Host rules are the proxy's
    (:mod:`pyramid_lb.dispatcher.proxy`): they hold under any server.
    """

    def received(self, data: bytes) -> int:
        consumed = super().received(data)
        if self.error is not None:
            # Answered at once: no "100 Continue" for a refused request, and
            # what follows on the connection is not read as a request (the
            # error answer closes it).
            self.expect_continue = False
            return len(data)
        return consumed

    def parse_header(self, header_plus: bytes) -> None:
        if not parse_plain_head(self, header_plus):
            self.parse_any_header(header_plus)

    def parse_any_header(self, header_plus: bytes) -> None:
        """Any head: the framing checks, then waitress's ``parse_header``
        (given the head in a form it reads in linear time, to the same result).

        :func:`~pyramid_lb.request_head.parse_plain_head` has already done
        the same, faster, for the plain heads, which have nothing to refuse.
        """
        version = _version(header_plus.partition(b"\r\n")[0])
        problem = framing_problem(header_plus, _fields(header_plus), version)
        if problem:
            if version == "1.1":
                self.version = version  # for the error answer's status line
            raise ParsingError(problem)
        super().parse_header(canonical_head(header_plus))


class HeadWithBody:
    """Waitress's ``Task.write``, but the head goes with the first piece of
    the body: one ``send()`` for a small answer, where waitress makes two.

    The same bytes in the same order, and the same state after; the rarer
    cases (a body longer than its Content-Length, a status that allows
    none, a large first piece) are left to waitress's own ``write``.
    """

    def write(self, data: bytes) -> None:
        length = self.content_length
        if (
            self.wrote_header
            or not data
            or not self.complete
            or not self.has_body
            or len(data) > MERGED_BODY
            or (length is not None and len(data) > length)
        ):
            super().write(data)
            return
        head = self.build_response_header()
        self.wrote_header = True
        if self.chunked_response:
            data = (
                hex(len(data))[2:].upper().encode("latin-1") + b"\r\n" + data + b"\r\n"
            )
        elif length is not None:
            self.content_bytes_written += len(data)
        self.channel.write_soon(head + data)


class StrictTask(HeadWithBody, WSGITask):
    """Waitress's task for a request, its answer's head sent with the body."""

    def get_environment(self) -> dict:
        environ = super().get_environment()
        parked = getattr(self.request, "parked", None)
        if parked is not None:
            environ[PARKED] = parked
            self.request.parked = None  # the app has it now
        return environ


class StrictErrorTask(HeadWithBody, ErrorTask):
    """Waitress's task for a refusal, its head sent with the body."""


class StrictChannel(HTTPChannel):
    parser_class = StrictRequestParser
    task_class = StrictTask
    error_task_class = StrictErrorTask

    def service(self) -> None:
        try:
            self._service()
        finally:
            # A parked request that a slot freed here resumed (see
            # end_here): this thread runs it, rather than wake another to.
            while serving.next is not None:
                channel, serving.next = serving.next, None
                try:
                    channel._service()
                except Exception:  # as waitress's thread would, and go on
                    log.exception("Exception when servicing %r", channel)

    def _service(self) -> None:
        # Waitress runs no task for a connection already closed: a parked
        # request's token then gives back what it holds (a slot). A
        # connection cancelled by a stop has no requests left at all.
        requests = self.requests
        if not requests:
            return
        request = requests[0]
        serving.channel = self  # whom the worker's wake-ups are about
        try:
            super().service()
        finally:
            serving.channel = None
            # Still here when waitress ran no task (its client left, even
            # while this began): what the token holds goes back.
            _abandon(getattr(request, "parked", None))

    def add_channel(self, map=None) -> None:
        super().add_channel(map)
        loop = getattr(self.server, "event_loop", None)
        if loop is not None:
            loop.added(self)

    def del_channel(self, map=None) -> None:
        fd = self._fileno  # gone after the next line
        super().del_channel(map)
        loop = getattr(self.server, "event_loop", None)
        if loop is not None:
            loop.removed(fd, self)


def end_here(end) -> None:
    """Call ``end()``, which ends an answer's exchange and may free a slot:
    a parked request it resumes runs next on this thread, once the answer
    is out, instead of waking another thread (each wake-up is a handoff of
    the GIL). Only for an end that leaves the thread little more to do,
    and only on a thread serving a connection of this server."""
    if serving.channel is None:
        end()
        return
    serving.ending = True
    try:
        end()
    finally:
        serving.ending = False


def _abandon(token) -> None:
    abandon = getattr(token, "abandon", None)
    if abandon is not None:
        abandon()


def _fields(header_plus: bytes) -> list[tuple[bytes, bytes]]:
    """``(lowered name, value)`` of each header line, as waitress reads them."""
    fields = []
    for line in get_header_lines(header_plus.partition(b"\r\n")[2]):
        match = FIELD_LINE_RE.fullmatch(line)
        if match:  # waitress itself refuses the others
            fields.append((match["name"].lower(), match["value"].strip(b" \t")))
    return fields


def _version(request_line: bytes) -> str:
    _, found, version = request_line.rpartition(b" HTTP/")
    return version.decode("latin-1") if found else "0.9"


def framing_problem(
    header_plus: bytes, fields: list[tuple[bytes, bytes]], version: str
) -> str | None:
    """Why the body's framing cannot be trusted, or None (RFC 9112 section 6)."""
    if b"\r\n " in header_plus or b"\r\n\t" in header_plus:
        return "obsolete line folding in a header (RFC 9112 section 5.2)"
    codings = [
        coding.strip(b" \t").lower()
        for name, value in fields
        if name == b"transfer-encoding"
        for coding in value.split(b",")
        if coding.strip(b" \t")
    ]
    if not codings and not any(name == b"transfer-encoding" for name, _ in fields):
        return None
    if version != "1.1":
        return f"Transfer-Encoding in an HTTP/{version} request"
    if any(name == b"content-length" for name, _ in fields):
        return "both Content-Length and Transfer-Encoding (RFC 9112 section 6.1)"
    if codings.count(b"chunked") != 1 or codings[-1] != b"chunked":
        return "Transfer-Encoding must end with chunked, applied once"
    return None


class AdminRouter:
    """The servers' task dispatcher: a connection whose next request is for
    the app's own endpoints (``prefix`` and under it) goes to threads of its
    own, any other to waitress's, unless the app parks it.

    Waitress hands over a connection whenever its next request is ready,
    so each request of a keep-alive connection is routed by its own path.
    ``park(resume)``, the app's, returns whether it keeps the request for
    now; it then calls ``resume(token)`` once, and the request goes to
    waitress's threads with ``token`` in its environ (:data:`PARKED`).
    """

    def __init__(
        self, main, admin, prefix: str | tuple[str, ...], url_prefix="", park=None
    ):
        self.main = main
        self.admin = admin
        self.prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
        self.url_prefix = url_prefix
        self.park = park

    def add_task(self, channel) -> None:
        # Waitress calls this with the channel's requests_lock held.
        requests = getattr(channel, "requests", None)
        request = requests[0] if requests else None
        path = getattr(request, "path", None)
        if isinstance(path, str):
            path_info = _path_info(path, self.url_prefix)
            if any(is_under(path_info, prefix) for prefix in self.prefixes):
                self.admin.add_task(channel)
                return
        park = self.park
        if park is not None and request is not None and not request.error:

            def resume(token, main=self.main):
                request.parked = token
                if not (channel.connected and channel.requests):
                    _abandon(token)  # closed while it waited: it will not run
                elif serving.ending and serving.next is None:
                    serving.next = channel  # its thread is about to be free
                else:
                    main.add_task(channel)

            if park(resume):
                return
        self.main.add_task(channel)

    def set_thread_count(self, count: int) -> None:
        """The server's ``threads``; the admin threads stay as they are."""
        self.main.set_thread_count(count)

    def shutdown(self, cancel_pending: bool = True, timeout: float = 5) -> bool:
        """Stop both sets of threads, waiting at most ``timeout`` for them."""
        deadline = time.monotonic() + timeout
        self.admin.set_thread_count(0)  # both stop meanwhile: one wait for both
        main = self.main.shutdown(cancel_pending, timeout)
        remaining = max(0.5, deadline - time.monotonic())
        return self.admin.shutdown(cancel_pending, remaining) and main


def is_under(path_info: str, prefix: str) -> bool:
    """Whether ``path_info`` is ``prefix`` or a path under it."""
    return path_info == prefix or path_info.startswith(prefix + "/")


def _path_info(path: str, url_prefix: str) -> str:
    """PATH_INFO as waitress gives it to the app (WSGITask.get_environment)."""
    if path.startswith("/"):
        path = "/" + path.lstrip("/")
    if url_prefix:
        if path == url_prefix:
            return ""
        if path.startswith(url_prefix + "/"):
            return path[len(url_prefix) :]
    return path


def _admin_prefix(app) -> str | None:
    prefix = getattr(app, "admin_prefix", None)
    if prefix is None:
        return None
    if not isinstance(prefix, str) or not prefix.rstrip("/").startswith("/"):
        raise ValueError(
            f"admin_prefix = {prefix!r}: must be a path such as '/_lb', not '/'"
        )
    return prefix.rstrip("/")


def _listeners(server) -> list[BaseWSGIServer]:
    return [obj for obj in _map(server).values() if isinstance(obj, BaseWSGIServer)]


def _map(server) -> dict:
    # one listening socket: the server itself; several: a MultiSocketServer
    return server.map if hasattr(server, "effective_listen") else server._map


def create_server(app, options: dict[str, Any], own_paths: tuple[str, ...] = ()):
    """A waitress server for ``app`` with the strict parser.

    ``options`` are a server section's keys (strings or values), minus
    :data:`OWN_KEYS`; :data:`FRONT_DEFAULTS` fill in what they leave unset,
    and so does ``app.server_defaults`` when the app has one (the
    dispatcher's body limit, forwarded headers and threads). Paths under
    ``app.admin_prefix``, when the app has one, are served by threads of
    their own (:class:`AdminRouter`). Raises what ``waitress.create_server``
    raises (OSError, ValueError), and ValueError for a bad ``admin_prefix``.
    ``own_paths`` get those threads too (an instance's health checks, so
    that slow views filling its threads cannot make it look dead).
    """
    prefix = _admin_prefix(app)
    prefixes = ((prefix,) if prefix is not None else ()) + tuple(own_paths)
    park = getattr(app, "park", None)
    defaults = getattr(app, "server_defaults", None)
    if defaults is not None and options.get("trusted_proxy"):
        raise ValueError(
            f"trusted_proxy = {options['trusted_proxy']!r}: the dispatcher checks "
            "forwarded headers itself; set trusted_proxies in [app:dispatcher]"
        )
    merged = {**FRONT_DEFAULTS, **(defaults or {}), **options}
    _allow_descriptors(int(merged["connection_limit"]))
    server = waitress.create_server(app, **merged)
    for listener in _listeners(server):
        listener.channel_class = StrictChannel
    if prefixes or park is not None:
        admin = ThreadedTaskDispatcher()
        admin.set_thread_count(ADMIN_THREADS if prefixes else 0)
        router = AdminRouter(
            server.task_dispatcher, admin, prefixes, server.adj.url_prefix, park
        )
        server.task_dispatcher = router
        for listener in _listeners(server):
            listener.task_dispatcher = router
    needed = int((defaults or {}).get("threads", 0))
    if "threads" in options and server.adj.threads < needed:
        log.warning(
            "threads = %d in the server section, fewer than the %d the "
            "dispatcher needs (its instances' caps plus its queue): requests "
            "beyond %d wait inside waitress, unseen, without the queue's "
            "timeout, and a retry waiting for a slot can hold up the requests "
            "that have theirs until queue_timeout",
            server.adj.threads,
            needed,
            server.adj.threads,
        )
    return server


def _allow_descriptors(connections: int) -> None:
    """Raise the soft limit on open files so ``connections`` can be held."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256  # the instances, the pool, logs...
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if limit > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        if limit < wanted:
            log.warning(
                "open files are limited to %d (ulimit -n): fewer than the %d "
                "connections the server may accept",
                limit,
                connections,
            )


def run(server, graceful_timeout: float = GRACEFUL_TIMEOUT) -> None:
    """Serve until SystemExit or KeyboardInterrupt (SIGTERM, Ctrl-C), then stop
    gracefully: see :func:`finish`. A second signal stops at once."""
    loop, socket_map = loop_of(server), _map(server)
    timeout = server.adj.asyncore_loop_timeout
    try:
        while socket_map:
            loop.step(timeout)
    except (SystemExit, KeyboardInterrupt):
        finish(server, graceful_timeout)


def loop_of(server):
    """The server's main loop (:mod:`pyramid_lb.event_loop`): epoll on Linux."""
    return event_loop(_map(server), _listeners(server), server.adj)


def finish(server, timeout: float) -> bool:
    """Stop accepting, close idle connections, and go on serving the others
    until their requests are answered and sent, for at most ``timeout``
    seconds; then stop the worker threads. Returns whether nothing was cut.

    An app with a ``stopping()`` method is told first (the dispatcher then
    answers the requests waiting in its queue at once rather than let them
    be cut off at the deadline)."""
    socket_map, loop = _map(server), loop_of(server)
    loop.reset()
    listeners = _listeners(server)
    for listener in listeners:
        # The listening socket only: its trigger wakes the loop for workers.
        wasyncore.dispatcher.close(listener)
    stopping = getattr(
        listeners[0].application if listeners else None, "stopping", None
    )
    if stopping is not None:
        stopping()
    deadline = time.monotonic() + timeout
    busy = _close_idle(socket_map)
    if busy:
        log.info(
            "stopping: finishing %d connections with requests in flight (at most %gs)",
            len(busy),
            timeout,
        )
    while busy and time.monotonic() < deadline:
        loop.step(0.05)
        busy = _close_idle(socket_map)
    if busy:
        log.warning(
            "stopping: %d connections still busy after %gs; cut off",
            len(busy),
            timeout,
        )
    server.task_dispatcher.shutdown(timeout=max(0.5, deadline - time.monotonic()))
    wasyncore.close_all(socket_map)
    loop.close()
    return not busy


def _close_idle(socket_map: dict) -> list[HTTPChannel]:
    """Close channels with nothing to do; the busy ones."""
    busy = []
    for channel in list(socket_map.values()):
        if not isinstance(channel, HTTPChannel) or not channel.connected:
            continue
        request = channel.request
        if (
            channel.requests
            or channel.total_outbufs_len
            or (request is not None and request.headers_finished)
        ):
            busy.append(channel)
        else:
            channel.handle_close()
    return busy


def graceful_timeout(options: dict[str, Any]) -> float:
    """``graceful_timeout`` of a server section (seconds), checked."""
    value = options.get("graceful_timeout", GRACEFUL_TIMEOUT)
    try:
        return seconds()(value)
    except ValueError as exc:
        raise SettingsError(
            f"graceful_timeout = {value!r} is not valid: {exc}"
        ) from None
