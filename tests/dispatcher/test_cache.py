"""The shared cache (``cache = memory``): its rules as tables, then through a
real dispatcher in front of real instances that answer with the caching
headers each test asks for (tests/fixtureapps/cache_app.py)."""

import hashlib
import io
import json
import sys
import threading
import time
import tracemalloc
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from email.utils import formatdate
from urllib.parse import urlencode

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from pyramid_lb.dispatcher import cache as cache_module
from pyramid_lb.dispatcher import make_dispatcher
from pyramid_lb.dispatcher.balancer import RoundRobin
from pyramid_lb.dispatcher.cache import (
    Cache,
    directives,
    freshness,
    not_modified,
    unstorable,
)
from pyramid_lb.dispatcher.cluster import Backend, Cluster
from pyramid_lb.dispatcher.proxy import Proxy
from pyramid_lb.settings import SettingsError
from tests.dispatcher.canned import CLOSE, Canned, Gate, call, in_turn
from tests.dispatcher.site import all_up, serve, write_ini
from tests.processes import wait_until

ADMIN = {"X-Requested-With": "test"}

# -- the rules, as tables ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, {}, id="none"),
        pytest.param("public, max-age=60", {"public": None, "max-age": "60"}, id="two"),
        pytest.param(
            'private="Set-Cookie, X-Secret", max-age=5',
            {"private": "Set-Cookie, X-Secret", "max-age": "5"},
            id="quoted list",
        ),
        pytest.param("Max-Age = 7", {"max-age": "7"}, id="case and spaces"),
        pytest.param("max-age=1, max-age=99", {"max-age": "1"}, id="first counts"),
        pytest.param('s-maxage="30"', {"s-maxage": "30"}, id="quoted number"),
    ],
)
def test_directives(value, expected):
    assert directives(value) == expected


NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("cache_control", "expires", "lifetime"),
    [
        pytest.param("s-maxage=10, max-age=99", None, 10, id="s-maxage first"),
        pytest.param("max-age=99", formatdate(NOW + 5), 99, id="max-age over Expires"),
        pytest.param("public", formatdate(NOW + 30), 30, id="Expires minus Date"),
        pytest.param("", formatdate(NOW - 30), 0, id="Expires in the past"),
        pytest.param("", "0", 0, id="invalid Expires is stale"),
        pytest.param("max-age=soon", None, 0, id="invalid max-age is stale"),
        pytest.param("public", None, None, id="nothing said: no heuristic"),
        pytest.param("", None, None, id="no headers"),
    ],
)
def test_freshness(cache_control, expires, lifetime):
    assert freshness(directives(cache_control), expires, NOW) == lifetime


def found(**fields):
    facts = {
        "set-cookie": False,
        "vary": (),
        "etag": None,
        "last-modified": None,
        "lifetime": 60,
    }
    facts.update(fields)
    return facts


@pytest.mark.parametrize(
    ("status", "cache_control", "fields", "reason"),
    [
        pytest.param(200, "max-age=60", {}, None, id="fresh"),
        pytest.param(404, "max-age=60", {}, None, id="404"),
        pytest.param(302, "max-age=60", {}, "status 302 is not stored", id="302"),
        pytest.param(206, "max-age=60", {}, "status 206 is not stored", id="206"),
        pytest.param(500, "max-age=60", {}, "status 500 is not stored", id="500"),
        pytest.param(200, "no-store, max-age=60", {}, "no-store", id="no-store"),
        pytest.param(200, "private, max-age=60", {}, "private", id="private"),
        pytest.param(200, 'private="X", max-age=60', {}, "private", id="private=X"),
        pytest.param(
            200, "public, max-age=60", {"set-cookie": True}, "cookie", id="cookie"
        ),
        pytest.param(200, "max-age=60", {"vary": ("*",)}, "Vary: *", id="vary *"),
        pytest.param(
            200, "", {"lifetime": None}, "no freshness and no validator", id="bare"
        ),
        pytest.param(200, "max-age=0", {"lifetime": 0}, "no freshness", id="max-age=0"),
        pytest.param(
            200, "no-cache", {"lifetime": None, "etag": '"v"'}, None, id="validator"
        ),
    ],
)
def test_what_is_not_stored(status, cache_control, fields, reason):
    got = unstorable(status, directives(cache_control), found(**fields))
    if reason is None:
        assert got is None
    else:
        assert reason in got


class Stored:
    status = 200
    etag = '"v1"'
    last_modified = formatdate(NOW - 3600, usegmt=True)


@pytest.mark.parametrize(
    ("headers", "matches"),
    [
        pytest.param({"HTTP_IF_NONE_MATCH": '"v1"'}, True, id="etag"),
        pytest.param({"HTTP_IF_NONE_MATCH": 'W/"v1"'}, True, id="weak"),
        pytest.param({"HTTP_IF_NONE_MATCH": '"v0", "v1"'}, True, id="list"),
        pytest.param({"HTTP_IF_NONE_MATCH": "*"}, True, id="star"),
        pytest.param({"HTTP_IF_NONE_MATCH": '"v2"'}, False, id="other etag"),
        pytest.param(
            {
                "HTTP_IF_NONE_MATCH": '"v2"',
                "HTTP_IF_MODIFIED_SINCE": formatdate(NOW, usegmt=True),
            },
            False,
            id="If-None-Match wins",
        ),
        pytest.param(
            {"HTTP_IF_MODIFIED_SINCE": formatdate(NOW, usegmt=True)}, True, id="ims"
        ),
        pytest.param(
            {"HTTP_IF_MODIFIED_SINCE": formatdate(NOW - 7200, usegmt=True)},
            False,
            id="modified since",
        ),
        pytest.param({}, False, id="unconditional"),
    ],
)
def test_the_clients_own_conditions(headers, matches):
    assert not_modified(headers, Stored) is matches


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        pytest.param({"cache": "disk"}, "cache = 'disk' is not valid", id="kind"),
        pytest.param({"cache_size": "0"}, "expected a size above 0", id="size 0"),
        pytest.param(
            {"cache_size": "1M", "cache_max_object": "2M"},
            "cache_max_object = 2097152 is larger than cache_size = 1048576",
            id="object over size",
        ),
        pytest.param(
            {"cache_stale_if_error": "long"},
            "cache_stale_if_error = 'long' is not valid",
            id="stale",
        ),
    ],
)
def test_bad_cache_settings_name_key_and_value(settings, message):
    with pytest.raises(SettingsError, match=r"^\[app:dispatcher\] ") as info:
        make_dispatcher({}, backends="http://127.0.0.1:9", **settings)
    assert message in str(info.value)


