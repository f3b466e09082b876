"""The instances behind the dispatcher: their state, and which may take requests."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from time import perf_counter
from urllib.parse import urlsplit

from pyramid_lb.dispatcher.stats import Tally
from pyramid_lb.dispatcher.upstream import Pool, ReadTimeout, UpstreamError

log = logging.getLogger("pyramid_lb.dispatcher")

# States an instance goes through, as the dashboard shows them.
STARTING = "starting"  # not yet passed enough health checks
UP = "up"
DRAINING = "draining"  # finishing its requests, takes no new ones
DOWN = "down"  # failed its health checks
FAILED = "failed"  # given up on (the supervisor stopped restarting it)

#: The longest an ejection lasts, however often it repeats (seconds).
MAX_EJECT_TIME = 300.0


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
        **pool_options,
    ):
        self.url = url.rstrip("/")
        self.host, self.port = parse_backend_url(url)
        self.name = name or f"{self.host}:{self.port}"
        self.weight = weight
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
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Backend {self.name} {self.url} {self.state}>"


class Attempt:
    """One exchange with a backend, counted from the moment it is sent.

    A context manager: every way out of its block ends it once, a failure
    (an exception) included, unless :meth:`keep` handed it on to the body
    still being streamed, whose close calls :meth:`end`. Passive health is
    judged by :meth:`answered` (the head came) or the failure.
    """

    __slots__ = ("cluster", "backend", "sent", "status", "kept", "ended")

    def __init__(self, cluster: Cluster, backend: Backend, retry: bool):
        self.cluster = cluster
        self.backend = backend
        self.status = 0
        self.kept = self.ended = False
        with backend.lock:
            backend.in_flight += 1
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
            backend.in_flight -= 1
            backend.tally.add(self.status, elapsed)
        # A failure before the head counts against the instance, but a
        # timeout: the request may be running still, slowly.
        if isinstance(error, UpstreamError) and not self.status:
            if not isinstance(error, ReadTimeout):
                self.cluster.failed(backend, str(error))
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
        clock: Callable[[], float] = time.monotonic,
    ):
        self.backends: list[Backend] = list(backends)
        self.eject_after = eject_after
        self.eject_time = eject_time
        self.max_eject_time = max_eject_time
        self._clock = clock
        self._lock = threading.RLock()
        self._candidates: tuple[Backend, ...] = ()
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
            self._candidates = tuple(serving if panic else healthy)
            ejected_until = [b.ejected_until for b in serving if b.ejected_until > now]
            self._recheck_at = min(ejected_until, default=float("inf"))

    def changed(self) -> None:
        """Some backend's state changed: recompute the candidates."""
        self._stale = True

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
            backend.state = state
            self._stale = True
        if state in (DOWN, FAILED):
            backend.pool.clear()
        self._changed()

    def hold(self, backend: Backend, held: bool = True) -> None:
        """Stop (or resume) sending new requests to ``backend``."""
        backend.held = held
        self._stale = True
        self._changed()

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
        """Start counting an exchange with ``backend`` (``retry`` of another)."""
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
