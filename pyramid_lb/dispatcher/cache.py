"""The dispatcher's shared HTTP cache (``cache = memory``), by RFC 9111's rules.

Off by default. What an instance answers to a GET is stored only when the
answer says it may be shared: an explicit freshness (``s-maxage``, then
``max-age``, then ``Expires`` minus ``Date``; none is guessed) or a
validator to revalidate it with, and none of ``no-store``, ``private``,
``Set-Cookie`` or ``Vary: *``. A request with ``Authorization`` shares
only answers marked ``public``, ``s-maxage`` or ``must-revalidate``; a
request carrying the affinity cookie in ``insert`` mode stores nothing (it
is pinned to its instance, which may answer it as no other would), nor
does a GET with a body (the cache cannot key on it). The key is the scheme,
Host, request target and a trusted X-Forwarded-Prefix as the app sees them;
``Vary`` picks among variants; the least recently used entries go first once
``cache_size`` is full. Requests for an entry being filled wait for it
(nginx's ``proxy_cache_lock``), a bounded time.

A larger answer than ``cache_max_object`` streams through, unstored and
never held whole: it is kept piece by piece only until it passes the limit.
Imports neither Pyramid nor waitress.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from email.utils import parsedate_to_datetime
from urllib.parse import quote

from pyramid_lb.affinity_cookie import cookie_value
from pyramid_lb.dispatcher.proxy import error_response
from pyramid_lb.dispatcher.upstream import UpstreamError

log = logging.getLogger("pyramid_lb.dispatcher")

#: What the ``X-Cache`` header says of an answer.
HIT, MISS, STALE, REVALIDATED = "HIT", "MISS", "STALE", "REVALIDATED"
#: Statuses stored: those cacheable by default (RFC 9110 section 15.1), but
#: 206 (ranges are not kept).
CACHEABLE_STATUSES = frozenset((200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501))
#: Answers a stale entry may stand in for (``cache_stale_if_error``), the
#: errors of RFC 5861; the dispatcher's own 502/503/504 are among them.
ERROR_STATUSES = frozenset((500, 502, 503, 504))
#: Seconds a request waits for another one filling its entry, at most
#: (nginx's proxy_cache_lock_timeout); then it asks an instance itself.
FILL_WAIT = 5.0
#: Seconds a key whose answer could not be stored is asked for without
#: waiting on fills (Varnish's hit-for-miss), so that requests for an
#: uncacheable page are not queued one behind the other.
PASS_TIME = 30.0
MAX_PASSES = 10000
#: Bytes an entry is counted for beyond its body and headers.
OVERHEAD = 256
# Request headers asking for part of an answer, or for a change only the
# app can judge: such a request goes to an instance as it is.
_THROUGH = ("HTTP_RANGE", "HTTP_IF_RANGE", "HTTP_IF_MATCH", "HTTP_IF_UNMODIFIED_SINCE")
# The client's conditions, judged by the cache when it fills an entry.
_CONDITIONS = ("HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE")
#: Why an answer is not stored, when it is for the request's sake.
UNSHARED = "the request carried Authorization and the answer is not public"
TOO_LARGE = "larger than cache_max_object"
# Response headers that belong to one answer, not to what is stored.
_PER_ANSWER = frozenset(("age", "x-cache", "x-request-id"))
# What a 304 made from a stored answer carries (RFC 9110 section 15.4.5).
_NOT_MODIFIED = frozenset(
    ("cache-control", "content-location", "date", "etag", "expires", "vary")
)
# Fields a 304 does not update in the stored answer (RFC 9111 section 3.2).
_KEPT = frozenset(("content-length", "content-encoding", "content-range"))
_DIRECTIVE = re.compile(r'([^\s,=]+)(?:[ \t]*=[ \t]*("(?:[^"\\]|\\.)*"|[^\s,]*))?')
# Request headers the dispatcher writes itself, per client: what the
# instance varied on is not the client's own value.
_PER_CLIENT = frozenset(("forwarded", "x-forwarded-for", "x-request-id"))
_DEFAULT_PORTS = {"http": "80", "https": "443"}
# Largest delta-seconds taken as written (RFC 9111 section 1.2.2).
_DELTA_MAX = 2**31


# -- the rules: small pure functions of the headers -----------------------------


def directives(value: str | None) -> dict[str, str | None]:
    """A Cache-Control value as ``{directive: argument or None}``, names
    lowered, quotes taken off; the first of a repeated directive counts."""
    found: dict[str, str | None] = {}
    if value:
        for match in _DIRECTIVE.finditer(value):
            name = match[1].lower()
            if name not in found:
                argument = match[2]
                if argument and argument[0] == '"':
                    argument = argument[1:-1]
                found[name] = argument
    return found


def delta_seconds(argument: str | None) -> int | None:
    """A directive's number of seconds, or None when it is not one."""
    if argument is None or not argument.isdigit() or not argument.isascii():
        return None
    return min(int(argument), _DELTA_MAX)


