"""A small Pyramid app that shows which instance, client and scheme served it."""

from __future__ import annotations

import logging
import time

from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from pyramid.session import SignedCookieSessionFactory

from pyramid_lb.affinity import AffinityMoved
from pyramid_lb.settings import Setting, SettingsError, parse, seconds, text

log = logging.getLogger(__name__)

#: The demo's own settings, checked like pyramid_lb's.
SETTINGS = (
    Setting(
        "session_secret",
        text,
        None,
        "Secret that signs the session cookie; the same for every instance.",
    ),
    Setting(
        "warmup",
        seconds(),
        "0",
        "Seconds the app pretends to warm up; readiness fails until then.",
    ),
)


def on_affinity_moved(event) -> None:
    """A pinned client's instance went away and it landed here instead.

    An app keeping state per instance would rebuild it here; the demo only
    says so (and shows it in /whoami).
    """
    log.info(
        "client pinned to %s moved to %s", event.previous, event.request.lb_instance
    )
    event.request.environ["demo.moved_from"] = event.previous


class Warmup:
    """An example readiness check: not ready until the warm-up is over."""

    def __init__(self, duration: float, clock=time.monotonic):
        self._clock = clock
        self.ready_at = clock() + duration

    def __call__(self) -> str:
        left = self.ready_at - self._clock()
        if left > 0:
            raise RuntimeError(f"warming up, {left:.1f}s left")
        return "warm"


def main(global_config, **settings):
    """The paste app factory (``use = egg:pyramid_lb#demo_app``)."""
    try:
        options = parse(SETTINGS, settings, prefix="demo.")
    except SettingsError as exc:
        raise ConfigurationError(str(exc)) from None
    secret = options["demo.session_secret"]
    if not secret:
        raise ConfigurationError(
            "demo.session_secret is not set: the session cookie needs a secret "
            "shared by every instance"
        )
    with Configurator(settings=settings) as config:
        config.include("pyramid_lb")
        config.set_session_factory(
            SignedCookieSessionFactory(secret, httponly=True, samesite="Lax")
        )
        config.add_health_check("warmup", Warmup(options["demo.warmup"]))
        config.add_subscriber(on_affinity_moved, AffinityMoved)
        config.add_route("home", "/")
        config.add_route("whoami", "/whoami")
        config.add_route("hello", "/hello")
        config.add_route("slow", "/slow")
        config.add_route("cpu", "/cpu")
        config.add_route("cached", "/cached")
        config.scan(".views")
    return config.make_wsgi_app()
