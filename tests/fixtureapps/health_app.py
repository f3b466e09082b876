"""A Pyramid app with configurable health checks, served by real pserve."""

import threading
import time

from pyramid.config import Configurator
from pyramid.response import Response

from pyramid_lb import get_health


def broken():
    raise RuntimeError("the database is unreachable")


def main(global_config, **settings):
    failing = settings.pop("fixture.failing", "false") == "true"
    hang = float(settings.pop("fixture.hang", "0"))
    with Configurator(settings=settings) as config:
        config.include("pyramid_lb")
        if failing:
            config.add_health_check("database", broken)
        if hang:
            config.add_health_check(
                "hung", lambda: threading.Event().wait(60), timeout=hang
            )
        config.add_route("home", "/")
        config.add_view(lambda request: Response("home"), route_name="home")
        config.add_route("slow", "/slow")
        config.add_view(
            lambda request: time.sleep(float(request.params["s"])) or Response("slept"),
            route_name="slow",
        )
        config.add_route("drain", "/drain")
        config.add_view(
            lambda request: get_health(request).drain("asked to") or Response("ok"),
            route_name="drain",
            request_method="POST",
        )
    return config.make_wsgi_app()
