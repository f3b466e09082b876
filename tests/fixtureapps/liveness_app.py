"""A plain WSGI app whose liveness fails as many times in a row as it is told.

``GET /fail-liveness?times=N`` makes the next N ``GET /healthz`` answer 500;
the one after them passes, but only after ``hold`` seconds (default 0.5), so
the dispatcher keeps N failures in a row for a while before it sees a pass.
``GET /probes`` tells how many liveness probes were answered, and how.
"""

import json
import os
import threading
import time
from urllib.parse import parse_qs


def main(global_config, **settings):
    """The paste app factory (``use = call:tests.fixtureapps.liveness_app:main``)."""
    lock = threading.Lock()
    state = {"fail": 0, "hold": 0.0, "passed": 0, "failed": 0}

    def respond(start_response, status, body):
        data = json.dumps(body).encode()
        start_response(
            status,
            [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
        )
        return [data]

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        query = {k: v[-1] for k, v in parse_qs(environ["QUERY_STRING"]).items()}
        if path == "/healthz":
            with lock:
                failing = state["fail"] > 0
                if failing:
                    state["fail"] -= 1
                    state["failed"] += 1
                else:
                    hold, state["hold"] = state["hold"], 0.0
            if failing:
                return respond(start_response, "500 Internal Server Error", "hung")
            time.sleep(hold)
            with lock:
                state["passed"] += 1
            return respond(start_response, "200 OK", "alive")
        if path == "/fail-liveness":
            with lock:
                state["fail"] = int(query["times"])
                state["hold"] = float(query.get("hold", "0.5"))
            return respond(start_response, "200 OK", "armed")
        body = {"pid": os.getpid(), "instance": os.environ.get("PYRAMID_LB_INSTANCE")}
        if path == "/probes":
            with lock:
                body.update(passed=state["passed"], failed=state["failed"])
        return respond(start_response, "200 OK", body)

    return app
