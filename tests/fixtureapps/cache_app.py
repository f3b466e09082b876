"""An instance for cache tests, answering with the caching headers it is asked for.

    python -m tests.fixtureapps.cache_app NAME

Prints "Serving on http://127.0.0.1:PORT" once it listens. ``GET /r/...``
answers JSON saying how many times this instance computed that very target
(``n``) and what it saw of the request; its query sets the answer:

- ``cc``, ``vary``, ``expires`` (seconds from now, or ``bad``): those headers;
- ``etag`` / ``lm``: an ETag (quoted here) / a fixed Last-Modified, and a 304
  to a request whose If-None-Match / If-Modified-Since matches (counted in
  ``/counts`` apart, as ``revalidated``);
- ``cookie``: a Set-Cookie; ``status``: another status; ``sleep``: seconds
  to wait first; ``mb``: a body of that many MiB, streamed without a length
  unless ``length=yes``; ``age``: an Age header.

``/counts`` answers every count so far; ``/fail?on=1`` makes every ``/r/``
answer 500 until ``/fail?on=0``.
"""

import json
import sys
import threading
import time
from email.utils import formatdate
from urllib.parse import parse_qs

import waitress

LAST_MODIFIED = "Mon, 01 Jan 2024 00:00:00 GMT"


def make_app(name: str):
    lock = threading.Lock()
    computed: dict[str, int] = {}
    revalidated: dict[str, int] = {}
    failing = [False]

    def reply(start_response, status, headers, body: bytes):
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        query = {k: v[-1] for k, v in parse_qs(environ["QUERY_STRING"]).items()}
        if path == "/readyz":
            return reply(start_response, "200 OK", [], b"ready")
        if path == "/counts":
            with lock:
                body = json.dumps({"computed": computed, "revalidated": revalidated})
            return reply(start_response, "200 OK", [], body.encode())
        if path == "/fail":
            failing[0] = query.get("on") == "1"
            return reply(start_response, "200 OK", [], b"ok")
        if not path.startswith("/r/"):
            return reply(start_response, "404 Not Found", [], b"not found")
        target = environ.get("REQUEST_URI", path)
        time.sleep(float(query.get("sleep", "0")))
        if failing[0]:
            return reply(start_response, "500 Internal Server Error", [], b"failing")
        headers = [("Content-Type", "application/json")]
        if "cc" in query:
            headers.append(("Cache-Control", query["cc"]))
        if "vary" in query:
            headers.append(("Vary", query["vary"]))
        if "age" in query:
            headers.append(("Age", query["age"]))
        if "expires" in query:
            when = query["expires"]
            value = "0" if when == "bad" else formatdate(time.time() + float(when))
            headers.append(("Expires", value))
        if "cookie" in query:
            headers.append(("Set-Cookie", f"{query['cookie']}=1; Path=/"))
        etag = f'"{query["etag"]}"' if "etag" in query else None
        if etag:
            headers.append(("ETag", etag))
        if "lm" in query:
            headers.append(("Last-Modified", LAST_MODIFIED))
        none_match = environ.get("HTTP_IF_NONE_MATCH")
        since = environ.get("HTTP_IF_MODIFIED_SINCE")
        if (etag and none_match == etag) or (
            "lm" in query and not none_match and since == LAST_MODIFIED
        ):
            with lock:
                revalidated[target] = revalidated.get(target, 0) + 1
            start_response("304 Not Modified", headers)
            return []
        with lock:
            computed[target] = count = computed.get(target, 0) + 1
        status = query.get("status", "200")
        status = f"{status} {'OK' if status == '200' else 'Whatever'}"
        if "mb" in query:
            size = int(query["mb"]) << 20
            chunk = b"x" * (1 << 16)
            if query.get("length") == "yes":
                headers.append(("Content-Length", str(size)))
            start_response(status, headers)
            return (chunk for _ in range(size // len(chunk)))
        seen = {
            header: environ.get(key)
            for header, key in (
                ("accept-encoding", "HTTP_ACCEPT_ENCODING"),
                ("authorization", "HTTP_AUTHORIZATION"),
                ("if-none-match", "HTTP_IF_NONE_MATCH"),
                ("if-modified-since", "HTTP_IF_MODIFIED_SINCE"),
                ("cookie", "HTTP_COOKIE"),
                ("x-forwarded-prefix", "HTTP_X_FORWARDED_PREFIX"),
            )
        }
        body = json.dumps({"name": name, "n": count, "seen": seen}).encode()
        return reply(start_response, status, headers, body)

    return app


def main(argv):
    server = waitress.create_server(
        make_app(argv[1]),
        host="127.0.0.1",
        port=0,
        threads=8,
        clear_untrusted_proxy_headers=False,
    )
    print(f"Serving on http://127.0.0.1:{server.effective_port}", flush=True)
    server.run()


if __name__ == "__main__":
    main(sys.argv)
