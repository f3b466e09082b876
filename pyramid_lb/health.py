"""Liveness and readiness: app-defined checks, time-boxed and cached, and draining.

Checks run in threads of their own so a hung check can only ever cost a
probe its timeout; a check that is still running is not started again, so
a hung database cannot pile up threads either.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

from pyramid.config import Configurator
from pyramid.events import ApplicationCreated
from pyramid.exceptions import ConfigurationError
from pyramid.registry import Registry
from pyramid.response import Response
from zope.interface import Interface

from pyramid_lb.process import INSTANCE_ENV, handles_sigterm, outside_the_handler
from pyramid_lb.settings import Setting, addresses, optional, seconds, text, url_path

log = logging.getLogger(__name__)

HEALTH_SETTINGS = (
    Setting("health_path", url_path, "/healthz", "Path of the liveness endpoint."),
    Setting("ready_path", url_path, "/readyz", "Path of the readiness endpoint."),
    Setting(
        "check_timeout",
        seconds(allow_zero=False),
        "1",
        "Default time a health check may take before it counts as failed.",
    ),
    Setting(
        "check_cache",
        seconds(),
        "1",
        "How long a check's result is reused, so frequent probes do not multiply "
        "the load on what it checks (0: run on every probe).",
    ),
    Setting(
        "health_details_allow",
        addresses,
        "127.0.0.1 ::1",
        "Clients shown check output (error texts); others see only statuses.",
    ),
    Setting(
        "drain_file",
        optional(text),
        None,
        "While this file exists the instance drains (readiness fails).",
    ),
    Setting(
        "drain_on_sigterm",
        optional(seconds(allow_zero=False)),
        None,
        "On SIGTERM, drain for this many seconds while still serving, then stop "
        "the server. Unset: SIGTERM is left alone.",
    ),
)

LIVENESS = "liveness"
READINESS = "readiness"
PASS, WARN, FAIL = "pass", "warn", "fail"
MEDIA_TYPE = "application/health+json"


class IHealth(Interface):
    """Marker under which the instance's :class:`Health` is registered."""


def instance_id() -> str:
    """This instance's id: ``$PYRAMID_LB_INSTANCE``, else ``host:pid``."""
    return os.environ.get(INSTANCE_ENV) or (f"{socket.gethostname()}:{os.getpid()}")


def _timestamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


class CheckResult(NamedTuple):
    """One run of a check: its status, what it said, when, and how long."""

    status: str
    output: Any
    time: str
    duration: float


class _Run:
    """A run of a check that may still be going."""

    __slots__ = ("started", "done", "result")

    def __init__(self, started: float):
        self.started = started
        self.done = threading.Event()
        self.result: CheckResult | None = None


