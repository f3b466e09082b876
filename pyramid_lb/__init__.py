"""pyramid_lb: health checks, trusted proxy headers and load balancing for Pyramid."""

from __future__ import annotations

from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError

from pyramid_lb.health import IHealth, get_health
from pyramid_lb.settings import SettingsError, parse_addon

__all__ = ["get_health", "includeme"]


def includeme(config: Configurator) -> None:
    """Activate the add-on (``config.include('pyramid_lb')``).

    Reads every ``pyramid_lb.*`` setting once, rejecting unknown keys and bad
    values, and writes the typed values back into the settings. Registers:

    - a tween at the top of the chain that applies forwarded headers from
      ``pyramid_lb.trusted_proxies`` before anything else sees the request;
    - the liveness and readiness endpoints (``pyramid_lb.health_path``,
      ``pyramid_lb.ready_path``), answered by a tween right under it, so no
      route, traversal resource or authentication policy can shadow them;
    - the ``config.add_health_check(...)`` directive;
    - ``request.lb_instance``, this instance's id;
    - a tween under the health one that sets the affinity cookie as
      ``pyramid_lb.affinity`` says, and ``request.lb_pin()`` and
      ``request.lb_unpin()`` to set or delete it explicitly (see
      :mod:`pyramid_lb.affinity`).
    """
    if config.registry.queryUtility(IHealth) is not None:
        return  # already included: including twice is harmless
    try:
        values = parse_addon(config.get_settings())
    except SettingsError as exc:
        raise ConfigurationError(str(exc)) from None
    config.get_settings().update(values)

    from pyramid_lb import affinity, forwarded, health

    forwarded.includeme(config)
    health.includeme(config)
    affinity.includeme(config)