def http_date(value: str | None) -> float | None:
    """An HTTP date as a timestamp, or None when it is not one."""
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def freshness(cc: dict, expires: str | None, date: float | None) -> float | None:
    """Seconds a stored answer stays fresh (RFC 9111 section 4.2.1, shared
    cache): ``s-maxage``, else ``max-age``, else ``Expires`` minus ``Date``.
    None when the answer says nothing: no freshness is guessed. An invalid
    value is an answer already stale (0)."""
    for name in ("s-maxage", "max-age"):
        if name in cc:
            seconds = delta_seconds(cc[name])
            return 0 if seconds is None else seconds
    if expires is None:
        return None
    when = http_date(expires)
    if when is None or date is None:  # "Expires: 0", or nothing to count from
        return 0
    return max(0.0, when - date)


def unstorable(status: int, cc: dict, found: dict) -> str | None:
    """Why a shared cache may not store an answer to a GET, whoever asked
    for it, or None. ``found`` holds the answer's fields the rules read (see
    :func:`facts`) and its ``lifetime`` (see :func:`freshness`)."""
    if status not in CACHEABLE_STATUSES:
        return f"status {status} is not stored"
    if "no-store" in cc:
        return "Cache-Control: no-store"
    if "private" in cc:
        return "Cache-Control: private"
    if found["set-cookie"]:
        return "it sets a cookie"
    if "*" in found["vary"]:
        return "Vary: *"
    if _PER_CLIENT.intersection(found["vary"]):
        return "it varies on a header the dispatcher writes for each client"
    if not found["lifetime"] and not (found["etag"] or found["last-modified"]):
        return "no freshness and no validator"
    return None


def shared_with_authorization(cc: dict) -> bool:
    """Whether an answer may be shared although the request carried
    Authorization (RFC 9111 section 3.5)."""
    return "public" in cc or "s-maxage" in cc or "must-revalidate" in cc


def facts(headers, via: str) -> tuple[list, dict, dict]:
    """An answer's headers as (the ones to store, its Cache-Control, facts):
    the fields the rules read, first values only (Cache-Control and Vary
    joined)."""
    stored = []
    found = {
        "set-cookie": False,
        "vary": (),
        "etag": None,
        "last-modified": None,
        "date": None,
        "expires": None,
        "age": None,
        "content-length": None,
    }
    cache_control = []
    vary = []
    for name, value in headers:
        lowered = name.lower()
        if lowered in _PER_ANSWER:
            if lowered == "age" and found["age"] is None:
                found["age"] = value
            continue
        if lowered == "via" and value == via:
            continue
        stored.append((name, value))
        if lowered == "cache-control":
            cache_control.append(value)
        elif lowered == "vary":
            vary.extend(v.strip().lower() for v in value.split(",") if v.strip())
        elif lowered == "set-cookie":
            found["set-cookie"] = True
        elif lowered in found and found[lowered] is None:
            found[lowered] = value
    found["vary"] = tuple(sorted(set(vary)))
    cc = directives(", ".join(cache_control))
    return stored, cc, found


