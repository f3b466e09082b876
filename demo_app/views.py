"""The demo's views: who served this request, and a few load-test targets."""

from __future__ import annotations

import html
import os
import threading
import time

from pyramid.httpexceptions import HTTPBadRequest
from pyramid.response import Response
from pyramid.view import view_config

PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>pyramid_lb demo</title>
<style>
 body {{ font: 16px/1.5 system-ui, sans-serif; margin: 2rem auto; max-width: 40rem; }}
 th {{ text-align: left; padding-right: 1.5rem; }}
 code {{ background: #f3f3f3; padding: 0 .25rem; }}
</style></head>
<body>
<h1>Served by instance <code id="instance">{instance}</code></h1>
<table>
{rows}
</table>
<p id="story">{story}</p>
</body>
</html>
"""

#: What a visitor sees on reloading, by whether the app pins clients.
PINNED = (
    "This browser is pinned to {instance} by the affinity cookie: behind the "
    "dispatcher (sticky = cookie), every reload comes back to it while it is up. "
    "Stop it (kill {pid}) and the next reload lands on another instance, which "
    "pins you there; the visits counter, kept in the signed session cookie, "
    "goes on counting. Without cookies (curl), each request goes to the next "
    "instance."
)
MOVED = (
    "You were pinned to {moved_from}, which is gone: {instance} took over and "
    "pinned you here, and the visits counter went on counting."
)
UNPINNED = (
    "Reload the page: behind the dispatcher each request may land on another "
    "instance, while the visits counter, kept in the signed session cookie, "
    "goes on counting."
)


def who(request) -> dict:
    """What the app knows about this request; bumps the session counter."""
    session = request.session
    session["visits"] = session.get("visits", 0) + 1
    return {
        "instance": request.lb_instance,
        "pid": os.getpid(),
        "client_addr": request.client_addr,
        "scheme": request.scheme,
        "host_url": request.host_url,
        "application_url": request.application_url,
        "visits": session["visits"],
        "moved_from": request.environ.get("demo.moved_from"),
    }


def story(request, facts: dict) -> str:
    """The sentence under the table: what this visitor sees on reloading."""
    if facts["moved_from"]:
        return MOVED.format(**facts)
    # With affinity = session, the counter in the session pins the client.
    if request.registry.settings.get("pyramid_lb.affinity", "off") != "off":
        return PINNED.format(**facts)
    return UNPINNED


@view_config(route_name="home", request_method=("GET", "HEAD"))
def home(request):
    facts = who(request)
    rows = "\n".join(
        f'<tr><th>{html.escape(name)}</th><td id="{name}">'
        f"{html.escape(str(value))}</td></tr>"
        for name, value in facts.items()
    )
    page = PAGE.format(
        instance=html.escape(facts["instance"]),
        rows=rows,
        story=html.escape(story(request, facts)),
    )
    return Response(page, content_type="text/html", charset="utf-8")


@view_config(route_name="whoami", renderer="json", request_method=("GET", "HEAD"))
def whoami(request):
    return who(request)


@view_config(route_name="hello")
def hello(request):
    """Hello; with ``?max_age=N``, shareable for N seconds (a cache's best case)."""
    response = Response(b"Hello World!\n", content_type="text/plain", charset="utf-8")
    if "max_age" in request.params:
        response.cache_control.public = True
        response.cache_control.max_age = _max_age(request)
    return response


def _max_age(request) -> int:
    value = request.params.get("max_age", "60")
    if not value.isdigit() or int(value) > 31_536_000:
        raise HTTPBadRequest("max_age must be a number of seconds, at most a year")
    return int(value)


def _milliseconds(request, default: int, limit: int) -> int:
    value = request.params.get("ms", str(default))
    if not value.isdigit() or int(value) > limit:
        raise HTTPBadRequest(f"ms must be an integer from 0 to {limit}")
    return int(value)


@view_config(route_name="slow")
def slow(request):
    """Sleep ``ms`` milliseconds (a slow backend, without using CPU)."""
    delay = _milliseconds(request, 1000, 600_000)
    time.sleep(delay / 1000)
    return Response(
        f"slept {delay} ms on {request.lb_instance}\n",
        content_type="text/plain",
        charset="utf-8",
    )


@view_config(route_name="cpu")
def cpu(request):
    """Spend ``ms`` milliseconds of CPU (an app that does real work)."""
    budget = _milliseconds(request, 1, 10_000) / 1000
    start = time.thread_time()
    spins = 0
    while time.thread_time() - start < budget:
        spins += 1
    return Response(
        f"spun {spins} times on {request.lb_instance}\n",
        content_type="text/plain",
        charset="utf-8",
    )


#: How many times this instance computed /cached (the dispatcher's cache,
#: with ``cache = memory``, keeps the others from reaching it).
_computed = [0]
_computed_lock = threading.Lock()


@view_config(route_name="cached", renderer="json", request_method=("GET", "HEAD"))
def cached(request):
    """An answer every client may share for ``max_age`` seconds (default 60)."""
    max_age = _max_age(request)
    with _computed_lock:
        _computed[0] += 1
        computed = _computed[0]
    request.response.cache_control.public = True
    request.response.cache_control.max_age = max_age
    return {"instance": request.lb_instance, "computed": computed}
