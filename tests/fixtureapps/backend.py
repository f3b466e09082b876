"""A small WSGI instance for dispatcher tests, served by waitress on port 0.

    python -m tests.fixtureapps.backend NAME [LOG_DIR]

Prints "Serving on http://127.0.0.1:PORT" once it listens. Every POST to
/count appends its ``id`` parameter to LOG_DIR/NAME.posts, so a test can
tell afterwards how many times each POST ran, even on an instance it
killed.

``stall=NAME`` on /slow or /count makes the first ``stalls`` (default 1) such
requests on instance NAME wait until it is killed (a minute at most), so a
test can kill it with requests in flight for sure; /whoami tells how many
are stalled.
"""

import hashlib
import json
import os
import sys
import threading
import time
from urllib.parse import parse_qs

import waitress


def make_app(name: str, log_dir: str | None):
    state = {"ready": True}
    in_flight = [0]
    stalled = [0]
    lock = threading.Lock()

    def runs_for(query, default):
        """How long the request runs: ``s``, or a minute when it stalls."""
        if query.get("stall") == name:
            with lock:
                stalls = stalled[0] < int(query.get("stalls", "1"))
                stalled[0] += stalls
            if stalls:
                return 60.0
        return float(query.get("s", default))

    def respond(start_response, body, status="200 OK", content_type="text/plain"):
        if isinstance(body, dict):
            body = json.dumps(body)
            content_type = "application/json"
        data = body.encode()
        start_response(
            status,
            [("Content-Type", content_type), ("Content-Length", str(len(data)))],
        )
        return [data]

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        query = {k: v[-1] for k, v in parse_qs(environ["QUERY_STRING"]).items()}
        with lock:
            in_flight[0] += 1
        try:
            if path == "/readyz":
                if state["ready"]:
                    return respond(start_response, "ready")
                return respond(start_response, "draining", "503 Service Unavailable")
            if path == "/drain":
                state["ready"] = False
                return respond(start_response, "draining")
            if path == "/whoami":
                return respond(
                    start_response,
                    {
                        "name": name,
                        "pid": os.getpid(),
                        "in_flight": in_flight[0],
                        "stalled": stalled[0],
                    },
                )
            if path == "/echo":
                length = int(environ.get("CONTENT_LENGTH") or 0)
                body = environ["wsgi.input"].read(length) if length else b""
                headers = {
                    key[5:].replace("_", "-").title(): value
                    for key, value in environ.items()
                    if key.startswith("HTTP_")
                }
                if environ.get("CONTENT_TYPE"):
                    headers["Content-Type"] = environ["CONTENT_TYPE"]
                return respond(
                    start_response,
                    {
                        "name": name,
                        "method": environ["REQUEST_METHOD"],
                        "uri": environ.get("REQUEST_URI"),
                        "headers": headers,
                        "content_length": environ.get("CONTENT_LENGTH"),
                        "body": body.decode("latin-1"),
                    },
                )
            if path == "/upload":
                digest = hashlib.sha256()
                stream = environ["wsgi.input"]
                left = int(environ.get("CONTENT_LENGTH") or 0)
                while left:
                    chunk = stream.read(min(left, 1 << 20))
                    digest.update(chunk)
                    left -= len(chunk)
                return respond(
                    start_response, {"name": name, "sha256": digest.hexdigest()}
                )
            if path == "/count":
                with open(os.path.join(log_dir, f"{name}.posts"), "a") as log:
                    log.write(query["id"] + "\n")
                time.sleep(runs_for(query, "0"))
                return respond(start_response, {"name": name, "id": query["id"]})
            if path == "/slow":
                time.sleep(runs_for(query, "1"))
                return respond(start_response, {"name": name, "slept": query.get("s")})
            if path == "/status":
                code = int(query["code"])
                if query.get("only", name) != name:
                    code = 200
                return respond(start_response, name, f"{code} Whatever")
            if path == "/trickle":
                # A short body of declared length, a byte at a time.
                delay = float(query.get("s", "0.4"))

                def trickle():
                    for byte in b"hello":
                        yield bytes([byte])
                        time.sleep(delay)

                start_response(
                    "200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")]
                )
                return trickle()
            if path == "/big":
                size = int(query["mb"]) << 20
                chunk = b"x" * (1 << 16)

                def body():
                    for _ in range(size // len(chunk)):
                        yield chunk

                headers = [("Content-Type", "application/octet-stream")]
                if query.get("length") == "yes":
                    headers.append(("Content-Length", str(size)))
                start_response("200 OK", headers)
                return body()
            return respond(start_response, "not found", "404 Not Found")
        finally:
            with lock:
                in_flight[0] -= 1

    return app


def main(argv):
    name = argv[1]
    log_dir = argv[2] if len(argv) > 2 else None
    server = waitress.create_server(
        make_app(name, log_dir),
        host="127.0.0.1",
        port=0,
        threads=8,
        # The tests check the forwarded headers the dispatcher sends.
        clear_untrusted_proxy_headers=False,
    )
    print(f"Serving on http://127.0.0.1:{server.effective_port}", flush=True)
    server.run()


if __name__ == "__main__":
    main(sys.argv)