def _environ_key(name: str) -> str:
    """The WSGI environ key of a request header named in Vary."""
    key = name.upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key


def _opaque(tag: str) -> str:
    return tag.strip().removeprefix("W/")


def not_modified(environ, entry: Entry) -> bool:
    """Whether the client's own conditions say it has the stored answer
    (RFC 9110 section 13.2.2: If-None-Match, else If-Modified-Since).
    Never of an error or a redirect: preconditions apply to a 2xx only
    (section 13.2.1)."""
    if not 200 <= entry.status < 300:
        return False
    none_match = environ.get("HTTP_IF_NONE_MATCH")
    if none_match is not None:
        if none_match.strip() == "*":
            return True
        if entry.etag is None:
            return False
        mine = _opaque(entry.etag)
        return any(_opaque(tag) == mine for tag in none_match.split(","))
    since = http_date(environ.get("HTTP_IF_MODIFIED_SINCE"))
    modified = http_date(entry.last_modified)
    return since is not None and modified is not None and modified <= since


def cache_key(environ, prefixed: bool = False) -> str:
    """What an answer is stored under: scheme, Host and request target as
    the instance sees them, and with ``prefixed`` (a trusted proxy's headers
    are forwarded) the X-Forwarded-Prefix it builds its URLs under."""
    uri = environ.get("REQUEST_URI")
    if not uri:
        uri = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""))
        if environ.get("QUERY_STRING"):
            uri += "?" + environ["QUERY_STRING"]
    scheme = environ["wsgi.url_scheme"]
    host = environ.get("HTTP_HOST")
    if not host:  # HTTP/1.0 without Host: named to the instance as the proxy does
        host = environ.get("SERVER_NAME", "")
        port = environ.get("SERVER_PORT", "")
        if port and port != _DEFAULT_PORTS.get(scheme):
            host = f"{host}:{port}"
    key = f"{scheme}://{host.lower()}{uri}"
    prefix = environ.get("HTTP_X_FORWARDED_PREFIX") if prefixed else None
    return f"{prefix} {key}" if prefix else key


# -- what is stored ---------------------------------------------------------------


class Entry:
    """One stored answer. Never changed once stored: a refresh stores a new one."""

    __slots__ = (
        "key",
        "variant",
        "vary",
        "line",
        "status",
        "headers",
        "body",
        "size",
        "received",
        "age",
        "lifetime",
        "etag",
        "last_modified",
        "validate",
        "stale_ok",
        "shared_auth",
    )

    def __init__(self, key: str, line: str, stored: list, cc: dict, found: dict):
        self.key = key
        self.variant: tuple = ()
        #: The request headers it varies on, as environ keys.
        self.vary = tuple(_environ_key(name) for name in found["vary"])
        self.line = line
        self.status = int(line[:3])
        self.headers = stored
        self.body = b""
        self.size = 0
        self.received = 0.0
        #: Its corrected initial age (RFC 9111 section 4.2.3), in seconds.
        self.age = 0
        lifetime = found["lifetime"]
        self.lifetime = lifetime or 0
        self.etag = found["etag"]
        self.last_modified = found["last-modified"]
        #: Revalidated before every use (no-cache).
        self.validate = "no-cache" in cc
        #: May stand in, stale, for an error (s-maxage implies
        #: proxy-revalidate for a shared cache, RFC 9111 section 5.2.2.10).
        self.stale_ok = not (
            self.validate
            or "must-revalidate" in cc
            or "proxy-revalidate" in cc
            or "s-maxage" in cc
        )
        #: May answer a request with Authorization (RFC 9111 section 3.5).
        self.shared_auth = shared_with_authorization(cc)

    def age_at(self, now: float) -> float:
        return self.age + (now - self.received)

    def set_body(self, body: bytes) -> None:
        self.body = body
        if self.status != 204 and not any(
            name.lower() == "content-length" for name, _ in self.headers
        ):
            self.headers.append(("Content-Length", str(len(body))))
        self.size = (
            len(body)
            + sum(len(name) + len(value) + 4 for name, value in self.headers)
            + len(self.key)
            + sum(len(value) for value in self.variant if value)
            + OVERHEAD
        )