def test_off_by_default_and_the_purge_says_so():
    dispatcher = make_dispatcher({}, backends="http://127.0.0.1:9")
    try:
        assert dispatcher.proxy.cache is None
        status, _, body = call(
            dispatcher,
            "POST",
            "/_lb/cache/purge",
            REMOTE_ADDR="127.0.0.1",
            HTTP_HOST="localhost:8080",
            HTTP_X_REQUESTED_WITH="t",
        )
        assert status.startswith("409")
        assert json.loads(body)["error"] == "there is no cache (cache = off)"
    finally:
        dispatcher.stop()


# -- through a real dispatcher ------------------------------------------------------


def start_instance(processes, name):
    process = processes.start(
        [sys.executable, "-m", "tests.fixtureapps.cache_app", name], name=name
    )
    return f"http://127.0.0.1:{process.port()}"


@pytest.fixture(scope="module")
def instances(module_processes):
    """Two cache_app instances shared by this module's tests (each test asks
    for targets of its own)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda n: start_instance(module_processes, n), "ab"))


@pytest.fixture(scope="module")
def site(module_processes, instances):
    """A dispatcher with ``cache = memory`` over both."""
    _, url = module_processes.dispatcher(instances, cache="memory")
    return url


def target(**query) -> str:
    """A path no other test asks for, with ``query`` for the instance."""
    path = f"/r/{uuid.uuid4().hex}"
    return f"{path}?{urlencode(query)}" if query else path


def computed(instances, path, kind="computed") -> int:
    """How many times the instances computed ``path`` (or answered it 304:
    ``kind = "revalidated"``), in all."""
    return sum(
        requests.get(url + "/counts", timeout=10).json()[kind].get(path, 0)
        for url in instances
    )


def gets(url, path, count=1, **kw):
    with requests.Session() as session:
        return [session.get(url + path, timeout=10, **kw) for _ in range(count)]


def x_cache(responses):
    return [r.headers.get("X-Cache") for r in responses]


def test_a_shared_answer_is_computed_once_and_says_its_age(site, instances):
    path = target(cc="public, max-age=30")
    got = gets(site, path, 4)
    assert [r.status_code for r in got] == [200] * 4
    assert x_cache(got) == ["MISS", "HIT", "HIT", "HIT"]
    assert len({r.text for r in got}) == 1
    assert computed(instances, path) == 1
    for response in got[1:]:
        assert response.headers["Age"].isdigit()
        assert int(response.headers["Age"]) <= 2
        assert "(pyramid_lb)" in response.headers["Via"]
        assert response.headers["Content-Length"] == str(len(got[0].content))
    # Each answer has its own request id, not the one that filled the entry.
    assert len({r.headers["X-Request-ID"] for r in got}) == 4


@pytest.mark.parametrize(
    "query",
    [
        pytest.param({"cc": "private, max-age=30"}, id="private"),
        pytest.param({"cc": "no-store, max-age=30"}, id="no-store"),
        pytest.param({"cc": "public, max-age=30", "cookie": "sid"}, id="Set-Cookie"),
        pytest.param({"cc": "public, max-age=30", "vary": "*"}, id="Vary *"),
        pytest.param({"cc": "public, max-age=30", "status": "500"}, id="status 500"),
        pytest.param({"cc": "public, max-age=30", "status": "302"}, id="status 302"),
        pytest.param({}, id="no freshness (no heuristic)"),
        pytest.param({"cc": "public"}, id="public without freshness"),
        pytest.param({"cc": "max-age=0"}, id="max-age=0"),
        pytest.param({"cc": "s-maxage=0, max-age=30"}, id="s-maxage=0 wins"),
        pytest.param({"expires": "bad"}, id="Expires: 0"),
        pytest.param({"cc": "max-age=60", "age": "100"}, id="older than max-age"),
    ],
)
def test_what_must_not_be_shared_is_asked_for_every_time(site, instances, query):
    path = target(**query)
    got = gets(site, path, 3)
    assert x_cache(got) == ["MISS"] * 3
    assert computed(instances, path) == 3


@pytest.mark.parametrize(
    "query",
    [
        pytest.param({"cc": "max-age=0, s-maxage=30"}, id="s-maxage over max-age"),
        pytest.param({"expires": "30"}, id="Expires minus Date"),
        pytest.param({"cc": "public, max-age=30", "status": "404"}, id="404"),
    ],
)
def test_explicit_freshness_is_reused(site, instances, query):
    path = target(**query)
    assert x_cache(gets(site, path, 3)) == ["MISS", "HIT", "HIT"]
    assert computed(instances, path) == 1


def test_vary_keeps_one_answer_per_accept_encoding(site, instances):
    path = target(cc="public, max-age=30", vary="Accept-Encoding")
    gzip = {"Accept-Encoding": "gzip"}
    plain = {"Accept-Encoding": "identity"}
    with requests.Session() as first, requests.Session() as second:
        a1 = first.get(site + path, headers=gzip, timeout=10)
        b1 = second.get(site + path, headers=plain, timeout=10)
        a2 = first.get(site + path, headers=gzip, timeout=10)
        b2 = second.get(site + path, headers=plain, timeout=10)
    assert x_cache([a1, b1, a2, b2]) == ["MISS", "MISS", "HIT", "HIT"]
    assert a2.json() == a1.json() and a1.json()["seen"]["accept-encoding"] == "gzip"
    assert b2.json() == b1.json() and b1.json()["seen"]["accept-encoding"] == (
        "identity"
    )
    assert computed(instances, path) == 2


def test_authorization_shares_only_what_is_public(site, instances):
    auth = {"Authorization": "Basic dXNlcjpwYXNz"}
    # Not public: stored for nobody...
    private = target(cc="max-age=30")
    assert x_cache(gets(site, private, 2, headers=auth)) == ["MISS", "MISS"]
    assert computed(instances, private) == 2
    # ...and what others stored is not handed to a request with Authorization.
    assert x_cache(gets(site, private, 1)) == ["MISS"]
    assert x_cache(gets(site, private, 1)) == ["HIT"]
    [mine] = gets(site, private, 1, headers=auth)
    assert mine.headers["X-Cache"] == "MISS"
    assert mine.json()["seen"]["authorization"] == auth["Authorization"]
    assert computed(instances, private) == 4
    # public: shared, with anyone.
    public = target(cc="public, max-age=30")
    assert x_cache(gets(site, public, 2, headers=auth)) == ["MISS", "HIT"]
    assert x_cache(gets(site, public, 1)) == ["HIT"]
    assert computed(instances, public) == 1


def test_a_request_with_authorization_keeps_its_own_conditions(site, instances):
    # Its answer is stored only if public: taking off its If-None-Match to
    # fetch a whole one to store would cost it every 304 it gets without
    # the cache.
    asking = {"Authorization": "Basic dXNlcjpwYXNz", "If-None-Match": '"v1"'}
    private = target(cc="max-age=30", etag="v1")
    got = gets(site, private, 2, headers=asking)
    assert [(r.status_code, r.headers["X-Cache"]) for r in got] == [(304, "MISS")] * 2
    assert computed(instances, private, "revalidated") == 2
    # A public one still fills, from an unconditional request.
    public = target(cc="public, max-age=30", etag="v1")
    assert [r.status_code for r in gets(site, public, headers=asking)] == [304]
    auth = {"Authorization": asking["Authorization"]}
    assert x_cache(gets(site, public, 2, headers=auth)) == ["MISS", "HIT"]
    [hit] = gets(site, public, headers=asking)
    assert (hit.status_code, hit.headers["X-Cache"]) == (304, "HIT")
    assert computed(instances, public) == 1


def test_head_is_answered_from_a_get_and_does_not_fill(site, instances):
    path = target(cc="public, max-age=30")
    with requests.Session() as session:
        got = session.get(site + path, timeout=10)
        head = session.head(site + path, timeout=10)
    assert (got.headers["X-Cache"], head.headers["X-Cache"]) == ("MISS", "HIT")
    assert head.content == b""
    assert head.headers["Content-Length"] == str(len(got.content))
    assert computed(instances, path) == 1
    # A HEAD first stores nothing: the GET after it is a miss.
    cold = target(cc="public, max-age=30")
    with requests.Session() as session:
        head = session.head(site + cold, timeout=10)
        got = session.get(site + cold, timeout=10)
    assert x_cache([head, got]) == ["MISS", "MISS"]


@pytest.mark.parametrize("validator", [{"etag": "v1"}, {"lm": "1"}])
def test_no_cache_revalidates_every_time_and_a_304_serves_the_stored_body(
    site, instances, validator
):
    path = target(cc="no-cache", **validator)
    got = gets(site, path, 3)
    assert x_cache(got) == ["MISS", "REVALIDATED", "REVALIDATED"]
    assert {r.status_code for r in got} == {200}
    assert len({r.content for r in got}) == 1
    assert computed(instances, path) == 1
    assert computed(instances, path, "revalidated") == 2


def test_a_304_refreshes_the_stored_entry(site, instances):
    path = target(cc="max-age=2", etag="v1")
    assert x_cache(gets(site, path)) == ["MISS"]
    time.sleep(2.5)  # stale now
    again = gets(site, path, 2)
    # Revalidated once, and fresh again from the 304 on.
    assert x_cache(again) == ["REVALIDATED", "HIT"]
    assert int(again[0].headers["Age"]) <= 1
    assert computed(instances, path) == 1
    assert computed(instances, path, "revalidated") == 1


@pytest.mark.parametrize(
    "request_cc",
    [
        pytest.param({"Cache-Control": "no-cache"}, id="no-cache"),
        pytest.param({"Cache-Control": "max-age=0"}, id="max-age=0"),
        pytest.param({"Pragma": "no-cache"}, id="Pragma"),
        pytest.param({"Cache-Control": "min-fresh=3600"}, id="min-fresh"),
    ],
)
def test_a_client_asking_for_no_cache_gets_a_revalidated_answer(
    site, instances, request_cc
):
    validated = target(cc="public, max-age=30", etag="v1")
    assert x_cache(gets(site, validated, 2)) == ["MISS", "HIT"]
    assert x_cache(gets(site, validated, headers=request_cc)) == ["REVALIDATED"]
    assert computed(instances, validated, "revalidated") == 1
    # Without a validator, it is fetched again, and the new answer kept.
    bare = target(cc="public, max-age=30")
    [first] = gets(site, bare)
    [fetched] = gets(site, bare, headers=request_cc)
    [after] = gets(site, bare)
    assert x_cache([first, fetched, after]) == ["MISS", "MISS", "HIT"]
    assert computed(instances, bare) == 2
    assert after.content == fetched.content


def test_a_client_allowing_an_older_answer_gets_the_stored_one(site, instances):
    path = target(cc="public, max-age=30")
    gets(site, path)
    [hit] = gets(site, path, headers={"Cache-Control": "max-age=600"})
    assert hit.headers["X-Cache"] == "HIT"
    assert computed(instances, path) == 1


def test_a_range_request_goes_to_an_instance(site, instances):
    path = target(cc="public, max-age=30")
    assert x_cache(gets(site, path, 2)) == ["MISS", "HIT"]
    [ranged] = gets(site, path, headers={"Range": "bytes=0-1"})
    assert ranged.headers["X-Cache"] == "MISS"
    assert computed(instances, path) == 2
    assert x_cache(gets(site, path)) == ["HIT"]  # the stored answer stays


def test_a_streamed_fill_answers_the_clients_condition_once_whole(site, instances):
    # 1 MiB with its length, at cache_max_object: it cannot come with its
    # head, and is read whole before the client's If-None-Match is judged.
    path = target(cc="public, max-age=30", etag="v1", mb="1", length="yes")
    [cold] = gets(site, path, headers={"If-None-Match": '"v1"'})
    assert (cold.status_code, cold.headers["X-Cache"], cold.content) == (
        304,
        "MISS",
        b"",
    )
    [full] = gets(site, path)
    assert (full.headers["X-Cache"], len(full.content)) == ("HIT", 1 << 20)
    assert computed(instances, path) == 1


def test_the_clients_own_condition_is_answered_304_even_on_a_miss(site, instances):
    path = target(cc="public, max-age=30", etag="v1")
    # Cold: the instance is asked for the whole answer (to store), and the
    # client's If-None-Match is judged here.
    [cold] = gets(site, path, headers={"If-None-Match": '"v1"'})
    assert (cold.status_code, cold.headers["X-Cache"]) == (304, "MISS")
    assert cold.headers["ETag"] == '"v1"'
    assert cold.content == b""
    assert computed(instances, path) == 1
    [full] = gets(site, path)
    assert (full.status_code, full.headers["X-Cache"]) == (200, "HIT")
    assert full.json()["seen"]["if-none-match"] is None
    [hit] = gets(site, path, headers={"If-None-Match": '"v0", W/"v1"'})
    assert (hit.status_code, hit.headers["X-Cache"]) == (304, "HIT")
    [other] = gets(site, path, headers={"If-None-Match": '"v2"'})
    assert (other.status_code, other.content) == (200, full.content)
    assert computed(instances, path) == 1


def test_an_unsafe_method_invalidates_its_target(site, instances):
    path = target(cc="public, max-age=30")
    assert x_cache(gets(site, path, 2)) == ["MISS", "HIT"]
    post = requests.post(site + path, timeout=10)
    assert post.headers["X-Cache"] == "MISS"
    assert x_cache(gets(site, path, 2)) == ["MISS", "HIT"]
    assert computed(instances, path) == 3


def test_twenty_concurrent_misses_make_one_instance_request(site, instances):
    path = target(cc="public, max-age=30", sleep="0.5")
    barrier = threading.Barrier(20)

    def one(_):
        barrier.wait(10)
        return requests.get(site + path, timeout=20)

    with ThreadPoolExecutor(20) as pool:
        got = list(pool.map(one, range(20)))
    assert [r.status_code for r in got] == [200] * 20
    assert len({r.content for r in got}) == 1
    assert sorted(x_cache(got)) == ["HIT"] * 19 + ["MISS"]
    assert computed(instances, path) == 1


def test_requests_for_an_uncacheable_page_are_not_queued_behind_each_other(
    site, instances
):
    path = target(cc="private", sleep="2")
    gets(site, path)  # found not storable: its next requests do not wait
    started = time.monotonic()
    with ThreadPoolExecutor(10) as pool:
        got = list(pool.map(lambda _: requests.get(site + path, timeout=20), range(10)))
    elapsed = time.monotonic() - started
    assert x_cache(got) == ["MISS"] * 10
    assert computed(instances, path) == 11
    # All at once: 2 s. Waiting for another's fill first would take 4 s.
    assert elapsed < 3.3


def test_purge_drops_one_path_or_everything(site):
    one, other = target(cc="public, max-age=30"), target(cc="public, max-age=30")
    for path in (one, other, one + "&page=2"):
        assert x_cache(gets(site, path, 2)) == ["MISS", "HIT"]
    purge = site + "/_lb/cache/purge"
    assert requests.get(purge, timeout=10).status_code == 405
    assert requests.post(purge, timeout=10).status_code == 403  # no X-Requested-With
    bad = requests.post(purge, params={"path": "r"}, headers=ADMIN, timeout=10)
    assert bad.status_code == 400
    path = one.partition("?")[0]
    answer = requests.post(purge, params={"path": path}, headers=ADMIN, timeout=10)
    assert answer.json() == {"purged": 2, "path": path}  # both queries of it
    assert x_cache(gets(site, one)) == ["MISS"]
    assert x_cache(gets(site, other)) == ["HIT"]
    everything = requests.post(purge, headers=ADMIN, timeout=10).json()
    assert everything["purged"] >= 2
    assert (
        requests.get(site + "/_lb/stats.json", timeout=10).json()["cache"]["entries"]
        == 0
    )
    assert x_cache(gets(site, other)) == ["MISS"]


def test_stats_and_metrics_count_what_the_cache_did(processes, instances):
    _, url = processes.dispatcher(instances, cache="memory", cache_size="2M")
    path = target(cc="no-cache", etag="v1")
    assert x_cache(gets(url, path, 3)) == ["MISS", "REVALIDATED", "REVALIDATED"]
    fresh = target(cc="public, max-age=30")
    assert x_cache(gets(url, fresh, 3)) == ["MISS", "HIT", "HIT"]
    stats = requests.get(url + "/_lb/stats.json", timeout=10).json()["cache"]
    assert {k: stats[k] for k in ("hits", "misses", "revalidated", "stale")} == {
        "hits": 2,
        "misses": 2,
        "revalidated": 2,
        "stale": 0,
    }
    assert (stats["entries"], stats["size"], stats["evicted"]) == (2, 2 << 20, 0)
    assert 300 < stats["bytes"] < 4000
    text = requests.get(url + "/_lb/metrics", timeout=10).text
    samples = {
        (s.name, s.labels.get("result")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("pyramid_lb_cache")
    }
    assert samples[("pyramid_lb_cache_answers_total", "hit")] == 2
    assert samples[("pyramid_lb_cache_answers_total", "miss")] == 2
    assert samples[("pyramid_lb_cache_answers_total", "revalidated")] == 2
    assert samples[("pyramid_lb_cache_evictions_total", None)] == 0
    assert samples[("pyramid_lb_cache_bytes", None)] == stats["bytes"]
    assert samples[("pyramid_lb_cache_entries", None)] == 2


def test_the_least_recently_used_go_first_within_cache_size(processes, instances):
    _, url = processes.dispatcher(
        instances, cache="memory", cache_size="4k", cache_max_object="1k"
    )
    paths = [target(cc="public, max-age=60") for _ in range(20)]
    assert x_cache(gets(url, paths[0])) == ["MISS"]
    each = requests.get(url + "/_lb/stats.json", timeout=10).json()["cache"]["bytes"]
    fit = 4096 // each
    assert fit >= 4, each
    for path in paths[1:fit]:
        assert x_cache(gets(url, path)) == ["MISS"]
    assert x_cache(gets(url, paths[0])) == ["HIT"]  # the first is used again
    for path in paths[fit : fit + 3]:  # each one more pushes one out
        assert x_cache(gets(url, path)) == ["MISS"]
    stats = requests.get(url + "/_lb/stats.json", timeout=10).json()["cache"]
    assert (stats["entries"], stats["evicted"]) == (fit, 3)
    assert stats["bytes"] <= 4096
    assert x_cache(gets(url, paths[fit + 2])) == ["HIT"]
    assert x_cache(gets(url, paths[0])) == ["HIT"]
    for evicted in paths[1:4]:  # the least recently used went
        assert x_cache(gets(url, evicted)) == ["MISS"]


def rss_peak_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("length", ["no", "yes"])
def test_an_answer_over_cache_max_object_streams_unstored(processes, instances, length):
    process, url = processes.dispatcher(
        instances[:1], cache="memory", cache_max_object="1M"
    )
    gets(url, target(cc="public, max-age=60", mb="1"))  # warm up
    before = rss_peak_kib(process.pid)
    path = target(cc="public, max-age=60", mb="10", length=length)
    digest, received = hashlib.sha256(), 0
    with requests.get(url + path, stream=True, timeout=30) as response:
        assert response.headers["X-Cache"] == "MISS"
        for chunk in response.iter_content(1 << 16):
            received += len(chunk)
            digest.update(chunk)
    assert received == 10 << 20
    assert digest.hexdigest() == hashlib.sha256(b"x" * (10 << 20)).hexdigest()
    assert rss_peak_kib(process.pid) - before < 5 * 1024
    with requests.get(url + path, stream=True, timeout=30) as again:
        assert again.headers["X-Cache"] == "MISS"
    # Only the warm-up's 1 MiB, at the limit, is stored.
    stats = requests.get(url + "/_lb/stats.json", timeout=10).json()["cache"]
    assert stats["entries"] == 1
    assert (1 << 20) < stats["bytes"] < (1 << 20) + 4096


def test_a_stale_answer_stands_in_when_every_instance_fails(processes):
    instance = start_instance(processes, "lone")
    _, url = processes.dispatcher(
        [instance],
        cache="memory",
        cache_stale_if_error="30",
        health_check_interval="0.1",
        fall="1",
    )
    kept = target(cc="max-age=1")
    strict = target(cc="max-age=1, must-revalidate")
    first = {path: gets(url, path)[0] for path in (kept, strict)}
    requests.get(instance + "/fail?on=1", timeout=10)
    time.sleep(1.5)
    [stale] = gets(url, kept)
    assert (stale.status_code, stale.headers["X-Cache"]) == (200, "STALE")
    assert stale.content == first[kept].content
    assert int(stale.headers["Age"]) >= 1
    [failed] = gets(url, strict)  # must-revalidate: the error goes through
    assert (failed.status_code, failed.headers["X-Cache"]) == (500, "MISS")
    # An instance gone altogether: the dispatcher's own 503 is an error too.
    processes.started[0].stop()
    [gone] = gets(url, kept)
    assert (gone.status_code, gone.headers["X-Cache"]) == (200, "STALE")
    assert (
        requests.get(url + "/_lb/stats.json", timeout=10).json()["cache"]["stale"] == 2
    )


def test_without_stale_if_error_the_error_goes_through(processes):
    instance = start_instance(processes, "lone")
    _, url = processes.dispatcher([instance], cache="memory")
    path = target(cc="max-age=1")
    gets(url, path)
    requests.get(instance + "/fail?on=1", timeout=10)
    time.sleep(1.5)
    [failed] = gets(url, path)
    assert (failed.status_code, failed.headers["X-Cache"]) == (500, "MISS")


def test_insert_mode_stores_neither_pinning_answers_nor_pinned_ones(
    processes, instances
):
    process, url = processes.dispatcher(
        instances, cache="memory", sticky="insert", affinity_secret="s3cret"
    )
    assert "cache = memory stores nothing with sticky = insert" in process.output()
    path = target(cc="public, max-age=30")
    with requests.Session() as browser:
        pinning = browser.get(url + path, timeout=10)
        assert "lb_affinity=" in pinning.headers["Set-Cookie"]
        pinned = [browser.get(url + path, timeout=10) for _ in range(2)]
    assert "Set-Cookie" not in pinned[0].headers
    assert x_cache([pinning, *pinned]) == ["MISS"] * 3
    assert computed(instances, path) == 3


def test_no_x_cache_with_the_cache_off(processes, instances):
    _, url = processes.dispatcher(instances[:1])
    path = target(cc="public, max-age=30")
    got = gets(url, path, 2)
    assert x_cache(got) == [None, None]
    assert computed(instances, path) == 2


def test_the_prefix_a_trusted_proxy_mounts_the_app_under_is_part_of_the_key(
    processes, instances
):
    # One front proxy serving the app under /one and /two: the instance builds
    # its URLs under each, so the answers for one must not go to the other.
    _, url = processes.dispatcher(
        instances,
        cache="memory",
        trusted_proxies="127.0.0.1",
        trusted_headers="x-forwarded-for x-forwarded-proto x-forwarded-prefix",
    )
    path = target(cc="public, max-age=30")
    one = gets(url, path, 2, headers={"X-Forwarded-Prefix": "/one"})
    two = gets(url, path, 2, headers={"X-Forwarded-Prefix": "/two"})
    assert x_cache(one + two) == ["MISS", "HIT", "MISS", "HIT"]
    assert [r.json()["seen"]["x-forwarded-prefix"] for r in one + two] == (
        ["/one"] * 2 + ["/two"] * 2
    )
    assert x_cache(gets(url, path)) == ["MISS"]  # no prefix: a third answer


@pytest.mark.parametrize("cold", [False, True], ids=["stored", "filling"])
def test_a_stored_error_is_never_turned_into_a_304(site, instances, cold):
    # Preconditions only apply to a 2xx (RFC 9110 section 13.2.1).
    path = target(cc="public, max-age=30", status="404", etag="v1")
    if not cold:
        assert x_cache(gets(site, path)) == ["MISS"]
    for condition in ("*", '"v1"'):
        [got] = gets(site, path, headers={"If-None-Match": condition})
        assert got.status_code == 404
        assert got.json()["n"] == 1
    assert computed(instances, path) == 1


def test_the_request_headers_an_entry_varies_on_count_in_its_size(processes, instances):
    _, url = processes.dispatcher(
        instances, cache="memory", cache_size="1M", cache_max_object="64k"
    )
    path = target(cc="public, max-age=30", vary="X-Big")
    for n in range(12):  # each entry holds its 100 kB X-Big
        big = {"X-Big": f"{n}" + "a" * 100_000}
        assert x_cache(gets(url, path, headers=big)) == ["MISS"]
    stats = requests.get(url + "/_lb/stats.json", timeout=10).json()["cache"]
    assert stats["entries"] <= 10 and stats["evicted"] >= 2
    assert stats["entries"] * 100_000 < stats["bytes"] <= 1 << 20


def test_purge_of_a_path_with_a_query_drops_that_target_only(site):
    path = target(cc="public, max-age=30")
    other = path + "&page=2"
    for each in (path, other):
        assert x_cache(gets(site, each, 2)) == ["MISS", "HIT"]
    answer = requests.post(
        site + "/_lb/cache/purge", params={"path": path}, headers=ADMIN, timeout=10
    )
    assert answer.json() == {"purged": 1, "path": path}
    assert x_cache(gets(site, path)) == ["MISS"]
    assert x_cache(gets(site, other)) == ["HIT"]


def test_a_get_with_a_body_goes_to_an_instance_as_it_is(site, instances):
    # The instance reads the body the cache cannot key on (a search API's
    # GET with a JSON query): neither answered from an entry nor stored.
    path = target(cc="public, max-age=30")
    assert x_cache(gets(site, path)) == ["MISS"]
    with requests.Session() as session:
        got = [session.get(site + path, data=b'{"q": 1}', timeout=10) for _ in range(2)]
    assert x_cache(got) == ["MISS", "MISS"]
    assert computed(instances, path) == 3
    assert x_cache(gets(site, path)) == ["HIT"]


def test_an_error_does_not_keep_the_next_answers_from_being_stored(processes):
    # A passing 500 (or the dispatcher's own 503, the queue full) is no
    # reason to ask the instances for every request for a while after.
    instance = start_instance(processes, "lone")
    _, url = processes.dispatcher([instance], cache="memory")
    path = target(cc="public, max-age=30")
    requests.get(instance + "/fail?on=1", timeout=10)
    assert [r.status_code for r in gets(url, path)] == [500]
    requests.get(instance + "/fail?on=0", timeout=10)
    assert x_cache(gets(url, path, 3)) == ["MISS", "HIT", "HIT"]


# -- the demo's /cached, as the issue checks it ---------------------------------


def test_the_demo_computes_cached_once_for_fifty_clients(processes, tmp_path):
    ini = write_ini(tmp_path, instances=2, dispatcher_extra="cache = memory")
    _, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 2), timeout=20)
    got = [requests.get(url + "/cached?max_age=30", timeout=10) for _ in range(50)]
    assert len({r.content for r in got}) == 1
    assert got[0].json()["computed"] == 1
    assert x_cache(got) == ["MISS"] + ["HIT"] * 49
    assert got[0].headers["Cache-Control"] == "max-age=30, public"
    # Asked directly, each instance says how often it computed it before.
    instances = requests.get(url + "/_lb/stats.json", timeout=10).json()["instances"]
    before = [
        requests.get(i["url"] + "/cached?max_age=30", timeout=10).json()["computed"] - 1
        for i in instances
    ]
    assert sum(before) == 1
    # max_age=1: after 1.5 s the next request goes to an instance again.
    first = requests.get(url + "/cached?max_age=1", timeout=10)
    time.sleep(1.5)
    later = requests.get(url + "/cached?max_age=1", timeout=10)
    assert (first.headers["X-Cache"], later.headers["X-Cache"]) == ("MISS", "MISS")
    assert later.content != first.content


# -- in process, against a canned instance: the wait for a fill is bounded ----

CACHEABLE = (
    b"HTTP/1.1 200 OK\r\nCache-Control: public, max-age=60\r\n"
    b"Content-Length: 2\r\n\r\nok"
)


def test_a_request_waits_for_a_fill_a_bounded_time_without_spinning():
    gate = Gate()
    replies = iter([[gate, CACHEABLE], CACHEABLE])
    with Canned(lambda request: next(replies)) as server:
        cluster = Cluster([Backend(f"http://127.0.0.1:{server.port}")])
        cache = Cache(1 << 20, 1 << 16, fill_wait=0.3)
        proxy = Proxy(cluster, RoundRobin(cluster), via_name="lb-unit", cache=cache)
        try:
            with ThreadPoolExecutor(1) as pool:
                filling = pool.submit(call, proxy, path="/page")
                wait_until(lambda: len(server.requests) == 1)
                started_cpu, started = time.thread_time(), time.monotonic()
                status, headers, body = call(proxy, path="/page")
                waited = time.monotonic() - started
                cpu = time.thread_time() - started_cpu
                # It went on its own once the wait was over, the fill still
                # under way (the gate is closed).
                assert not filling.done()
                assert (status, headers["X-Cache"], body) == ("200 OK", "MISS", b"ok")
                assert 0.3 <= waited < 2
                assert cpu < 0.1  # it slept on an event, not in a loop
                gate.open()
                assert filling.result(5)[1]["X-Cache"] == "MISS"
            assert call(proxy, path="/page")[1]["X-Cache"] == "HIT"
            assert len(server.requests) == 2
        finally:
            for backend in cluster.backends:
                backend.pool.close()


@contextmanager
def canned_proxy(answer, cache):
    """A proxy with ``cache`` in front of a canned instance giving ``answer``."""
    with Canned(answer) as server:
        cluster = Cluster([Backend(f"http://127.0.0.1:{server.port}")])
        try:
            yield Proxy(cluster, RoundRobin(cluster), via_name="lb-unit", cache=cache)
        finally:
            for backend in cluster.backends:
                backend.pool.close()


def test_an_entry_larger_than_cache_size_is_not_stored_and_evicts_nothing():
    # cache_max_object may be cache_size: with its headers such an answer is
    # larger than the whole cache.
    big = (
        b"HTTP/1.1 200 OK\r\nCache-Control: public, max-age=60\r\n"
        b"Content-Length: 1000\r\n\r\n" + b"x" * 1000
    )

    def answer(request):
        return big if b"/big" in request.request_line else CACHEABLE

    cache = Cache(1024, 1024)
    with canned_proxy(answer, cache) as proxy:
        assert call(proxy, path="/small")[1]["X-Cache"] == "MISS"
        assert call(proxy, path="/big")[1]["X-Cache"] == "MISS"
        assert call(proxy, path="/small")[1]["X-Cache"] == "HIT"
        assert call(proxy, path="/big")[1]["X-Cache"] == "MISS"
        assert cache.stats()["evicted"] == 0


def echo(header: bytes, vary: bool = True):
    """A canned instance answering the value of ``header`` it got, varying
    on it (``vary``)."""

    def answer(request):
        [value] = [
            line.partition(b":")[2].strip()
            for line in request.head.split(b"\r\n")
            if line.lower().startswith(header.lower() + b":")
        ]
        said = b"Vary: %s\r\n" % header if vary else b""
        return (
            b"HTTP/1.1 200 OK\r\nCache-Control: public, max-age=60\r\n%s"
            b"Content-Length: %d\r\n\r\n%s" % (said, len(value), value)
        )

    return answer


@pytest.mark.parametrize("header", [b"X-Forwarded-For", b"Forwarded"])
def test_vary_on_a_header_the_dispatcher_writes_per_client_is_not_shared(header):
    # The client's own header is not what the instance saw: the dispatcher
    # wrote the client's address there.
    with canned_proxy(echo(header), Cache(1 << 20, 1 << 16)) as proxy:
        first = call(proxy, path="/ip", REMOTE_ADDR="192.0.2.1")
        second = call(proxy, path="/ip", REMOTE_ADDR="192.0.2.2")
        assert b"192.0.2.1" in first[2]
        assert (second[1]["X-Cache"], b"192.0.2.2" in second[2]) == ("MISS", True)


def test_what_is_remembered_of_uncacheable_targets_does_not_grow_with_them():
    # Every uncacheable target is remembered a while (hit-for-miss), up to
    # MAX_PASSES of them, outside cache_size: not by the whole target a
    # client may make as long as its server takes.
    private = (
        b"HTTP/1.1 200 OK\r\nCache-Control: private\r\nContent-Length: 2\r\n\r\nok"
    )
    cache = Cache(1 << 20, 1 << 16)
    with canned_proxy(private, cache) as proxy:
        tracemalloc.start()
        try:
            for n in range(50):
                call(proxy, path=f"/p/{n}/" + "x" * 20_000)
            held = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(True, cache_module.__file__)]
            )
        finally:
            tracemalloc.stop()
    assert len(cache._passes) == 50
    assert sum(stat.size for stat in held.statistics("filename")) < 100_000


@pytest.mark.parametrize(
    ("port", "told", "caches"),
    [
        pytest.param("8080", b"example.org:8080", ["MISS", "MISS", "HIT"], id="8080"),
        pytest.param("80", b"example.org", ["MISS", "HIT", "HIT"], id="default port"),
    ],
)
def test_a_request_without_host_is_keyed_by_the_host_the_instance_is_given(
    port, told, caches
):
    # HTTP/1.0 without Host: the instance is told the server's name and
    # port (example.org:8080), not the example.org of a client saying so.
    with canned_proxy(echo(b"Host", vary=False), Cache(1 << 20, 1 << 16)) as proxy:
        bare = {"SERVER_PROTOCOL": "HTTP/1.0", "HTTP_HOST": None, "SERVER_PORT": port}
        first = call(proxy, path="/h", **bare)
        named = call(proxy, path="/h", HTTP_HOST="example.org")
        again = call(proxy, path="/h", **bare)
    assert first[2] == told
    assert [r[1]["X-Cache"] for r in (first, named, again)] == caches


def test_an_answer_cut_while_read_whole_for_the_clients_condition_is_a_502():
    # Read whole before any byte of it goes out (to judge If-None-Match):
    # cut short, the client still gets the proxy's clean error, and the
    # request waiting for it an answer of its own.
    head = (
        b'HTTP/1.1 200 OK\r\nCache-Control: public, max-age=60\r\nETag: "v"\r\n'
        b"Content-Length: 10\r\n\r\n"
    )
    gate = Gate()
    replies = iter([[head + b"12345", gate, CLOSE], head + b"0123456789"])
    cache = Cache(1 << 20, 1 << 16, fill_wait=5)
    with (
        canned_proxy(lambda request: next(replies), cache) as proxy,
        ThreadPoolExecutor(2) as pool,
    ):
        cut = pool.submit(call, proxy, path="/c", HTTP_IF_NONE_MATCH='"v"')
        wait_until(lambda: cache._filling)
        waiting = pool.submit(call, proxy, path="/c")
        gate.open()
        status, headers, _ = cut.result(5)
        assert (status, headers["X-Cache"]) == ("502 Bad Gateway", "MISS")
        assert waiting.result(5)[2] == b"0123456789"
    assert cache.stats()["entries"] == 1


def test_a_streamed_fill_is_stored_before_its_last_piece_goes_out():
    # The client that has it all may ask again at once (or another, told
    # by it): it must find the new answer, not the one before.
    gate = Gate()
    head = CACHEABLE.partition(b"\r\n\r\n")[0].replace(b"Length: 2", b"Length: 10")
    cache = Cache(1 << 20, 1 << 16)
    with canned_proxy([head + b"\r\n\r\n12345", gate, b"67890"], cache) as proxy:
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/s",
            "SERVER_NAME": "example.org",
            "SERVER_PORT": "8080",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "HTTP_HOST": "example.org:8080",
            "REMOTE_ADDR": "192.0.2.1",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(b""),
        }
        body = proxy(environ, lambda status, headers, exc_info=None: None)
        try:
            pieces = iter(body)
            assert next(pieces) == b"12345"
            gate.open()
            assert next(pieces) == b"67890"
            assert cache.stats()["entries"] == 1
            assert call(proxy, path="/s")[1]["X-Cache"] == "HIT"
        finally:
            body.close()


def test_a_body_ended_by_the_close_is_passed_on_and_not_stored():
    """Cut short by a crash, such a body would look whole: never kept."""
    head = b"HTTP/1.1 200 OK\r\nCache-Control: public, max-age=60\r\n\r\n"
    cache = Cache(1 << 20, 1 << 16)
    answers = in_turn([head + b"ab", b"cd", CLOSE], CACHEABLE)
    with canned_proxy(answers, cache) as proxy:
        assert call(proxy, path="/c")[2] == b"abcd"
        assert cache.stats()["entries"] == 0
        status, headers, body = call(proxy, path="/c")
        assert (headers["X-Cache"], body) == ("MISS", b"ok")


def test_an_instance_closing_after_its_head_gets_the_client_a_502_not_stored():
    head = CACHEABLE.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    cache = Cache(1 << 20, 1 << 16)
    with canned_proxy(in_turn([head, CLOSE], CACHEABLE), cache) as proxy:
        status, headers, _ = call(proxy, path="/h")
        assert (status, headers["X-Cache"]) == ("502 Bad Gateway", "MISS")
        assert cache.stats()["entries"] == 0
        assert call(proxy, path="/h")[2] == b"ok"
        assert call(proxy, path="/h")[1]["X-Cache"] == "HIT"


def test_an_answer_asked_for_before_a_purge_is_not_stored_after_it():
    """The purged answer must not come back with a fill that was under way."""
    gate = Gate()
    cache = Cache(1 << 20, 1 << 16)
    with canned_proxy(in_turn([gate, CACHEABLE], CACHEABLE), cache) as proxy:
        with ThreadPoolExecutor(1) as pool:
            filling = pool.submit(call, proxy, path="/p")
            wait_until(lambda: cache._filling)
            assert cache.purge() == 0
            gate.open()
            assert filling.result(5)[2] == b"ok"
        assert cache.stats()["entries"] == 0
        assert call(proxy, path="/p")[1]["X-Cache"] == "MISS"
        assert call(proxy, path="/p")[1]["X-Cache"] == "HIT"
