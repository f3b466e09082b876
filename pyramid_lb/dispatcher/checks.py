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
        path: str = "/readyz",
        interval: float = 1.0,
        timeout: float = 2.0,
        rise: int = 2,
        fall: int = 3,
        host: str = "localhost",
        liveness_path: str = "/healthz",
    ):
        self.cluster = cluster
        self.path = path
        self.interval = interval
        self.timeout = timeout
        self.rise = rise
        self.fall = fall
        self.request = _probe_request(path, host)
        self.liveness_request = _probe_request(liveness_path, host)
        self._pools: dict[Backend, Pool] = {}
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

    def record(self, backend: Backend, passed: bool, detail: str) -> None:
        """Apply a probe's outcome to the backend's state."""
        backend.last_check = (time.time(), passed, detail)
        if passed:
            backend.fails = 0
            backend.passes += 1
            if backend.state in (STARTING, DOWN) and backend.passes >= self.rise:
                self.cluster.set_state(backend, UP, f"health check: {detail}")
        else:
            backend.passes = 0
            backend.fails += 1
            if backend.state == UP and backend.fails >= self.fall:
                self.cluster.set_state(backend, DOWN, f"health check: {detail}")

    def probe_liveness(self, backend: Backend) -> None:
        passed, detail = self.probe(backend, self.liveness_request)
        backend.live_fails = 0 if passed else backend.live_fails + 1
        if not passed:
            log.warning("instance %s: liveness check failed: %s", backend.name, detail)

    def _check(self, backend: Backend) -> tuple[bool, str]:
        outcome = self.probe(backend)
        if backend.check_liveness:
            self.probe_liveness(backend)
        return outcome

    def check_all(self) -> None:
        """Probe every backend once, concurrently, and record the outcomes."""
        backends = list(self.cluster.backends)
        outcomes = self._executor.map(self._check, backends)
        for backend, (passed, detail) in zip(backends, outcomes, strict=True):
            self.record(backend, passed, detail)
        for gone in [b for b in self._pools if b not in backends]:
            self._pools.pop(gone).clear()

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