class _Resource:
    """The variants stored under one key, and the headers they vary on."""

    __slots__ = ("vary", "variants")

    def __init__(self, vary: tuple):
        self.vary = vary
        self.variants: set[tuple] = set()


class Cache:
    """The entries, in least recently used order, and what they have done."""

    def __init__(
        self,
        cache_size: int,
        cache_max_object: int,
        cache_stale_if_error: float = 0.0,
        fill_wait: float = FILL_WAIT,
        clock=time.time,
    ):
        self.size = cache_size
        self.max_object = cache_max_object
        self.stale_if_error = cache_stale_if_error
        self.fill_wait = fill_wait
        self.clock = clock
        self.lock = threading.Lock()
        self._entries: OrderedDict[tuple, Entry] = OrderedDict()
        self._keys: dict[str, _Resource] = {}
        self._filling: dict[tuple, threading.Event] = {}
        # By the key's hash, not the key: up to MAX_PASSES of them, outside
        # cache_size, each as long as a client makes its request target.
        # (str hashes are salted per process: no client can aim a collision,
        # which would only pass, or not, another key for a while.)
        self._passes: dict[int, float] = {}
        #: Bytes held (bodies, headers and bookkeeping).
        self.bytes = 0
        #: Counts purges and invalidations: an answer fetched before one is
        #: not stored after it (it may be what was purged).
        self.generation = 0
        self.hits = self.misses = self.stale = self.revalidated = self.evicted = 0

    def serve(self, task):
        """The WSGI answer to ``task`` (a proxy Task, admitted): from the
        cache, or from an instance through it."""
        method = task.method
        if method != "GET" and method != "HEAD":
            # Unsafe methods change what is stored (RFC 9111 section 4.4).
            unsafe = method != "OPTIONS" and method != "TRACE"
            return Lookup(self, task).through(invalidate=unsafe)
        if task.length:  # content it cannot key on, which the instance reads
            return Lookup(self, task).through()
        environ = task.environ
        for name in _THROUGH:
            if name in environ:
                return Lookup(self, task).through()
        return Lookup(self, task).run()

    # -- reading and writing entries (callers hold the lock) --------------------

    def _find(self, lookup: Lookup) -> Entry | None:
        resource = self._keys.get(lookup.key)
        if resource is None:
            lookup.fill_key = (lookup.key, None)
            return None
        get = lookup.task.environ.get
        variant = tuple(get(name) for name in resource.vary)
        lookup.fill_key = (lookup.key, variant)
        return self._entries.get(lookup.fill_key)

    def _store(self, entry: Entry) -> None:
        key = entry.key
        self._remove((key, entry.variant))
        if entry.size > self.size:  # it would push out every entry, itself too
            return
        resource = self._keys.get(key)
        if resource is None or resource.vary != entry.vary:
            if resource is not None:  # other Vary now: the old variants go
                self._drop(key)
            resource = self._keys[key] = _Resource(entry.vary)
        self._entries[(key, entry.variant)] = entry
        resource.variants.add(entry.variant)
        self.bytes += entry.size
        self._passes.pop(hash(key), None)
        while self.bytes > self.size:
            (key, variant), old = self._entries.popitem(last=False)
            self.bytes -= old.size
            self.evicted += 1
            self._forget(key, variant)

    def _remove(self, where: tuple) -> bool:
        old = self._entries.pop(where, None)
        if old is None:
            return False
        self.bytes -= old.size
        self._forget(*where)
        return True

    def _forget(self, key: str, variant: tuple) -> None:
        resource = self._keys.get(key)
        if resource is not None:
            resource.variants.discard(variant)
            if not resource.variants:
                del self._keys[key]

    def _drop(self, key: str) -> int:
        resource = self._keys.get(key)
        if resource is None:
            return 0
        return sum(self._remove((key, v)) for v in list(resource.variants))

    def _pass(self, key: str) -> None:
        if len(self._passes) >= MAX_PASSES:
            self._passes.clear()
        self._passes[hash(key)] = self.clock() + PASS_TIME

    def stale_usable(self, entry: Entry) -> bool:
        """Whether ``entry``, stale, may stand in for an error now."""
        return (
            self.stale_if_error > 0
            and entry.stale_ok
            and entry.age_at(self.clock()) - entry.lifetime <= self.stale_if_error
        )

    # -- what others see --------------------------------------------------------

    def invalidate(self, key: str) -> None:
        """Drop what is stored under ``key`` (an unsafe method changed it)."""
        with self.lock:
            self.generation += 1
            self._drop(key)

    def purge(self, path: str | None = None) -> int:
        """Drop every entry, or those whose request path is ``path`` (the one
        target, when ``path`` has a query); how many."""
        with self.lock:
            self.generation += 1
            if path is None:
                count = len(self._entries)
                self._entries.clear()
                self._keys.clear()
                self._passes.clear()
                self.bytes = 0
                return count
            wanted = path.lstrip("/")
            whole = "?" in wanted
            keys = []
            for key in self._keys:
                target = key.partition("://")[2].partition("/")[2]
                if (target if whole else target.partition("?")[0]) == wanted:
                    keys.append(key)
            for key in keys:
                self._passes.pop(hash(key), None)
            return sum(self._drop(key) for key in keys)

    def stats(self) -> dict:
        with self.lock:
            return {
                "entries": len(self._entries),
                "bytes": self.bytes,
                "size": self.size,
                "max_object": self.max_object,
                "stale_if_error": self.stale_if_error,
                "hits": self.hits,
                "misses": self.misses,
                "stale": self.stale,
                "revalidated": self.revalidated,
                "evicted": self.evicted,
            }


