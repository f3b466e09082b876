"""The instances behind the dispatcher: their state, and which may take requests."""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable
from time import perf_counter
from urllib.parse import urlsplit

from pyramid_lb.dispatcher.queueing import RequestQueue
from pyramid_lb.dispatcher.stats import Tally
from pyramid_lb.dispatcher.upstream import Pool, UpstreamError

log = logging.getLogger("pyramid_lb.dispatcher")

# States an instance goes through, as the dashboard shows them.
STARTING = "starting"  # not yet passed enough health checks
UP = "up"
DRAINING = "draining"  # finishing its requests, takes no new ones
DOWN = "down"  # failed its health checks
FAILED = "failed"  # given up on (the supervisor stopped restarting it)

#: The longest an ejection lasts, however often it repeats (seconds).
MAX_EJECT_TIME = 300.0
#: The share of its turns an instance gets when its slow start begins.
SLOW_START_FLOOR = 0.1


def parse_backend_url(url: str) -> tuple[str, int]:
    """``http://host:port`` as ``(host, port)``; ValueError says what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"{url!r}: only http:// instances can be proxied to")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"{url!r}: the port is not a number from 1 to 65535") from None
    if not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"{url!r}: expected http://host:port with no path")
    return parts.hostname, port


class Backend:
    """One instance: where it is, how it is doing, and its connections.

    Everything here is written by :class:`Cluster` (and the
    :class:`Attempt` it hands out) and only read elsewhere.
    """

    def __init__(
        self,
        url: str,
        name: str | None = None,
        weight: int = 1,
        state: str = UP,
        max_in_flight: int | None = None,
        **pool_options,
    ):
        self.url = url.rstrip("/")
        self.host, self.port = parse_backend_url(url)
        self.name = name or f"{self.host}:{self.port}"
        self.weight = weight
        #: Requests it may have in flight at once (None: no cap); the next
        #: ones wait in the cluster's queue.
        self.max_in_flight = max_in_flight
        self.pool_options = pool_options
        self.pool = Pool(self.host, self.port, **pool_options)
        self.state = state
        #: Set by the admin or supervisor: no new requests, even if healthy.
        self.held = False
        # counts of exchanges, for the stats
        self.in_flight = 0
        self.tally = Tally()
        self.requests = 0
        self.retries = 0  # exchanges that were retries of a failed one
        self.errors = 0  # exchanges that failed, or answered a 5xx but 503
        # passive health (outlier detection)
        self.errors_in_a_row = 0
        self.ejections_in_a_row = 0  # each one lasts longer
        self.ejections = 0
        self.ejected_until = 0.0
        #: When it last became ready: its slow start runs from then (or
        #: from the end of its last ejection, if later).
        self.ready_since = -math.inf
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Backend {self.name} {self.url} {self.state}>"


class Attempt:
    """One exchange with a backend, on a slot :meth:`Cluster.take` took.

    A context manager: every way out of its block ends it once, a failure
    (an exception) included, unless :meth:`keep` handed it on to the body
    still being streamed, whose close calls :meth:`end`; ending it frees
    the slot. Passive health is judged by :meth:`answered` (the head came)
    or the failure.
    """

    __slots__ = ("cluster", "backend", "sent", "status", "kept", "ended")

    def __init__(self, cluster: Cluster, backend: Backend, retry: bool):
        self.cluster = cluster
        self.backend = backend
        self.status = 0
        self.kept = self.ended = False
        with backend.lock:
            backend.requests += 1
            if retry:
                backend.retries += 1
        self.sent = perf_counter()

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if error is not None or not self.kept:
            self.end(error)
        return False

    def answered(self, status: int) -> None:
        """The instance answered ``status``: a 5xx is a failure, but a 503,
        which an app sends on purpose (and its readiness says the rest)."""
        self.status = status
        if status >= 500 and status != 503:
            self.cluster.failed(self.backend, f"answered {status}")
        else:
            self.cluster.succeeded(self.backend)

    def keep(self) -> None:
        """The answer's body goes on after the block: its close ends this."""
        self.kept = True

    def end(self, error: BaseException | None = None) -> float:
        """Count the exchange as over (once); the time it took."""
        elapsed = perf_counter() - self.sent
        if self.ended:
            return elapsed
        self.ended = True
        backend = self.backend
        with backend.lock:
            backend.tally.add(self.status, elapsed)
        # A failure before the head counts against the instance, a timeout
        # too: an instance that stops answering is taken out passively. It is
        # counted before the slot is freed, so that an ejection it causes
        # comes before the slot is handed to the next request.
        if isinstance(error, UpstreamError) and not self.status:
            self.cluster.failed(backend, str(error))
        self.cluster.release(backend)
        return elapsed


