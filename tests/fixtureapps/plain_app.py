"""A plain WSGI app, without the add-on: it shows what waitress hands it."""

import json
import os
from wsgiref.simple_server import make_server


def main(global_config, **settings):
    """The paste app factory (``use = call:tests.fixtureapps.plain_app:main``)."""

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/big":  # ?mb=N, streamed with its length
            size = int(environ["QUERY_STRING"].partition("mb=")[2]) << 20
            start_response(
                "200 OK",
                [
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Length", str(size)),
                ],
            )
            return (b"x" * 65536 for _ in range(size // 65536))
        body = json.dumps(
            {
                "instance": os.environ.get("PYRAMID_LB_INSTANCE"),
                "pid": os.getpid(),
                "remote_addr": environ.get("REMOTE_ADDR"),
                "scheme": environ["wsgi.url_scheme"],
                "x_forwarded_for": environ.get("HTTP_X_FORWARDED_FOR"),
            }
        ).encode()
        start_response(
            "200 OK",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return app


def server_factory(global_conf, port):
    """A server that is not waitress (``use = call:...:server_factory``)."""

    def serve(app):
        with make_server("127.0.0.1", int(port), app) as server:
            server.serve_forever()

    return serve