def _close(body) -> None:
    close = getattr(body, "close", None)
    if close is not None:
        close()


class _Capture:
    """The proxy's start_response while the cache decides what goes out."""

    __slots__ = ("start_response", "clock", "line", "headers", "received", "sent")

    def __init__(self, start_response, clock):
        self.start_response = start_response
        self.clock = clock
        self.line = "502 Bad Gateway"
        self.headers: list = []
        self.received = 0.0
        #: Whether the head went on to the client.
        self.sent = False

    def __call__(self, status, headers, exc_info=None):
        if self.sent:
            # An instance failed before any byte of the body: the proxy's
            # error replaces the head, and what came is not stored.
            self.line = None
            headers.append(("X-Cache", MISS))
            return self.start_response(status, headers, exc_info)
        self.line, self.headers = status, headers
        self.received = self.clock()
        return None

    def send(self) -> None:
        self.headers.append(("X-Cache", MISS))
        self.sent = True
        self.start_response(self.line, self.headers)


class Lookup:
    """One request on its way through the cache (the proxy's Task is the
    model): what it may take from the cache and what it may leave there."""

    __slots__ = (
        "cache",
        "task",
        "start_response",
        "key",
        "generation",
        "fill_key",
        "cc",
        "entry",
        "fill",
        "store",
    )

    def __init__(self, cache: Cache, task):
        self.cache = cache
        self.task = task
        #: The server's own, for the answers made here.
        self.start_response = task.start_response
        environ = task.environ
        self.key = cache_key(environ, task.proxy.trusted is not None)
        self.generation = cache.generation  # as the answer is asked for
        self.fill_key: tuple = (self.key, None)
        value = environ.get("HTTP_CACHE_CONTROL")
        if value is not None:
            self.cc = directives(value)
        elif "no-cache" in environ.get("HTTP_PRAGMA", ""):  # HTTP/1.0's
            self.cc = {"no-cache": None}
        else:
            self.cc = {}
        #: A stored answer this request may use, fresh or not.
        self.entry: Entry | None = None
        #: Set while this request fills its entry for the others.
        self.fill: threading.Event | None = None
        #: Whether what the instance answers may be stored.
        self.store = (
            task.method == "GET" and "no-store" not in self.cc and not self.pinned()
        )

    def pinned(self) -> bool:
        """Whether the request carries the affinity cookie in insert mode."""
        sticky = self.task.proxy.sticky
        return (
            sticky is not None
            and sticky.insert
            and cookie_value(self.task.environ.get("HTTP_COOKIE"), sticky.name)
            is not None
        )

    def fresh(self, entry: Entry, now: float) -> bool:
        """Whether ``entry`` answers this request without asking an instance
        (RFC 9111 sections 4.2 and 5.2.1)."""
        cc = self.cc
        if entry.validate or "no-cache" in cc:
            return False
        age = entry.age_at(now)
        if age >= entry.lifetime:
            return False
        if "max-age" in cc:
            limit = delta_seconds(cc["max-age"])
            if limit is None or age > limit:
                return False
        if "min-fresh" in cc:
            wanted = delta_seconds(cc["min-fresh"])
            if wanted is None or age + wanted >= entry.lifetime:
                return False
        return True

    # -- the ways through ------------------------------------------------------

    def run(self):
        """Answer from the cache when it may; else wait (once, a bounded
        time) for the request filling the entry, or fill it, or go through."""
        cache = self.cache
        authorized = "HTTP_AUTHORIZATION" in self.task.environ
        hit = entry = None
        for waited in (False, True):
            now = cache.clock()
            event = None
            with cache.lock:
                entry = cache._find(self)
                if entry is not None and authorized and not entry.shared_auth:
                    entry = None
                if entry is not None and self.fresh(entry, now):
                    cache._entries.move_to_end(self.fill_key)
                    cache.hits += 1
                    hit = entry
                elif self.store and cache._passes.get(hash(self.key), 0.0) <= now:
                    event = cache._filling.get(self.fill_key)
                    if event is None:
                        self.fill = cache._filling[self.fill_key] = threading.Event()
                    elif waited:  # still filling: this one goes on its own
                        event = None
            if event is None:
                break
            event.wait(cache.fill_wait)
        if hit is not None:
            return self.answer(hit, HIT, log=True)
        self.entry = entry
        return self.fetch()

    def through(self, invalidate: bool = False):
        """Forward the request as it is; with ``invalidate`` (an unsafe
        method), what is stored under its key goes once the app took it."""
        cache = self.cache
        capture = _Capture(self.start_response, cache.clock)
        self.task.start_response = capture
        body = self.task.forward()
        if invalidate:
            if int(capture.line[:3]) < 400:
                cache.invalidate(self.key)
        else:
            with cache.lock:
                cache.misses += 1
        capture.send()
        return body

    def fetch(self):
        """Ask an instance: to fill the entry (revalidating the stored one
        when it has validators), or on this request's own behalf."""
        task, entry = self.task, self.entry
        environ = task.environ
        conditions = None
        filling = self.fill is not None
        revalidating = (
            filling and entry is not None and bool(entry.etag or entry.last_modified)
        )
        if revalidating or (filling and "HTTP_AUTHORIZATION" not in environ):
            # A whole answer is asked for, to store; the client's own
            # conditions are judged here, against it. A request with
            # Authorization keeps them (its answer is stored only if public:
            # its own 304 is worth more), unless a stored answer is revalidated.
            conditions = [environ.pop(name, None) for name in _CONDITIONS]
            if revalidating:
                if entry.etag:
                    environ["HTTP_IF_NONE_MATCH"] = entry.etag
                if entry.last_modified:
                    environ["HTTP_IF_MODIFIED_SINCE"] = entry.last_modified
        capture = _Capture(self.start_response, self.cache.clock)
        task.start_response = capture
        sent_at = self.cache.clock()
        try:
            body = task.forward()
        except BaseException:
            self.release()
            raise
        if conditions is not None:
            for name, value in zip(
                ("HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE"),
                conditions,
                strict=True,
            ):
                if value is None:
                    environ.pop(name, None)
                else:
                    environ[name] = value
        try:
            return self.finish(capture, body, sent_at, revalidating)
        except BaseException:
            _close(body)
            self.release()
            raise

    def finish(self, capture: _Capture, body, sent_at: float, revalidating: bool):
        """What the client gets once the instance's head is in."""
        cache, entry = self.cache, self.entry
        status = int(capture.line[:3])
        if revalidating and status == 304:
            _close(body)
            with cache.lock:
                cache.revalidated += 1
            return self.answer(self.refreshed(capture, sent_at), REVALIDATED)
        if entry is not None and status in ERROR_STATUSES and cache.stale_usable(entry):
            _close(body)
            self.release()
            log.warning(
                "request %s: %s answered from the cache, stale, for a %d",
                self.task.request_id,
                self.key,
                status,
            )
            with cache.lock:
                cache.stale += 1
            return self.answer(entry, STALE)
        with cache.lock:
            cache.misses += 1
        if self.fill is None:
            capture.send()
            return body
        line = capture.line
        fresh, reason = self.build(line, capture.headers, capture, sent_at)
        if reason is None and not isinstance(body, list):
            environ = self.task.environ
            if not (
                any(name in environ for name in _CONDITIONS)
                and any(name.lower() == "content-length" for name, _ in fresh.headers)
            ):
                capture.send()
                return _Filling(self, body, fresh, capture)
            # The client's conditions are judged against the whole answer,
            # of a known size within cache_max_object: it is read first.
            streamed = body
            try:
                body = [b"".join(streamed)]
            except UpstreamError as exc:  # cut short, and nothing of it went out
                body = error_response(capture, exc.status, str(exc))
            finally:
                _close(streamed)
            if capture.line is not line:  # the instance failed: the proxy's error
                self.release()
                capture.send()
                return body
        if reason is None:
            data = b"".join(body)
            if len(data) <= cache.max_object:
                fresh.set_body(data)
                self.keep(fresh)
                if not_modified(self.task.environ, fresh):
                    return self.answer(fresh, MISS)
                capture.send()
                return body
            reason = TOO_LARGE
        # Not stored for the answer's sake: so are the next ones, likely;
        # not after an error, which passes, nor a 304 to the client's own
        # conditions.
        passed = reason != UNSHARED and status not in ERROR_STATUSES and status != 304
        self.release(passed=passed)
        capture.send()
        return body

    def build(
        self, line: str, headers: list, capture: _Capture, sent_at: float
    ) -> tuple[Entry, str | None]:
        """The entry an answer makes, and why it may not be stored (or None)."""
        stored, cc, found = facts(headers, self.task.proxy.via)
        date = http_date(found["date"])
        received = capture.received
        found["lifetime"] = freshness(cc, found["expires"], date or received)
        entry = Entry(self.key, line, stored, cc, found)
        entry.received = received
        # RFC 9111 section 4.2.3, the apparent age in whole seconds as the
        # Date header has them.
        apparent = max(0, int(received) - int(date)) if date is not None else 0
        upstream = delta_seconds(found["age"]) or 0
        entry.age = max(apparent, upstream + (received - sent_at))
        environ = self.task.environ
        entry.variant = tuple(environ.get(name) for name in entry.vary)
        reason = unstorable(entry.status, cc, found)
        length = found["content-length"]
        if (
            reason is None
            and length is not None
            and int(length) > self.cache.max_object
        ):
            reason = "larger than cache_max_object"
        if (
            reason is None
            and "HTTP_AUTHORIZATION" in environ
            and not shared_with_authorization(cc)
        ):
            return entry, UNSHARED
        return entry, reason

    def refreshed(self, capture: _Capture, sent_at: float) -> Entry:
        """The stored answer updated with a 304's fields (RFC 9111 section
        4.3.4), stored again if it still may be."""
        old = self.entry
        update, _, _ = facts(capture.headers, self.task.proxy.via)
        names = {name.lower() for name, _ in update} - _KEPT
        headers = [h for h in old.headers if h[0].lower() not in names]
        headers += [h for h in update if h[0].lower() in names]
        fresh, reason = self.build(old.line, headers, capture, sent_at)
        fresh.set_body(old.body)
        if reason is None:
            self.keep(fresh)
        else:
            with self.cache.lock:
                self.cache._remove((old.key, old.variant))
            self.release()
        return fresh

    # -- the entry -------------------------------------------------------------

    def keep(self, entry: Entry) -> None:
        """Store ``entry``; the requests waiting for it go on."""
        with self.cache.lock:
            if self.cache.generation == self.generation:
                self.cache._store(entry)
        self.release()

    def release(self, passed: bool = False) -> None:
        """Let the requests waiting for this one's fill go on (idempotent);
        ``passed``: the key's answers are not storable, for a while."""
        fill, cache = self.fill, self.cache
        if fill is None and not passed:
            return
        with cache.lock:
            if passed:
                cache._pass(self.key)
            if fill is not None and cache._filling.get(self.fill_key) is fill:
                del cache._filling[self.fill_key]
            self.fill = None
        if fill is not None:
            fill.set()

    def answer(self, entry: Entry, label: str, log: bool = False):
        """Answer from ``entry``: a 304 when the client's own conditions
        say it has it, with Age and ``X-Cache: label``."""
        task = self.task
        own = [
            ("Age", str(int(entry.age_at(self.cache.clock())))),
            ("Via", task.proxy.via),
            ("X-Request-ID", task.request_id),
            ("X-Cache", label),
        ]
        if not_modified(task.environ, entry):
            line, body = "304 Not Modified", b""
            headers = [h for h in entry.headers if h[0].lower() in _NOT_MODIFIED]
            headers += own
        else:
            line, body, headers = entry.line, entry.body, entry.headers + own
        if task.method == "HEAD":
            body = b""
        self.start_response(line, headers)
        if log:
            task.log(int(line[:3]), len(body), None)
        return [body] if body else []


