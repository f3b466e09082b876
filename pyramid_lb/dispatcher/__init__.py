"""The dispatcher: a load-balancing reverse proxy for sibling app instances."""

from __future__ import annotations

from pyramid_lb.dispatcher.balancer import make_strategy
from pyramid_lb.dispatcher.checks import HealthChecker
from pyramid_lb.dispatcher.cluster import UP, Backend, Cluster
from pyramid_lb.dispatcher.proxy import Proxy, RetryBudget
from pyramid_lb.settings import SettingsError, parse_dispatcher


class Dispatcher:
    """The WSGI app of ``[app:dispatcher]``: the proxy and what keeps it going."""

    def __init__(self, settings: dict):
        self.settings = settings
        pool_options = dict(
            max_idle=settings["pool_size"],
            connect_timeout=settings["connect_timeout"],
            read_timeout=settings["read_timeout"],
        )
        self.cluster = Cluster(
            eject_after=settings["eject_after"] or 1 << 30,
            eject_time=settings["eject_time"],
        )
        for spec in settings["backends"]:
            self.cluster.add(
                Backend(spec.url, weight=spec.weight, state=UP, **pool_options)
            )
        options = {}
        if settings["strategy"] == "hash":
            options = dict(key=settings["hash_key"], balance=settings["hash_balance"])
        self.strategy = make_strategy(settings["strategy"], self.cluster, **options)
        self.proxy = Proxy(
            self.cluster,
            self.strategy,
            retries=settings["retries"],
            retry_budget=RetryBudget(settings["retry_budget"]),
            max_body_size=settings["max_body_size"],
            name=settings["via_name"],
            retry_after=max(1, round(settings["health_check_interval"])),
        )
        self.checker = HealthChecker(
            self.cluster,
            path=settings["health_check_path"],
            interval=settings["health_check_interval"],
            timeout=settings["health_check_timeout"],
            rise=settings["rise"],
            fall=settings["fall"],
        )

    def start(self) -> None:
        self.checker.start()

    def stop(self) -> None:
        self.checker.stop()
        for backend in self.cluster.backends:
            backend.pool.clear()

    def __call__(self, environ, start_response):
        return self.proxy(environ, start_response)


def main(global_conf, **settings):
    """The paste app factory (``use = egg:pyramid_lb#dispatcher``)."""
    try:
        values = parse_dispatcher(settings)
    except SettingsError as exc:
        raise SettingsError(f"[app:dispatcher] {exc}") from None
    if not values["backends"]:
        raise SettingsError(
            "[app:dispatcher] has no instances to balance over: set backends "
            "(e.g. backends = http://127.0.0.1:6544 http://127.0.0.1:6545)"
        )
    dispatcher = Dispatcher(values)
    dispatcher.start()
    return dispatcher
