"""The dispatcher's own endpoints under /_lb/: dashboard, stats, metrics, actions.

Answered only to clients in ``admin_allow`` (loopback by default) and never
forwarded to an instance. Actions are POSTs that must carry an
``X-Requested-With`` header: a browser sends no custom header across sites
without asking first, so another site's page cannot trigger them.

That alone does not stop DNS rebinding: a page of ``evil.example:8080``
whose name then resolves to 127.0.0.1 is, for the browser, the same origin
as the dispatcher, and may send any header. So an action whose ``Origin``
(or, without one, ``Host``) names a host other than the dispatcher's own is
refused: localhost, an IP address, ``server_name`` on the port it listens
on, or a name of ``admin_hosts``. An IP address cannot be rebound: a
browser that sends one reached that very address.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from importlib.resources import files
from urllib.parse import parse_qs, urlsplit

from pyramid_lb.addresses import is_ip, parse_host
from pyramid_lb.dispatcher.cluster import DRAINING, FAILED, UP
from pyramid_lb.dispatcher.operations import Busy
from pyramid_lb.dispatcher.queueing import WAIT_BUCKETS
from pyramid_lb.dispatcher.stats import BUCKETS, CLASSES, KEEP
from pyramid_lb.settings import SettingsError

log = logging.getLogger("pyramid_lb.dispatcher")

PREFIX = "/_lb"


def _reply(start_response, status: str, body: bytes, content_type: str):
    start_response(
        status,
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [body]


def _json(start_response, status: str, payload) -> list[bytes]:
    body = json.dumps(payload, indent=1).encode()
    return _reply(start_response, status, body, "application/json")


def _problem(start_response, status: str, message: str) -> list[bytes]:
    return _json(start_response, status, {"error": message})


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _busy(start_response, exc: Busy) -> list[bytes]:
    return _json(
        start_response, "409 Conflict", {"error": str(exc), "running": exc.running}
    )


#: Names of this machine that no one else's DNS can answer for (RFC 6761).
LOCAL_NAMES = frozenset(("localhost",))


def host_port(netloc: str, scheme: str) -> tuple[str, int] | None:
    """``(lowered host, port)`` of ``host[:port]``, the scheme's port if none
    is given; None when it is not one. IPv6 addresses keep their brackets."""
    parsed = parse_host(netloc.strip().lower())
    if parsed is None:
        return None
    host, port = parsed
    host = host.rstrip(".")  # "localhost." is localhost
    if not host:
        return None
    return host, int(port) if port else (443 if scheme == "https" else 80)


def _is_ip(host: str) -> bool:
    return is_ip(host[1:-1] if host.startswith("[") else host)


def parse_admin_hosts(names: Iterable[str]) -> tuple[frozenset, frozenset]:
    """``admin_hosts`` as (names on any port, (name, port) pairs)."""
    any_port, with_port = set(), set()
    for name in names:
        where = host_port(name, "http")
        if where is None or "/" in name:
            raise SettingsError(
                f"[app:dispatcher] admin_hosts: {name!r} is not a host name or "
                "name:port (e.g. lb.example.com or lb.example.com:8080)"
            )
        if ":" in name.rpartition("]")[2]:
            with_port.add(where)
        else:
            any_port.add(where[0])
    return frozenset(any_port), frozenset(with_port)


class Admin:
    """The WSGI app of ``/_lb/`` for one dispatcher."""

    def __init__(self, dispatcher, allow, hosts: Iterable[str] = ()):
        self.dispatcher = dispatcher
        self.allow = allow
        self.hosts, self.host_ports = parse_admin_hosts(hosts)
        self._dashboard: bytes | None = None
        self._registry = None

    def foreign(self, environ) -> str | None:
        """Why an action's Origin (or Host) is not this dispatcher, or None."""
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None:
            parts = urlsplit(origin)
            where = (
                host_port(parts.netloc, parts.scheme)
                if parts.scheme in ("http", "https")
                else None  # "null": a sandboxed page, a file...
            )
            said = f"Origin {origin!r}"
        else:
            host = environ.get("HTTP_HOST", "")
            where = host_port(host, environ.get("wsgi.url_scheme", "http"))
            said = f"Host {host!r}"
        if where is not None:
            host, port = where
            if host in self.hosts or where in self.host_ports:
                return None
            own_name = host in LOCAL_NAMES or host == environ.get("SERVER_NAME")
            if (own_name or _is_ip(host)) and str(port) == environ.get("SERVER_PORT"):
                return None
        return (
            f"admin actions from {said} are refused: it is not this dispatcher's "
            "address (a page of another site, its name rebound to this one?); "
            "if it is one of its names, add it to admin_hosts"
        )

    def __call__(self, environ, start_response):
        if environ.get("REMOTE_ADDR") not in self.allow:
            return _problem(start_response, "403 Forbidden", "not an allowed client")
        path = environ.get("PATH_INFO", "")[len(PREFIX) :]
        method = environ["REQUEST_METHOD"]
        page = {
            "/": self.dashboard,
            "/stats.json": lambda start: _json(start, "200 OK", self.stats()),
            "/metrics": self.metrics,
        }.get(path)
        if page is not None:
            if method not in ("GET", "HEAD"):
                return _problem(start_response, "405 Method Not Allowed", "use GET")
            return page(start_response)
        action = self._action(path, environ)
        if action is None:
            return _problem(start_response, "404 Not Found", f"nothing at {path}")
        if method != "POST":
            return _problem(start_response, "405 Method Not Allowed", "use POST")
        if not environ.get("HTTP_X_REQUESTED_WITH"):
            return _problem(
                start_response,
                "403 Forbidden",
                "admin actions need an X-Requested-With header",
            )
        refusal = self.foreign(environ)
        if refusal:
            log.warning(
                "refused %s %s from %s: %s",
                method,
                environ.get("PATH_INFO", ""),
                environ.get("REMOTE_ADDR"),
                refusal,
            )
            return _problem(start_response, "403 Forbidden", refusal)
        return action(start_response)

    def _action(self, path: str, environ):
        """The action at ``path``, ready to run, or None."""
        query = parse_qs(environ.get("QUERY_STRING", ""))
        params = {key: values[-1] for key, values in query.items()}
        if path == "/reload":
            return self.reload
        if path == "/scale":
            return lambda start: self.scale(start, params.get("instances", ""))
        if path == "/cache/purge":
            return lambda start: self.purge(start, params.get("path"))
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "instances":
            return lambda start: self.instance_action(start, parts[1], parts[2])
        return None

    # -- reading ---------------------------------------------------------------

    def stats(self) -> dict:
        """Everything the dashboard shows, for machines too."""
        dispatcher = self.dispatcher
        supervisor = dispatcher.supervisor
        processes = {}
        if supervisor is not None:
            processes = {p["id"]: p for p in supervisor.describe()}
        instances = []
        backends = list(dispatcher.cluster.backends)
        for backend in backends:
            process = processes.get(backend.name, {})
            state = backend.state
            if backend.held and state == UP:
                state = DRAINING
            if process.get("failed"):
                state = FAILED
            check = dispatcher.checker.last_check(backend)
            p50, p99 = backend.tally.percentiles(0.5, 0.99)
            instances.append(
                {
                    "id": backend.name,
                    "url": backend.url,
                    "pid": process.get("pid"),
                    "state": state,
                    "ejected": dispatcher.cluster.ejected(backend),
                    "held": backend.held,
                    "weight": backend.weight,
                    "in_flight": backend.in_flight,
                    "max_in_flight": backend.max_in_flight,
                    "slow_start_share": round(dispatcher.cluster.share(backend), 3),
                    "requests": backend.requests,
                    "errors": backend.errors,
                    "retries": backend.retries,
                    "restarts": process.get("restarts", 0),
                    "ejections": backend.ejections,
                    "p50_ms": _ms(p50),
                    "p99_ms": _ms(p99),
                    "statuses": dict(zip(CLASSES, backend.tally.classes, strict=True)),
                    "last_check": check
                    and {"time": check[0], "passed": check[1], "detail": check[2]},
                }
            )
        proxy = dispatcher.proxy
        operation = dispatcher.operations.running
        # Per second, what the Requests and Unrouted totals count: exchanges
        # with the instances listed, and answers the dispatcher gave itself.
        now = int(time.monotonic())
        routed = [0] * KEEP
        for backend in backends:
            for index, count in enumerate(backend.tally.history(now)):
                routed[index] += count
        unrouted = proxy.unrouted.history(now)
        offset = round(time.time() - time.monotonic())  # the chart wants wall time
        history = [
            (now - KEEP + index + offset, routed[index], unrouted[index])
            for index in range(KEEP)
        ]
        queue = dispatcher.cluster.queue
        recycled = getattr(supervisor, "recycled", None) or {}
        return {
            "time": time.time(),
            "strategy": dispatcher.config.strategy,
            "sticky": dispatcher.config.sticky,
            "panic": dispatcher.cluster.panic,
            "supervised": supervisor is not None,
            #: The life-cycle operation under way (a reload, a scale...).
            "operation": operation,
            "rolling": operation is not None,
            "totals": {
                "instances": len(instances),
                "up": sum(1 for i in instances if i["state"] == UP),
                "in_flight": sum(i["in_flight"] for i in instances),
                "requests": sum(i["requests"] for i in instances),
                "errors": sum(i["errors"] for i in instances),
                "retries": sum(i["retries"] for i in instances),
                "unrouted": proxy.unrouted.count,
                "rate": history[-1][1] if history else 0,
            },
            "rate": history,
            "queue": {
                "depth": queue.depth,
                "size": queue.size,
                "timeout": queue.timeout,
                "served": queue.served,
                "timeouts": queue.timeouts,
                "rejected": queue.rejected,
                "wait_ms_total": round(queue.waited * 1000, 1),
                # waits by how long they lasted: [upper bound in s, count]
                "waits": [
                    [bound, count]
                    for bound, count in zip(
                        (*WAIT_BUCKETS, None), queue.buckets, strict=True
                    )
                ],
            },
            "recycled": dict(recycled),
            # None with cache = off
            "cache": proxy.cache.stats() if proxy.cache is not None else None,
            "instances": instances,
        }

    def dashboard(self, start_response):
        if self._dashboard is None:
            page = files("pyramid_lb.dispatcher").joinpath("dashboard.html")
            self._dashboard = page.read_bytes()
        return _reply(
            start_response, "200 OK", self._dashboard, "text/html; charset=utf-8"
        )

    def metrics(self, start_response):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if self._registry is None:
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(Metrics(self.dispatcher))
        body = generate_latest(self._registry)
        return _reply(start_response, "200 OK", body, CONTENT_TYPE_LATEST)

    # -- acting ----------------------------------------------------------------

    def reload(self, start_response):
        supervisor = self.dispatcher.supervisor
        if supervisor is None:
            return _problem(
                start_response, "409 Conflict", "this dispatcher spawns no instances"
            )
        try:
            supervisor.rolling_restart(background=True, why="POST /_lb/reload")
        except Busy as exc:
            return _busy(start_response, exc)
        return _json(start_response, "202 Accepted", {"rolling_restart": "started"})

    def scale(self, start_response, count: str):
        supervisor = self.dispatcher.supervisor
        if supervisor is None:
            return _problem(
                start_response, "409 Conflict", "this dispatcher spawns no instances"
            )
        if not count.isdigit():
            return _problem(
                start_response,
                "400 Bad Request",
                f"instances = {count!r}: expected a number of instances",
            )
        try:
            change = supervisor.scale(int(count))
        except Busy as exc:
            return _busy(start_response, exc)
        except ValueError as exc:
            return _problem(start_response, "409 Conflict", str(exc))
        return _json(
            start_response, "200 OK", {"instances": int(count), "change": change}
        )

    def purge(self, start_response, path: str | None):
        """Drop every entry of the cache, or those of one request path."""
        cache = self.dispatcher.proxy.cache
        if cache is None:
            return _problem(
                start_response, "409 Conflict", "there is no cache (cache = off)"
            )
        if path is not None and not path.startswith("/"):
            return _problem(
                start_response,
                "400 Bad Request",
                f"path = {path!r}: expected a request path such as /news",
            )
        purged = cache.purge(path)
        log.info("cache purged of %d entries (%s, admin)", purged, path or "all")
        return _json(start_response, "200 OK", {"purged": purged, "path": path})

    def instance_action(self, start_response, name: str, action: str):
        cluster = self.dispatcher.cluster
        backend = cluster.get(name)
        if backend is None:
            return _problem(start_response, "404 Not Found", f"no instance {name!r}")
        if action not in ("drain", "enable", "restart"):
            return _problem(start_response, "404 Not Found", f"no action {action!r}")
        supervisor = self.dispatcher.supervisor
        try:
            if action == "restart":
                if supervisor is None or not any(
                    i.id == name for i in supervisor.spawned
                ):
                    return _problem(
                        start_response,
                        "409 Conflict",
                        f"{name} is not an instance this dispatcher spawned",
                    )
                supervisor.restart(name, background=True)
            else:
                held = action == "drain"
                self.dispatcher.operations.run(
                    f"{action} of {name} (admin)",
                    lambda: cluster.hold(backend, held) or True,
                )
        except Busy as exc:
            return _busy(start_response, exc)
        except LookupError:  # gone since it was looked up
            return _problem(start_response, "404 Not Found", f"no instance {name!r}")
        return _json(start_response, "200 OK", {"id": name, "action": action})


