"""pyramid_lb: health checks, trusted proxy headers and load balancing for Pyramid."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError

from pyramid_lb.addresses import AddressSet
from pyramid_lb.affinity import AFFINITY_SETTINGS
from pyramid_lb.forwarded import FORWARDED_SETTINGS, check_forwarded
from pyramid_lb.health import HEALTH_SETTINGS, IHealth, get_health
from pyramid_lb.process import TRUSTED_PROXIES_ENV
from pyramid_lb.settings import ADDON_PREFIX, SettingsError, parse

__all__ = ["get_health", "includeme"]

#: Every ``pyramid_lb.*`` key of the add-on.
ADDON_SETTINGS = HEALTH_SETTINGS + FORWARDED_SETTINGS + AFFINITY_SETTINGS


def parse_addon(
    raw: Mapping[str, Any], environ: Mapping[str, str] = os.environ
) -> dict[str, Any]:
    """Parse the add-on's ``pyramid_lb.*`` keys out of app settings, once.

    A spawned instance also trusts the dispatcher that spawned it (its
    address is in ``$PYRAMID_LB_TRUSTED_PROXIES``).
    """
    values = parse(ADDON_SETTINGS, raw, ADDON_PREFIX)
    extra = environ.get(TRUSTED_PROXIES_ENV)
    if extra:
        key = ADDON_PREFIX + "trusted_proxies"
        try:
            added = AddressSet.parse(extra)
        except ValueError as exc:
            raise SettingsError(
                f"{TRUSTED_PROXIES_ENV} = {extra!r} is not valid: {exc}"
            ) from None
        values[key] = AddressSet.parse(f"{values[key]} {added}")
    check_forwarded(values, ADDON_PREFIX)
    mode = values[ADDON_PREFIX + "affinity"]
    if mode != "off" and not values[ADDON_PREFIX + "affinity_secret"]:
        raise SettingsError(
            f"{ADDON_PREFIX}affinity = {mode!r} needs {ADDON_PREFIX}affinity_secret "
            "(the secret the dispatcher shares, to sign the cookie)"
        )
    return values


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

    forwarded.register(config)
    health.includeme(config)
    affinity.includeme(config)
