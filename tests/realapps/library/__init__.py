"""A small library: traversal over a resource tree built by a root factory.

It includes the pyramid_lb add-on, which applies the forwarded headers of
the proxies its ini file trusts.
"""

from pyramid.config import Configurator

from .resources import root_factory


def main(global_config, **settings):
    """The paste app factory (``use = call:tests.realapps.library:main``)."""
    with Configurator(settings=settings, root_factory=root_factory) as config:
        config.scan(".views")
        return config.make_wsgi_app()