class Metrics:
    """A prometheus_client collector reading the dispatcher's counts when scraped."""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        dispatcher = self.dispatcher
        restarts = {}
        if dispatcher.supervisor is not None:
            restarts = {
                p["id"]: p["restarts"] for p in dispatcher.supervisor.describe()
            }
        requests = CounterMetricFamily(
            "pyramid_lb_requests",
            "Exchanges with instances, by status class (failed: no answer)",
            labels=["instance", "code_class"],
        )
        latency = HistogramMetricFamily(
            "pyramid_lb_request_duration_seconds",
            "Time from sending a request to an instance to its whole answer",
            labels=["instance"],
        )
        in_flight = GaugeMetricFamily(
            "pyramid_lb_in_flight", "Requests in flight", labels=["instance"]
        )
        up = GaugeMetricFamily(
            "pyramid_lb_instance_up",
            "1 when the instance takes new requests, else 0",
            labels=["instance"],
        )
        retries = CounterMetricFamily(
            "pyramid_lb_retries",
            "Requests retried on the instance",
            labels=["instance"],
        )
        ejections = CounterMetricFamily(
            "pyramid_lb_ejections",
            "Times the instance was taken out after failures in a row",
            labels=["instance"],
        )
        restarted = CounterMetricFamily(
            "pyramid_lb_restarts", "Restarts of a spawned instance", labels=["instance"]
        )
        cap = GaugeMetricFamily(
            "pyramid_lb_max_in_flight",
            "The instance's cap on requests in flight (absent: none)",
            labels=["instance"],
        )
        share = GaugeMetricFamily(
            "pyramid_lb_slow_start_share",
            "Share of its turns the instance gets (below 1 in its slow start)",
            labels=["instance"],
        )
        candidates = set(dispatcher.cluster.candidates())
        tallies = [(b.name, b.tally) for b in list(dispatcher.cluster.backends)]
        tallies.append(("none", dispatcher.proxy.unrouted))
        for name, tally in tallies:
            for code_class, count in zip(CLASSES, tally.classes, strict=True):
                requests.add_metric([name, code_class], count)
            latency.add_metric(
                [name], _cumulative(BUCKETS, tally.buckets), tally.seconds
            )
        for backend in list(dispatcher.cluster.backends):
            name = backend.name
            in_flight.add_metric([name], backend.in_flight)
            up.add_metric([name], 1 if backend in candidates else 0)
            retries.add_metric([name], backend.retries)
            ejections.add_metric([name], backend.ejections)
            if name in restarts:
                restarted.add_metric([name], restarts[name])
            if backend.max_in_flight is not None:
                cap.add_metric([name], backend.max_in_flight)
            share.add_metric([name], dispatcher.cluster.share(backend))
        yield from (requests, latency, in_flight, up, retries, ejections, restarted)
        yield from (cap, share, *self._queue(CounterMetricFamily, GaugeMetricFamily))
        yield from self._queue_wait(HistogramMetricFamily)
        yield from self._cache(CounterMetricFamily, GaugeMetricFamily)

    def _cache(self, counter, gauge):
        cache = self.dispatcher.proxy.cache
        if cache is None:
            return
        stats = cache.stats()
        answers = counter(
            "pyramid_lb_cache_answers",
            "GET and HEAD answers by what the cache did (X-Cache)",
            labels=["result"],
        )
        for result, key in (
            ("hit", "hits"),
            ("miss", "misses"),
            ("stale", "stale"),
            ("revalidated", "revalidated"),
        ):
            answers.add_metric([result], stats[key])
        yield answers
        yield counter(
            "pyramid_lb_cache_evictions",
            "Entries dropped to make room (cache_size)",
            stats["evicted"],
        )
        yield gauge("pyramid_lb_cache_bytes", "Bytes the cache holds", stats["bytes"])
        yield gauge(
            "pyramid_lb_cache_entries", "Answers the cache holds", stats["entries"]
        )

    def _queue(self, counter, gauge):
        queue = self.dispatcher.cluster.queue
        yield gauge(
            "pyramid_lb_queue_depth", "Requests waiting for an instance", queue.depth
        )
        yield counter(
            "pyramid_lb_queue_timeouts",
            "Requests that waited queue_timeout in vain (503)",
            queue.timeouts,
        )
        yield counter(
            "pyramid_lb_queue_rejected",
            "Requests that found the queue full (503)",
            queue.rejected,
        )
        recycles = counter(
            "pyramid_lb_recycles",
            "Instances replaced by max_requests or max_memory",
            labels=["reason"],
        )
        supervisor = self.dispatcher.supervisor
        for reason, count in (getattr(supervisor, "recycled", None) or {}).items():
            recycles.add_metric([reason], count)
        yield recycles

    def _queue_wait(self, histogram):
        queue = self.dispatcher.cluster.queue
        wait = histogram(
            "pyramid_lb_queue_wait_seconds", "Time requests spent in the queue"
        )
        wait.add_metric([], _cumulative(WAIT_BUCKETS, queue.buckets), queue.waited)
        yield wait


def _cumulative(bounds, counts) -> list[tuple[str, int]]:
    """Prometheus histogram buckets from per-bucket ``counts`` (one more than
    ``bounds``: the last is above them all)."""
    total, buckets = 0, []
    for bound, count in zip(bounds, counts, strict=False):
        total += count
        buckets.append((repr(float(bound)), total))
    buckets.append(("+Inf", total + counts[-1]))
    return buckets