class Cluster:
    """The set of backends and the subset that may take new requests.

    Requests read :meth:`candidates` (a tuple, recomputed only when some
    state changed); health checks, passive ejection, the supervisor and the
    admin change states through the methods here. ``backends`` is replaced,
    never changed in place, so it can be iterated without the lock.
    """

    def __init__(
        self,
        backends: Iterable[Backend] = (),
        eject_after: int = 3,
        eject_time: float = 5.0,
        max_eject_time: float = MAX_EJECT_TIME,
        slow_start: float = 0.0,
        queue: RequestQueue | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.backends: list[Backend] = list(backends)
        self.eject_after = eject_after
        self.eject_time = eject_time
        self.max_eject_time = max_eject_time
        self.slow_start = slow_start
        #: Where requests wait while every instance they may use is full.
        self.queue = queue or RequestQueue()
        self._clock = clock
        self._lock = threading.RLock()
        self._candidates: tuple[Backend, ...] = ()
        # Among the candidates: whether any has a cap, and those still in
        # their slow start (backend -> when it began).
        self._capped = False
        self._warming: dict[Backend, float] = {}
        self._recheck_at = 0.0  # when an ejection ends
        self._stale = True
        self.panic = False
        #: Bumped on membership and weight changes (consistent hashing
        #: rebuilds its ring). Always bumped after ``backends`` is replaced.
        self.version = 0
        #: Called (without the lock) after a state, hold or membership
        #: change, so the dispatcher can tell how many instances are ready.
        self.on_change: Callable[[], None] | None = None

    def _changed(self) -> None:
        self.queue.kick(self)
        if self.on_change is not None:
            self.on_change()

    # -- membership -----------------------------------------------------------

    def add(self, backend: Backend) -> None:
        with self._lock:
            self.backends = [*self.backends, backend]
            self.version += 1
            self._stale = True
        self._changed()

    def remove(self, backend: Backend) -> None:
        with self._lock:
            backends = list(self.backends)
            backends.remove(backend)
            self.backends = backends
            self.version += 1
            self._stale = True
        backend.pool.close()
        self._changed()

    def set_weight(self, backend: Backend, weight: int) -> None:
        """Change ``backend``'s share of the requests."""
        with self._lock:
            backend.weight = weight
            self.version += 1

    def get(self, name: str) -> Backend | None:
        for backend in self.backends:
            if backend.name == name:
                return backend
        return None

    # -- who takes requests ---------------------------------------------------

    def candidates(self) -> tuple[Backend, ...]:
        """Backends that may take a new request, best effort when all look bad."""
        if self._stale or self._clock() >= self._recheck_at:
            self._recompute()
        return self._candidates

    @property
    def capped(self) -> bool:
        """Whether a candidate has a cap (``max_in_flight``): a request may
        then find no room."""
        self.candidates()
        return self._capped

    def _recompute(self) -> None:
        with self._lock:
            now = self._clock()
            if not self._stale and now < self._recheck_at:
                return  # another thread did it while this one waited
            # Cleared before reading the states, not after: a change made
            # meanwhile (hold and changed do not wait for the lock) marks
            # the candidates stale again instead of being lost.
            self._stale = False
            serving = [b for b in self.backends if b.state == UP and not b.held]
            healthy = [b for b in serving if b.ejected_until <= now]
            panic = bool(serving) and not healthy
            if panic != self.panic:
                self.panic = panic
                if panic:
                    log.warning(
                        "every instance is ejected after failures; trying them all "
                        "anyway (panic mode)"
                    )
                else:
                    log.info("panic mode over: some instances are healthy again")
            candidates = self._candidates = tuple(serving if panic else healthy)
            self._capped = any(b.max_in_flight is not None for b in candidates)
            self._warming = {}
            ends = [b.ejected_until for b in serving if b.ejected_until > now]
            if self.slow_start:
                for backend in candidates:
                    since = max(backend.ready_since, backend.ejected_until)
                    if now - since < self.slow_start:
                        self._warming[backend] = since
                        ends.append(since + self.slow_start)
            self._recheck_at = min(ends, default=math.inf)

    def changed(self) -> None:
        """Some backend's state changed: recompute the candidates."""
        self._stale = True
        self.queue.kick(self)

    def eligible(self, tried=()) -> list[Backend] | tuple[Backend, ...]:
        """The candidates a balancing strategy may pick for a new request:
        not ``tried``, with room under their cap, and those in their slow
        start only in a share of the turns that grows to all of them."""
        candidates = self.candidates()
        if tried:
            candidates = [b for b in candidates if b not in tried]
        if self._capped:
            candidates = [
                b
                for b in candidates
                if b.max_in_flight is None or b.in_flight < b.max_in_flight
            ]
        warming = self._warming
        if warming and candidates:
            now, draw = self._clock(), random.random
            ramped = [
                b
                for b in candidates
                if b not in warming
                or draw() < max(SLOW_START_FLOOR, (now - warming[b]) / self.slow_start)
            ]
            # Turned away by chance from each: better one of them than none.
            candidates = ramped or candidates
        return candidates

    @staticmethod
    def keeps_pinned(backend: Backend) -> bool:
        """Whether ``backend``, out of rotation, still takes the requests
        pinned to it: a draining instance keeps its clients until it is
        gone (see :mod:`pyramid_lb.dispatcher.sticky`)."""
        return backend.state == UP and backend.held

    def untried(self, tried) -> bool:
        """Whether any candidate is not in ``tried`` (full or not)."""
        return any(b not in tried for b in self.candidates())

    def share(self, backend: Backend) -> float:
        """The share of its turns ``backend`` gets now (below 1 in its slow
        start)."""
        self.candidates()
        since = self._warming.get(backend)
        if since is None:
            return 1.0
        ramp = (self._clock() - since) / self.slow_start
        return max(SLOW_START_FLOOR, min(1.0, ramp))

    # -- slots under the caps -------------------------------------------------

    @staticmethod
    def has_room(backend: Backend) -> bool:
        cap = backend.max_in_flight
        return cap is None or backend.in_flight < cap

    def take(self, backend: Backend) -> bool:
        """Take a slot on ``backend`` for a request, if its cap leaves one."""
        with backend.lock:
            cap = backend.max_in_flight
            if cap is not None and backend.in_flight >= cap:
                return False
            backend.in_flight += 1
        return True

    def release(self, backend: Backend) -> None:
        """Free a slot :meth:`take` took; a waiting request gets it."""
        with backend.lock:
            backend.in_flight -= 1
        if self.queue.depth:
            self.queue.offer(self, backend)

    def set_state(self, backend: Backend, state: str, reason: str = "") -> None:
        with self._lock:  # two callers racing would log the same change twice
            if backend.state == state:
                return
            log.info(
                "instance %s: %s -> %s%s",
                backend.name,
                backend.state,
                state,
                f" ({reason})" if reason else "",
            )
            if state == UP:
                self._ready_now(backend)
            backend.state = state
            self._stale = True
        if state in (DOWN, FAILED):
            backend.pool.clear()
        self._changed()

    def hold(self, backend: Backend, held: bool = True) -> None:
        """Stop (or resume) sending new requests to ``backend``."""
        if backend.held and not held:
            self._ready_now(backend)
        backend.held = held
        self._stale = True
        self._changed()

    def _ready_now(self, backend: Backend) -> None:
        """``backend`` is about to take requests: its slow start begins,
        unless no other instance serves (then it is needed at full speed)."""
        if any(b.state == UP and not b.held for b in self.backends if b is not backend):
            backend.ready_since = self._clock()
        else:
            backend.ready_since = -math.inf

    def move(self, backend: Backend, port: int) -> None:
        """``backend`` listens on ``port`` now; connections to the old one go."""
        old = backend.pool
        with self._lock:
            backend.port = port
            backend.url = f"http://{backend.host}:{port}"
            backend.pool = Pool(backend.host, port, **backend.pool_options)
        old.close()

    # -- exchanges and passive health -----------------------------------------

    def attempt(self, backend: Backend, retry: bool = False) -> Attempt:
        """Start counting an exchange with ``backend`` (``retry`` of another),
        on a slot :meth:`take` took."""
        return Attempt(self, backend, retry)

    def ejected(self, backend: Backend) -> bool:
        return backend.ejected_until > self._clock()

    def succeeded(self, backend: Backend) -> None:
        if backend.errors_in_a_row:
            backend.errors_in_a_row = 0

    def failed(self, backend: Backend, reason: str) -> None:
        """Count a failed exchange or a 5xx; eject after too many in a row.

        With ``eject_after = 0`` nothing is ever ejected.
        """
        with self._lock:
            backend.errors += 1
            backend.errors_in_a_row += 1
            now = self._clock()
            if (
                not self.eject_after
                or backend.errors_in_a_row < self.eject_after
                or backend.ejected_until > now
            ):
                return
            if now - backend.ejected_until > self.max_eject_time:
                backend.ejections_in_a_row = 0  # well behaved for long: start over
            backend.ejections_in_a_row += 1
            backend.ejections += 1
            cooldown = min(
                self.eject_time * backend.ejections_in_a_row, self.max_eject_time
            )
            backend.ejected_until = now + cooldown
            backend.errors_in_a_row = 0
            backend.pool.clear()
            self._stale = True
        log.warning(
            "instance %s ejected for %gs after %d failures in a row (last: %s)",
            backend.name,
            cooldown,
            self.eject_after,
            reason,
        )