class HealthCheck:
    """A registered check with its options, last result and current run.

    ``func()`` takes no arguments. Returning None or True is a pass, and any
    other value is a pass with that value as its output; returning False or
    raising is a failure. A failing non-critical check reports ``warn``.
    """

    def __init__(
        self,
        name: str,
        func: Callable[[], Any],
        kind: str = READINESS,
        timeout: float = 1.0,
        critical: bool = True,
        cache: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name = name
        self.func = func
        self.kind = kind
        self.timeout = timeout
        self.critical = critical
        self.cache = cache
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: CheckResult | None = None
        self._cached_at = 0.0
        self._run: _Run | None = None

    def begin(self) -> CheckResult | _Run:
        """A fresh cached result, or the run under way (started if need be)."""
        now = self._clock()
        with self._lock:
            if self._cached is not None and now - self._cached_at < self.cache:
                return self._cached
            run = self._run
            if run is None:
                run = self._run = _Run(now)
                threading.Thread(
                    target=self._execute,
                    args=(run,),
                    name=f"pyramid_lb check {self.name}",
                    daemon=True,
                ).start()
        return run

    def finish(self, pending: CheckResult | _Run) -> CheckResult:
        """Wait for ``pending`` until the check's deadline, never longer."""
        if isinstance(pending, CheckResult):
            return pending
        remaining = pending.started + self.timeout - self._clock()
        if pending.done.wait(max(remaining, 0.0)):
            return pending.result
        return CheckResult(
            FAIL if self.critical else WARN,
            f"no answer within {self.timeout:g}s",
            _timestamp(time.time()),
            self._clock() - pending.started,
        )

    def _execute(self, run: _Run) -> None:
        wall, start = time.time(), time.perf_counter()
        status, output = FAIL, "check did not complete"
        try:
            outcome = self.func()
            if outcome is False:
                output = "check returned False"
            else:
                status = PASS
                output = None if outcome is None or outcome is True else outcome
        except Exception as exc:
            output = f"{type(exc).__name__}: {exc}"
        finally:
            if status == FAIL and not self.critical:
                status = WARN
            result = CheckResult(
                status, output, _timestamp(wall), time.perf_counter() - start
            )
            with self._lock:
                self._cached, self._cached_at = result, self._clock()
                self._run = None
            run.result = result
            run.done.set()


class Report(NamedTuple):
    """The outcome of a liveness or readiness probe."""

    status: str
    checks: dict[str, CheckResult]
    notes: list[str]


class Health:
    """An instance's health: its checks, whether it is configured, draining."""

    def __init__(
        self,
        instance: str | None = None,
        cache: float = 1.0,
        timeout: float = 1.0,
        drain_file: str | None = None,
    ):
        self.instance = instance or instance_id()
        self.cache = cache
        self.timeout = timeout
        self.drain_file = drain_file
        self.checks: dict[str, HealthCheck] = {}
        #: Set when the Pyramid app has been created (ApplicationCreated).
        self.configured = False
        self._drain_reason: str | None = None

    def add_check(
        self,
        name: str,
        func: Callable[[], Any],
        kind: str = READINESS,
        timeout: float | None = None,
        critical: bool = True,
    ) -> HealthCheck:
        check = HealthCheck(
            name,
            func,
            kind=kind,
            timeout=self.timeout if timeout is None else timeout,
            critical=critical,
            cache=self.cache,
        )
        self.checks[name] = check
        return check

    # -- draining -------------------------------------------------------------

    def drain(self, reason: str = "draining") -> None:
        """Fail readiness from now on, while every other request is served."""
        if self._drain_reason is None:
            log.info("instance %s drains: %s", self.instance, reason)
        self._drain_reason = reason

    def resume(self) -> None:
        """Undo :meth:`drain` (a drain file still drains while it exists)."""
        if self._drain_reason is not None:
            log.info("instance %s stops draining", self.instance)
        self._drain_reason = None

    @property
    def drain_reason(self) -> str | None:
        """Why the instance drains, or None when it does not."""
        if self._drain_reason is not None:
            return self._drain_reason
        if self.drain_file and os.path.exists(self.drain_file):
            return f"drain file {self.drain_file} exists"
        return None

    @property
    def draining(self) -> bool:
        return self.drain_reason is not None

    # -- probing --------------------------------------------------------------

    def report(self, kind: str) -> Report:
        """Run (or reuse) every check of ``kind`` and sum them up."""
        checks = [check for check in self.checks.values() if check.kind == kind]
        # Start them all before waiting on any: a probe costs the slowest
        # check's time, not the sum.
        pending = [(check, check.begin()) for check in checks]
        results = {check.name: check.finish(run) for check, run in pending}
        statuses = {result.status for result in results.values()}
        notes = []
        if kind == READINESS:
            if not self.configured:
                notes.append("the application is not configured yet")
            reason = self.drain_reason
            if reason:
                notes.append(reason)
        if FAIL in statuses or notes:
            status = FAIL
        elif WARN in statuses:
            status = WARN
        else:
            status = PASS
        return Report(status, results, notes)

    def body(self, report: Report, details: bool) -> dict[str, Any]:
        """``report`` in the application/health+json format.

        Outputs and notes can carry error texts and are left out unless
        ``details`` (the client is on the allow-list).
        """
        checks = {}
        for name, result in report.checks.items():
            entry = {
                "status": result.status,
                "time": result.time,
                "observedValue": round(result.duration * 1000, 3),
                "observedUnit": "ms",
            }
            if details and result.output is not None:
                entry["output"] = result.output
            checks[name] = [entry]
        body = {"status": report.status, "instance": self.instance, "checks": checks}
        if details and report.notes:
            body["notes"] = report.notes
            if report.status == FAIL:
                body["output"] = "; ".join(report.notes)
        return body


def get_health(registry_or_request: Registry | Any) -> Health:
    """The :class:`Health` of an app, from its registry or a request."""
    registry = getattr(registry_or_request, "registry", registry_or_request)
    return registry.getUtility(IHealth)


def health_tween_factory(handler, registry: Registry):
    """Answer the liveness and readiness paths before routing happens."""
    settings = registry.settings
    health = get_health(registry)
    paths = {
        settings["pyramid_lb.health_path"]: LIVENESS,
        settings["pyramid_lb.ready_path"]: READINESS,
    }
    details_allow = settings["pyramid_lb.health_details_allow"]

    def health_tween(request):
        kind = paths.get(request.path_info)
        if kind is None:
            return handler(request)
        return health_response(
            health, kind, request.method, request.remote_addr in details_allow
        )

    return health_tween


def health_response(health: Health, kind: str, method: str, details: bool) -> Response:
    if method not in ("GET", "HEAD"):
        response = Response("Method Not Allowed\n", status=405)
        response.content_type = "text/plain"
        response.allow = ("GET", "HEAD")
        return response
    report = health.report(kind)
    payload = json.dumps(health.body(report, details), default=str).encode()
    response = Response(
        body=payload,
        status=503 if report.status == FAIL else 200,
        content_type=MEDIA_TYPE,
        charset=None,
    )
    response.cache_control = "no-store"
    return response


def add_health_check(
    config: Configurator,
    name: str,
    check: Callable[[], Any] | str,
    kind: str = READINESS,
    timeout: float | None = None,
    critical: bool = True,
) -> None:
    """Register a health check (the ``config.add_health_check`` directive).

    ``check`` is a callable taking no arguments (or its dotted name); see
    :class:`HealthCheck` for what it returns. ``kind`` is ``"readiness"``
    (the default) or ``"liveness"``; ``timeout`` defaults to
    ``pyramid_lb.check_timeout``; a failing check that is not ``critical``
    turns the status to ``warn`` and the probe still answers 200.

    Arguments are checked as strictly as settings: ``critical`` is True or
    False (``"no"`` would otherwise be a true value), ``timeout`` a number.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(
            f"add_health_check: name = {name!r} is not valid: expected a "
            "non-empty string (it names the check in the health answers)"
        )
    if not isinstance(critical, bool):
        raise ConfigurationError(
            f"add_health_check({name!r}): critical = {critical!r} is not valid: "
            "expected True or False"
        )
    if kind not in (READINESS, LIVENESS):
        raise ConfigurationError(
            f"add_health_check({name!r}): kind = {kind!r} is not valid: "
            f"expected {READINESS!r} or {LIVENESS!r}"
        )
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not timeout > 0
    ):
        raise ConfigurationError(
            f"add_health_check({name!r}): timeout = {timeout!r} is not valid: "
            "expected a number of seconds greater than 0"
        )
    func = config.maybe_dotted(check)
    if not callable(func):
        raise ConfigurationError(
            f"add_health_check({name!r}): check = {check!r} is not callable"
        )

    def register():
        get_health(config.registry).add_check(name, func, kind, timeout, critical)

    config.action(("pyramid_lb.health_check", name), register)


def drain_on_sigterm(health: Health, grace: float) -> None:
    """On SIGTERM, drain for ``grace`` seconds, then stop the server cleanly.

    The server is stopped by raising SystemExit in the main thread, which
    waitress turns into a clean shutdown (in-flight requests finish). A
    second SIGTERM during the grace period stops at once.
    """
    stopping = threading.Event()

    @handles_sigterm
    def on_sigterm(signum, frame):
        if stopping.is_set():
            raise SystemExit(0)
        stopping.set()
        outside_the_handler(health.drain, f"SIGTERM received; stopping in {grace:g}s")
        timer = threading.Timer(grace, os.kill, (os.getpid(), signal.SIGTERM))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_sigterm)


def includeme(config: Configurator) -> None:
    """Register the health endpoints, the directive and the drain triggers."""
    settings = config.get_settings()
    health = Health(
        cache=settings["pyramid_lb.check_cache"],
        timeout=settings["pyramid_lb.check_timeout"],
        drain_file=settings["pyramid_lb.drain_file"],
    )
    config.registry.registerUtility(health, IHealth)
    config.add_directive("add_health_check", add_health_check, action_wrap=False)
    config.add_request_method(
        lambda request: health.instance, "lb_instance", property=True
    )
    config.add_tween(
        "pyramid_lb.health.health_tween_factory",
        under="pyramid_lb.forwarded.forwarded_tween_factory",
    )
    grace = settings["pyramid_lb.drain_on_sigterm"]

    def on_application_created(event):
        health.configured = True
        if grace is not None:
            try:
                drain_on_sigterm(health, grace)
            except ValueError as exc:  # signal handlers live in the main thread
                raise ConfigurationError(
                    f"pyramid_lb.drain_on_sigterm = {grace:g} needs the app to be "
                    f"created in the main thread: {exc}"
                ) from None

    config.add_subscriber(on_application_created, ApplicationCreated)


__all__ = [
    "CheckResult",
    "Health",
    "HealthCheck",
    "LIVENESS",
    "READINESS",
    "add_health_check",
    "get_health",
]
