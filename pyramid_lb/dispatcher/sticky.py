"""Session affinity in the dispatcher: the affinity cookie picks the instance.

``cookie`` mode honours the cookie the add-on sets in the app; ``insert``
mode sets and reads it here, for apps without the add-on, and keeps it from
the instances (HAProxy's ``cookie ... insert indirect nocache``). Either
way a pinned client goes to its instance while that one is up, even while
it drains (no new clients, but its own stay until it is gone); otherwise
it is balanced as usual, and in ``insert`` mode gets a new cookie.
"""

from __future__ import annotations

from pyramid_lb.affinity_cookie import (
    cookie_value,
    set_cookie,
    sign,
    verify,
    without_cookie,
)
from pyramid_lb.dispatcher.cluster import UP, Backend, Cluster


class Sticky:
    """Reads (and in ``insert`` mode writes) the affinity cookie."""

    def __init__(
        self,
        cluster: Cluster,
        affinity_cookie: str,
        affinity_secret: str,
        insert: bool = False,
    ):
        self.cluster = cluster
        self.name = affinity_cookie
        self.secret = affinity_secret
        self.insert = insert
        self._signed: dict[str, str] = {}  # instance id -> cookie value

    def pinned(self, environ) -> tuple[Backend | None, str | None]:
        """The backend the request is pinned to if it can take it, and the pin.

        In ``insert`` mode the cookie is also taken out of the request.
        """
        header = environ.get("HTTP_COOKIE")
        value = cookie_value(header, self.name)
        if value is None:
            return None, None
        if self.insert:
            rest = without_cookie(header, self.name)
            if rest:
                environ["HTTP_COOKIE"] = rest
            else:
                del environ["HTTP_COOKIE"]
        instance = verify(value, self.secret)
        if instance is None:
            return None, None
        backend = self.cluster.get(instance)
        if backend is None or backend.state != UP or self.cluster.ejected(backend):
            return None, instance
        return backend, instance

    def cookie_for(self, environ, backend: Backend, pin: str | None) -> str | None:
        """The Set-Cookie value that pins the client to ``backend``, if needed."""
        if not self.insert or pin == backend.name:
            return None
        value = self._signed.get(backend.name)
        if value is None:
            value = self._signed[backend.name] = sign(backend.name, self.secret)
        return set_cookie(
            self.name, value, secure=environ.get("wsgi.url_scheme") == "https"
        )
