"""A plain WSGI app that knows how many of its requests run at once.

``/slow?ms=N`` takes N ms; ``/peak`` tells the most that ran at once (and
starts counting again); anything else answers at once.
"""

import json
import os
import threading
import time


def main(global_config, **settings):
    """The paste app factory (``use = call:tests.fixtureapps.busy_app:main``)."""
    lock = threading.Lock()
    running = peak = 0

    def app(environ, start_response):
        nonlocal running, peak
        path = environ["PATH_INFO"]
        if path == "/slow":
            with lock:
                running += 1
                peak = max(peak, running)
            try:
                time.sleep(int(environ["QUERY_STRING"].partition("ms=")[2]) / 1000)
            finally:
                with lock:
                    running -= 1
            answer = {}
        elif path == "/peak":
            with lock:
                answer, peak = {"peak": peak}, running
        else:
            answer = {}
        answer["instance"] = os.environ.get("PYRAMID_LB_INSTANCE")
        body = json.dumps(answer).encode()
        start_response(
            "200 OK",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return app