class _Filling:
    """A streamed answer kept, up to ``cache_max_object``, on its way to
    the client; stored once it came whole. Past the limit what was kept is
    dropped and the rest only streams through."""

    __slots__ = ("lookup", "body", "entry", "capture", "parts", "size")

    def __init__(self, lookup: Lookup, body, entry: Entry, capture: _Capture):
        self.lookup = lookup
        self.body = body
        self.entry = entry
        self.capture = capture
        self.parts: list[bytes] | None = []
        self.size = 0

    def __iter__(self):
        limit = self.lookup.cache.max_object
        parts = self.parts
        response = self.body.response  # a proxy Streamed's: to see it complete
        if response.until_close:
            # Ended by the instance's close: an answer cut short by a crash
            # looks whole, so it is not kept (RFC 9112 section 8).
            parts = self.parts = None
            self.lookup.release()
        for piece in self.body:
            if parts is not None:
                self.size += len(piece)
                if self.size > limit:
                    parts = self.parts = None
                    self.lookup.release(passed=True)
                else:
                    parts.append(piece)
                    if response.complete:
                        # Stored before the last piece goes out: the client
                        # that has it all may ask again at once.
                        self._keep()
                        parts = None
            yield piece
        if parts is not None:
            self._keep()

    def _keep(self) -> None:
        parts, self.parts = self.parts, None
        if self.capture.line is not None:
            self.entry.set_body(b"".join(parts))
            self.lookup.keep(self.entry)

    def close(self) -> None:
        try:
            _close(self.body)
        finally:
            self.lookup.release()  # an answer cut short is not stored
