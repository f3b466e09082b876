"""Active health checks: probe every instance's readiness on an interval."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from pyramid_lb.dispatcher.cluster import DOWN, STARTING, UP, Backend, Cluster
from pyramid_lb.dispatcher.upstream import Pool, UpstreamError, exchange

log = logging.getLogger("pyramid_lb.dispatcher")

#: A health answer larger than this is cut off (and the connection dropped).
MAX_BODY = 65536


class Probes:
    """What the probes of one backend found: counts in a row, the last one."""

    __slots__ = ("passes_in_a_row", "fails_in_a_row", "liveness_fails", "last", "live")

    def __init__(self, live: bool = False):
        self.passes_in_a_row = 0
        self.fails_in_a_row = 0
        #: liveness probes failed in a row
        self.liveness_fails = 0
        #: (wall time, passed, what was seen) of the last readiness probe
        self.last: tuple[float, bool, str] | None = None
        #: Whether liveness is probed too: a spawned instance, once it was ready.
        self.live = live


class HealthChecker:
    """Probes ``path`` on every backend; ``rise`` passes up, ``fall`` fails down.

    An answer other than 2xx/3xx (a draining instance's readiness answers
    503), a timeout or a refused connection is a failed probe. Each backend
    gets one keep-alive connection of its own, apart from the request pool,
    so probes are never stuck behind requests.
    """

    def __init__(
        self,
        cluster: Cluster,
        health_check_path: str = "/readyz",
        health_check_interval: float = 1.0,
        health_check_timeout: float = 2.0,
        rise: int = 2,
        fall: int = 3,
        host: str = "localhost",
        liveness_path: str = "/healthz",
    ):
        self.cluster = cluster
        self.interval = health_check_interval
        self.timeout = health_check_timeout
        self.rise = rise
        self.fall = fall
        self.request = _probe_request(health_check_path, host)
        self.liveness_request = _probe_request(liveness_path, host)
        self._pools: dict[Backend, Pool] = {}
        self._probes: dict[Backend, Probes] = {}
        #: Backends whose liveness is probed once they are ready (spawned ones).
        self._spawned: set[Backend] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._executor = ThreadPoolExecutor(8, thread_name_prefix="pyramid_lb-check")

    def probe(self, backend: Backend, request: bytes | None = None) -> tuple[bool, str]:
        """One probe (of readiness unless told): passed?, and what was seen."""
        pool = self._pools.get(backend)
        if pool is None or pool.address != (backend.host, backend.port):
            pool = self._pools[backend] = Pool(
                backend.host, backend.port, 1, self.timeout, self.timeout
            )
        started = time.monotonic()
        try:
            response = exchange(pool, request or self.request, replayable=True)
        except UpstreamError as exc:
            pool.clear()
            return False, str(exc)
        try:
            received = len(response.take_buffered())
            for piece in response.stream():
                received += len(piece)
                if received > MAX_BODY:
                    response.close()
                    break
        except UpstreamError as exc:
            response.close()
            return False, str(exc)
        response.release()
        elapsed = (time.monotonic() - started) * 1000
        passed = 200 <= response.status < 400
        return passed, f"{response.status} in {elapsed:.1f} ms"

    def _probes_of(self, backend: Backend) -> Probes:
        probes = self._probes.get(backend)
        if probes is None:
            probes = self._probes[backend] = Probes()
        return probes

    def record(self, backend: Backend, passed: bool, detail: str) -> None:
        """Count a readiness probe's outcome; enough in a row change the
        backend's state (through the cluster)."""
        probes = self._probes_of(backend)
        probes.last = (time.time(), passed, detail)
        if passed:
            probes.fails_in_a_row = 0
            probes.passes_in_a_row += 1
            if (
                backend.state in (STARTING, DOWN)
                and probes.passes_in_a_row >= self.rise
            ):
                self.cluster.set_state(backend, UP, f"health check: {detail}")
            if backend in self._spawned and backend.state == UP:
                probes.live = True  # from its first readiness on
        else:
            probes.passes_in_a_row = 0
            probes.fails_in_a_row += 1
            if backend.state == UP and probes.fails_in_a_row >= self.fall:
                self.cluster.set_state(backend, DOWN, f"health check: {detail}")

    def record_liveness(self, backend: Backend, passed: bool, detail: str) -> None:
        probes = self._probes_of(backend)
        probes.liveness_fails = 0 if passed else probes.liveness_fails + 1
        if not passed:
            log.warning("instance %s: liveness check failed: %s", backend.name, detail)

    def _check(self, backend: Backend) -> tuple[bool, str]:
        outcome = self.probe(backend)
        if self._probes_of(backend).live:
            self.record_liveness(backend, *self.probe(backend, self.liveness_request))
        return outcome

    # -- what the supervisor tells and asks -----------------------------------

    def spawned(self, backend: Backend) -> None:
        """``backend`` is a process just (re)started: counts start over, and
        its liveness is probed once it is ready."""
        self._probes[backend] = Probes()
        self._spawned.add(backend)

    def forget(self, backend: Backend) -> None:
        """``backend``'s process crashed or is being stopped: no more
        liveness probes until it is spawned again."""
        self._probes[backend] = Probes()

    def hung(self, backend: Backend) -> bool:
        """Whether its liveness failed ``fall`` times in a row."""
        probes = self._probes.get(backend)
        return probes is not None and probes.liveness_fails >= self.fall

    def last_check(self, backend: Backend) -> tuple[float, bool, str] | None:
        """(wall time, passed, what was seen) of its last readiness probe."""
        probes = self._probes.get(backend)
        return probes.last if probes is not None else None

    def check_all(self) -> None:
        """Probe every backend once, concurrently, and record the outcomes."""
        backends = list(self.cluster.backends)
        outcomes = self._executor.map(self._check, backends)
        for backend, (passed, detail) in zip(backends, outcomes, strict=True):
            self.record(backend, passed, detail)
        members = set(self.cluster.backends)  # now: some may have come since
        for gone in [b for b in self._pools if b not in members]:
            self._pools.pop(gone).clear()
        for gone in [b for b in self._probes if b not in members]:
            del self._probes[gone]
            self._spawned.discard(gone)

    def run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.check_all()
            except Exception:  # never let the checker die
                log.exception("health checks failed")
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.run, name="pyramid_lb-health", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 1)
        self._executor.shutdown(wait=False, cancel_futures=True)
        for pool in self._pools.values():
            pool.clear()


def _probe_request(path: str, host: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
        "User-Agent: pyramid_lb-health-check\r\n"
        "Accept: application/health+json, */*\r\n\r\n"
    ).encode()
