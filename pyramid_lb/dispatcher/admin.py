"""The dispatcher's own endpoints under /_lb/: stats and admin actions.

Answered only to clients in ``admin_allow`` (loopback by default) and never
forwarded to an instance. Actions are POSTs that must carry an
``X-Requested-With`` header: a browser sends no custom header across sites
without asking first, so another site's page cannot trigger them.
"""

from __future__ import annotations

import json
import logging
import threading
from urllib.parse import parse_qs

from pyramid_lb.dispatcher.cluster import DRAINING, FAILED, UP

log = logging.getLogger("pyramid_lb.dispatcher")

PREFIX = "/_lb"


def _json(start_response, status: str, payload) -> list[bytes]:
    body = json.dumps(payload, indent=1).encode()
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [body]


def _problem(start_response, status: str, message: str) -> list[bytes]:
    return _json(start_response, status, {"error": message})


class Admin:
    """The WSGI app of ``/_lb/`` for one dispatcher."""

    def __init__(self, dispatcher, allow):
        self.dispatcher = dispatcher
        self.allow = allow

    def __call__(self, environ, start_response):
        if environ.get("REMOTE_ADDR") not in self.allow:
            return _problem(start_response, "403 Forbidden", "not an allowed client")
        path = environ.get("PATH_INFO", "")[len(PREFIX) :]
        method = environ["REQUEST_METHOD"]
        if path == "/stats.json":
            if method not in ("GET", "HEAD"):
                return _problem(start_response, "405 Method Not Allowed", "use GET")
            return _json(start_response, "200 OK", self.stats())
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
        return action(start_response)

    def _action(self, path: str, environ):
        """The action at ``path``, ready to run, or None."""
        query = parse_qs(environ.get("QUERY_STRING", ""))
        params = {key: values[-1] for key, values in query.items()}
        if path == "/reload":
            return self.reload
        if path == "/scale":
            return lambda start: self.scale(start, params.get("instances", ""))
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "instances":
            return lambda start: self.instance_action(start, parts[1], parts[2])
        return None

    # -- reading ---------------------------------------------------------------

    def stats(self) -> dict:
        dispatcher = self.dispatcher
        processes = {}
        if dispatcher.supervisor is not None:
            processes = {p["id"]: p for p in dispatcher.supervisor.describe()}
        instances = []
        for backend in list(dispatcher.cluster.backends):
            process = processes.get(backend.name, {})
            state = backend.state
            if backend.held and state == UP:
                state = DRAINING
            if process.get("failed"):
                state = FAILED
            check = backend.last_check
            instances.append(
                {
                    "id": backend.name,
                    "url": backend.url,
                    "pid": process.get("pid"),
                    "state": state,
                    "ejected": backend.ejected,
                    "weight": backend.weight,
                    "in_flight": backend.in_flight,
                    "requests": backend.requests,
                    "errors": backend.errors,
                    "retries": backend.retries,
                    "restarts": process.get("restarts", 0),
                    "last_check": check
                    and {"time": check[0], "passed": check[1], "detail": check[2]},
                }
            )
        return {
            "strategy": dispatcher.settings["strategy"],
            "panic": dispatcher.cluster.panic,
            "instances": instances,
        }

    # -- acting ----------------------------------------------------------------

    def reload(self, start_response):
        supervisor = self.dispatcher.supervisor
        if supervisor is None:
            return _problem(
                start_response, "409 Conflict", "this dispatcher spawns no instances"
            )
        threading.Thread(target=supervisor.rolling_restart, daemon=True).start()
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
        except ValueError as exc:
            return _problem(start_response, "409 Conflict", str(exc))
        return _json(
            start_response, "200 OK", {"instances": int(count), "change": change}
        )

    def instance_action(self, start_response, name: str, action: str):
        cluster = self.dispatcher.cluster
        backend = cluster.get(name)
        if backend is None:
            return _problem(start_response, "404 Not Found", f"no instance {name!r}")
        if action == "drain":
            cluster.hold(backend)
        elif action == "enable":
            cluster.hold(backend, False)
        else:
            return _problem(start_response, "404 Not Found", f"no action {action!r}")
        log.info("instance %s: %s (admin)", name, action)
        return _json(start_response, "200 OK", {"id": name, "action": action})
