"""A WSGI app that counts the requests it serves at once, under a server that
hides none of them from it: each request gets a thread of its own."""

import json
import os
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


def main(global_config, **settings):
    """The paste app factory (``use = call:tests.fixtureapps.counting_app:main``).

    ``/slow?s=SECONDS`` sleeps, counted; any other path answers the counts:
    ``now`` in ``/slow``, and the ``most`` there at once so far.
    """
    lock = threading.Lock()
    counts = {"now": 0, "most": 0}

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/slow":
            with lock:
                counts["now"] += 1
                counts["most"] = max(counts["most"], counts["now"])
            try:
                time.sleep(float(environ["QUERY_STRING"].partition("s=")[2] or 0))
            finally:
                with lock:
                    counts["now"] -= 1
        with lock:
            facts = dict(counts, instance=os.environ.get("PYRAMID_LB_INSTANCE"))
        body = json.dumps(facts).encode()
        start_response(
            "200 OK",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return app


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


def server_factory(global_conf, port, threads="4"):
    """A server that does not queue (``use = call:...:server_factory``).

    ``threads`` is what it tells a front end it serves at once, the key
    waitress has: unlike waitress it does not keep the others waiting, so
    the app sees every request sent to it.
    """

    def serve(app):
        with make_server(
            "127.0.0.1",
            int(port),
            app,
            server_class=_ThreadingServer,
            handler_class=_QuietHandler,
        ) as server:
            server.serve_forever()

    return serve
