"""Session affinity in the app: a signed cookie pins each client to this instance."""

from __future__ import annotations

from collections.abc import Callable

from pyramid.config import Configurator
from pyramid.registry import Registry
from pyramid.request import Request
from pyramid.response import Response
from pyramid.tweens import EXCVIEW

from pyramid_lb import affinity_cookie
from pyramid_lb.health import get_health
from pyramid_lb.settings import Setting, cookie_name, one_of, optional, text

AFFINITY_SETTINGS = (
    Setting(
        "affinity",
        one_of("session", "always", "off"),
        "off",
        "When the add-on pins a client to this instance with the affinity "
        "cookie: `session` (once the app's session holds data), `always`, or "
        "`off` (only `request.lb_pin()` does).",
    ),
    Setting(
        "affinity_cookie",
        cookie_name,
        "lb_affinity",
        "Name of the affinity cookie; the same as the dispatcher's.",
    ),
    Setting(
        "affinity_secret",
        optional(text),
        None,
        "Secret that signs the affinity cookie, the same as the dispatcher's "
        "`affinity_secret`. Needed for any pinning.",
    ),
)

MODE = "pyramid_lb.affinity"
COOKIE = "pyramid_lb.affinity_cookie"
SECRET = "pyramid_lb.affinity_secret"

# What the view asked for, on the request: True to pin, False to unpin.
_WISH = "_lb_affinity_wish"

Handler = Callable[[Request], Response]


class AffinityMoved:
    """Notified when a client pinned to ``previous`` arrives at ``current``.

    It comes before the view runs, so that the app can rebuild what the old
    instance held (an in-memory session, say); subscribe with
    ``config.add_subscriber(on_moved, AffinityMoved)``. It also comes when
    the balancer in front ignores the cookie: a configuration mistake. With
    ``pyramid_lb.affinity = off`` nothing re-pins the client on its own:
    call ``event.request.lb_pin()`` (or ``lb_unpin()``) in the subscriber,
    or the event comes again with every request that carries the old cookie.
    """

    def __init__(self, request: Request, previous: str, current: str):
        self.request = request
        self.previous = previous
        self.current = current


def _wish(request: Request, pin: bool, method: str) -> None:
    if not request.registry.settings[SECRET]:
        raise RuntimeError(
            f"request.{method}() needs {SECRET} (the secret shared with the "
            "dispatcher, to sign the affinity cookie)"
        )
    setattr(request, _WISH, pin)


def lb_pin(request: Request) -> None:
    """Pin the client to this instance with this response (e.g. after login)."""
    _wish(request, True, "lb_pin")


def lb_unpin(request: Request) -> None:
    """Delete the affinity cookie with this response (e.g. after logout)."""
    _wish(request, False, "lb_unpin")


def _session_holds_data(request: Request) -> bool:
    # request.session is reified: look it up only if the app did, so that
    # this tween never creates a session (and its cookie) by itself.
    return "session" in request.__dict__ and bool(request.session)


def _add_cookie(
    request: Request, response: Response, name: str, value: str | None
) -> None:
    header = affinity_cookie.set_cookie(
        name, value, request.script_name or "/", request.scheme == "https"
    )
    response.headerlist.append(("Set-Cookie", header))
    if value is not None and "Cache-Control" not in response.headers:
        # A shared cache must not hand this client's pin to others.
        response.cache_control = "private"


def affinity_tween_factory(handler: Handler, registry: Registry) -> Handler:
    """Read the affinity cookie before the view, set or delete it after."""
    settings = registry.settings
    mode, secret = settings[MODE], settings[SECRET]
    if mode == "off" and not secret:
        return handler
    name = settings[COOKIE]
    instance = get_health(registry).instance
    # Signing is deterministic: the common case, a client already pinned
    # here, is one string comparison and no HMAC.
    value = affinity_cookie.sign(instance, secret)

    def affinity_tween(request: Request) -> Response:
        carried = affinity_cookie.cookie_value(request.environ.get("HTTP_COOKIE"), name)
        here = carried == value
        moved = False
        if carried is not None and not here:
            previous = affinity_cookie.verify(carried, secret)
            # A forged or stale-secret cookie yields None and is just ignored.
            if previous is not None and previous != instance:
                moved = True
                registry.notify(AffinityMoved(request, previous, instance))
        response = handler(request)
        wish = getattr(request, _WISH, None)
        if wish is False:
            if carried is not None:
                _add_cookie(request, response, name, None)
        elif not here and (
            wish
            or (
                mode != "off"
                and (moved or mode == "always" or _session_holds_data(request))
            )
        ):
            _add_cookie(request, response, name, value)
        return response

    return affinity_tween


def includeme(config: Configurator) -> None:
    """Register the affinity tween, ``request.lb_pin()`` and ``request.lb_unpin()``.

    Reads ``pyramid_lb.affinity``, ``pyramid_lb.affinity_cookie`` and
    ``pyramid_lb.affinity_secret``, already parsed by the package's includeme.
    """
    config.add_request_method(lb_pin, "lb_pin")
    config.add_request_method(lb_unpin, "lb_unpin")
    # Over the excview tween: error pages rendered from exceptions get the
    # cookie too. Under health: probes never touch it.
    config.add_tween(
        "pyramid_lb.affinity.affinity_tween_factory",
        under="pyramid_lb.health.health_tween_factory",
        over=EXCVIEW,
    )


__all__ = ["AffinityMoved", "affinity_tween_factory", "includeme", "lb_pin", "lb_unpin"]
