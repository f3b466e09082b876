"""A small shop: URL dispatch, Jinja2 templates, static assets, a cookie cart.

A third-party app: it does not include pyramid_lb; waitress applies the
forwarded headers of the proxy its ini file trusts.
"""

from pyramid.config import Configurator


def main(global_config, **settings):
    """The paste app factory (``use = call:tests.realapps.shop:main``)."""
    with Configurator(settings=settings) as config:
        config.include("pyramid_jinja2")
        config.add_jinja2_renderer(".html")
        config.add_static_view(
            "static", "tests.realapps.shop:static", cache_max_age=3600
        )
        config.add_route("home", "/")
        config.add_route("products", "/products")
        config.add_route("product", r"/products/{id:\d+}")
        config.add_route("catalogue", "/catalogue")
        config.add_route("cart", "/cart")
        config.add_route("about", "/about")
        config.add_route("help", "/help/")
        config.add_route("whoami", "/whoami.json")
        config.add_route("ping", "/ping")
        config.add_route("orders", "/orders")
        config.scan(".views")
        return config.make_wsgi_app()
