"""The dispatcher as users run it: real instances, real pserve, real sockets."""

import collections
import hashlib
import http.client
import io
import json
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from pyramid_lb.dispatcher.balancer import RoundRobin
from pyramid_lb.dispatcher.cluster import Backend, Cluster
from pyramid_lb.dispatcher.proxy import Proxy, RetryBudget, via_names
from pyramid_lb.dispatcher.upstream import UpstreamError
from pyramid_lb.forwarded import ProxyHeaders
from tests.dispatcher import canned
from tests.dispatcher.canned import Canned, call
from tests.dispatcher.site import Load
from tests.processes import ROOT, wait_until

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
PREFIXED = "x-forwarded-for x-forwarded-proto x-forwarded-host x-forwarded-prefix"

FAST_CHECKS = {
    "health_check_interval": "0.1",
    "health_check_timeout": "0.5",
    "rise": "1",
    "fall": "1",
}


@pytest.fixture(scope="module")
def trio(module_processes):
    """Three fixture instances, a, b and c, shared by this module's tests."""
    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(module_processes.backend, ["a", "b", "c"]))


def names(url, count, path="/whoami", **kw):
    with requests.Session() as session:
        return [
            session.get(url + path, timeout=10, **kw).json()["name"]
            for _ in range(count)
        ]


def rss_peak_kib(pid):
    with open(f"/proc/{pid}/status") as status_file:
        status = status_file.read()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))


# -- balancing ----------------------------------------------------------------


def test_round_robin_rotates_exactly(processes, trio):
    _, url = processes.dispatcher(trio)
    seen = names(url, 30)
    first = seen[:3]
    assert sorted(first) == ["a", "b", "c"]
    assert seen == first * 10


def test_weights_hold_within_five_percent(processes, trio):
    backends = f"{trio[0].url} weight=1 {trio[1].url} weight=2 {trio[2].url} weight=3"
    _, url = processes.dispatcher([backends], strategy="weighted_round_robin")
    counts = collections.Counter(names(url, 600))
    for name, share in (("a", 1 / 6), ("b", 2 / 6), ("c", 3 / 6)):
        assert abs(counts[name] / 600 - share) <= 0.05 * share


def in_flight(instance):
    """Requests running on a fixture instance, not counting this one."""
    return requests.get(instance.url + "/whoami", timeout=10).json()["in_flight"] - 1


@pytest.mark.parametrize("strategy", ["least_connections", "p2c"])
def test_busy_instance_is_avoided(processes, trio, strategy):
    _, url = processes.dispatcher(trio, strategy=strategy)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(requests.get, url + "/slow?s=1", timeout=10)
        wait_until(lambda: sum(in_flight(instance) for instance in trio) == 1)
        quick = names(url, 20)
        busy = slow.result().json()["name"]
    assert busy not in quick
    assert len(set(quick)) == 2


def test_hash_keeps_keys_and_moves_a_third_when_one_leaves(processes, module_processes):
    instances = [processes.backend(name) for name in ("h1", "h2", "h3")]
    _, url = processes.dispatcher(
        instances, strategy="hash", hash_key="header:X-User", **FAST_CHECKS
    )
    keys = [f"user-{i}" for i in range(90)]

    def placement():
        with requests.Session() as session:
            return {
                key: session.get(
                    url + "/whoami", headers={"X-User": key}, timeout=10
                ).json()["name"]
                for key in keys
            }

    before = placement()
    assert placement() == before
    assert set(before.values()) == {"h1", "h2", "h3"}
    instances[0].kill()
    wait_until(lambda: "h1" not in names(url, 6))
    after = placement()
    moved = [key for key in keys if after[key] != before[key]]
    assert all(before[key] == "h1" for key in moved)
    assert len(moved) == sum(1 for key in keys if before[key] == "h1")
    assert 0.15 <= len(moved) / len(keys) <= 0.55


# -- proxying -----------------------------------------------------------------


def test_headers_both_ways(processes, trio):
    _, url = processes.dispatcher(trio[:1], via_name="lb-test")
    port = url.rsplit(":", 1)[1]
    response = requests.get(
        url + "/echo?x=1",
        headers={
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "hop",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic abc",
            "TE": "trailers",
            "X-Kept": "end-to-end",
            "X-Forwarded-For": "203.0.113.7",
            "X-Forwarded-Proto": "https",
        },
        timeout=10,
    )
    echo = response.json()
    seen = echo["headers"]
    for hop in ("X-Secret", "Keep-Alive", "Proxy-Authorization", "Te", "Connection"):
        assert hop not in seen
    assert seen["X-Kept"] == "end-to-end"
    assert seen["Host"] == f"127.0.0.1:{port}"
    assert echo["uri"] == "/echo?x=1"
    # The client's own X-Forwarded-* are dropped: nobody is trusted.
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] == f"127.0.0.1:{port}"
    assert seen["X-Forwarded-Port"] == port
    assert seen["Forwarded"] == f'for=127.0.0.1;proto=http;host="127.0.0.1:{port}"'
    assert seen["Via"] == "1.1 lb-test (pyramid_lb)"
    assert re.fullmatch(r"[0-9a-f]{32}", seen["X-Request-Id"])
    assert response.headers["X-Request-ID"] == seen["X-Request-Id"]
    assert response.headers["Via"] == "1.1 lb-test (pyramid_lb)"
    assert "Expect" not in seen


def test_request_id_is_passed_on(processes, trio):
    _, url = processes.dispatcher(trio[:1])
    response = requests.get(
        url + "/echo", headers={"X-Request-ID": "abc-123"}, timeout=10
    )
    assert response.json()["headers"]["X-Request-Id"] == "abc-123"
    assert response.headers["X-Request-ID"] == "abc-123"


def test_loop_is_refused_with_508(processes, trio):
    _, url = processes.dispatcher(trio[:1], via_name="lb-test")
    response = requests.get(
        url + "/echo", headers={"Via": "1.1 lb-test (pyramid_lb)"}, timeout=10
    )
    assert response.status_code == 508
    assert response.headers["Content-Type"].startswith("text/plain")


def test_body_limit_gives_413(processes, trio):
    _, url = processes.dispatcher(trio[:1], max_body_size="1k")
    assert requests.post(url + "/echo", data=b"x" * 1024, timeout=10).status_code == 200
    assert requests.post(url + "/echo", data=b"x" * 1025, timeout=10).status_code == 413


def test_post_body_and_content_type(processes, trio):
    _, url = processes.dispatcher(trio[:1])
    response = requests.post(
        url + "/echo",
        data=b"hello",
        headers={"Content-Type": "text/x-demo"},
        timeout=10,
    )
    echo = response.json()
    assert echo["body"] == "hello"
    assert echo["headers"]["Content-Type"] == "text/x-demo"
    assert echo["content_length"] == "5"
    empty = requests.post(url + "/echo", timeout=10).json()
    assert empty["content_length"] == "0"


def test_large_streamed_response_in_bounded_memory(processes, trio):
    process, url = processes.dispatcher(trio[:1])
    requests.get(url + "/big?mb=1", timeout=10).raise_for_status()  # warm up
    before = rss_peak_kib(process.pid)
    digest = hashlib.sha256()
    received = 0
    with requests.get(url + "/big?mb=50", stream=True, timeout=30) as response:
        assert response.headers.get("Transfer-Encoding") == "chunked"
        for chunk in response.iter_content(1 << 16):
            received += len(chunk)
            digest.update(chunk)
    assert received == 50 << 20
    assert digest.hexdigest() == hashlib.sha256(b"x" * (50 << 20)).hexdigest()
    assert rss_peak_kib(process.pid) - before < 20 * 1024


def test_large_response_with_length(processes, trio):
    _, url = processes.dispatcher(trio[:1])
    response = requests.get(url + "/big?mb=3&length=yes", timeout=30)
    assert response.headers["Content-Length"] == str(3 << 20)
    assert len(response.content) == 3 << 20


def test_large_upload_arrives_intact(processes, trio):
    _, url = processes.dispatcher(trio[:1])
    body = os.urandom(1 << 20) * 100
    response = requests.post(url + "/upload", data=body, timeout=60)
    assert response.json()["sha256"] == hashlib.sha256(body).hexdigest()


def test_head_request(processes, trio):
    _, url = processes.dispatcher(trio[:1])
    with requests.Session() as session:
        head = session.head(url + "/whoami", timeout=10)
        assert head.status_code == 200
        assert head.content == b""
        assert session.get(url + "/whoami", timeout=10).json()["name"] == "a"


# -- failures -----------------------------------------------------------------


def test_slow_instance_gives_504_after_the_read_timeout(processes, trio):
    _, url = processes.dispatcher(trio[:1], read_timeout="0.5")
    started = time.monotonic()
    response = requests.get(url + "/slow?s=2", timeout=10)
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert 0.5 <= elapsed < 1.5
    assert "Traceback" not in response.text


def test_all_down_gives_503_with_retry_after_quickly(processes):
    instances = [processes.backend(name) for name in ("d1", "d2")]
    _, url = processes.dispatcher(instances, connect_timeout="1")
    for instance in instances:
        instance.kill()
    started = time.monotonic()
    response = requests.get(url + "/whoami", timeout=10)
    assert response.status_code == 503
    assert response.headers["Retry-After"].isdigit()
    assert time.monotonic() - started < 1


def test_down_instances_are_skipped_by_health_checks(processes):
    instances = [processes.backend(name) for name in ("e1", "e2")]
    process, url = processes.dispatcher(instances, **FAST_CHECKS)
    instances[0].kill()
    process.wait_for_output(r"instance 127\.0\.0\.1:\d+: up -> down")
    assert set(names(url, 10)) == {"e2"}
    instances[1].kill()
    wait_until(lambda: process.output().count("up -> down") == 2)
    started = time.monotonic()
    response = requests.get(url + "/whoami", timeout=10)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert time.monotonic() - started < 0.5  # no instance was even tried


def test_draining_instance_gets_no_new_requests_but_finishes(processes):
    instances = [processes.backend(name) for name in ("f1", "f2")]
    process, url = processes.dispatcher(instances, **FAST_CHECKS)
    with ThreadPoolExecutor(2) as pool:
        slow = [
            pool.submit(requests.get, url + "/slow?s=1", timeout=10) for _ in range(2)
        ]
        # both in flight, one on each instance, before f1 drains
        wait_until(lambda: all(in_flight(instance) == 1 for instance in instances))
        requests.get(instances[0].url + "/drain", timeout=10)
        process.wait_for_output(r"up -> down \(health check: 503")
        quick = names(url, 10)
        results = [future.result() for future in slow]
    assert set(quick) == {"f2"}
    assert all(result.status_code == 200 for result in results)
    assert {result.json()["name"] for result in results} == {"f1", "f2"}


def garbage_server():
    """A loopback server that answers every connection with garbage."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"SURPRISE\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_garbage_from_an_instance_gives_502(processes):
    server = garbage_server()
    try:
        port = server.getsockname()[1]
        _, url = processes.dispatcher([f"http://127.0.0.1:{port}"], retries="0")
        response = requests.get(url + "/", timeout=10)
    finally:
        server.close()
    assert response.status_code == 502
    assert "invalid response" in response.text
    assert "Traceback" not in response.text


def test_failing_instance_is_ejected(processes):
    instances = [processes.backend(name) for name in ("g1", "g2")]
    process, url = processes.dispatcher(instances, eject_after="2", eject_time="30")
    with requests.Session() as session:
        statuses = [
            session.get(url + "/status?code=500&only=g1", timeout=10).status_code
            for _ in range(12)
        ]
    assert statuses.count(500) == 2
    assert statuses[-8:] == [200] * 8
    process.wait_for_output(r"127\.0\.0\.1:\d+ ejected for 30s after 2 failures")


def test_all_failing_is_panic_not_503(processes):
    instances = [processes.backend(name) for name in ("g3", "g4")]
    process, url = processes.dispatcher(instances, eject_after="1", eject_time="30")
    with requests.Session() as session:
        statuses = [
            session.get(url + "/status?code=500", timeout=10).status_code
            for _ in range(6)
        ]
    assert statuses == [500] * 6  # still tried, and 5xx answers are passed on
    process.wait_for_output("panic mode")


def stalled(instance):
    """Requests held on a fixture instance until it is killed (``stall=``)."""
    return requests.get(instance.url + "/whoami", timeout=10).json()["stalled"]


def test_killing_an_instance_under_get_load_fails_nothing(processes):
    instances = [processes.backend(name) for name in ("k1", "k2", "k3")]
    _, url = processes.dispatcher(instances)
    # Two GETs are held on k1 until it dies; the others take 20 ms each.
    with Load(url, clients=4, path="/slow?s=0.02&stall=k1&stalls=2") as load:
        wait_until(lambda: stalled(instances[0]) == 2)
        instances[0].kill()
        killed_at = len(load.results)
        wait_until(lambda: len(load.results) > killed_at + 50)
    # The two in flight on k1 when it died were sent again and answered
    # (their clients went on), and so was every other.
    assert load.failures() == []
    totals = requests.get(url + "/_lb/stats.json", timeout=10).json()["totals"]
    assert totals["retries"] >= 2


def test_killing_an_instance_under_post_load_runs_no_post_twice(processes, tmp_path):
    instances = [processes.backend(name, tmp_path) for name in ("p1", "p2", "p3")]
    _, url = processes.dispatcher(instances)
    # Two POSTs are held on p1 until it dies; the others take 50 ms each.
    path = "/count?s=0.05&stall=p1&stalls=2"
    with Load(url, clients=4, path=path, method="POST") as load:
        wait_until(lambda: stalled(instances[0]) == 2)
        instances[0].kill()
        killed_at = len(load.results)
        wait_until(lambda: len(load.results) > killed_at + 50)
    ran = {
        i.name: (tmp_path / f"{i.name}.posts").read_text().split() for i in instances
    }
    runs = collections.Counter(key for keys in ran.values() for key in keys)
    answered = {key for status, key in load.results if status == 200}
    failed = {key: status for status, key in load.results if status != 200}
    assert [key for key, times in runs.items() if times > 1] == []
    assert all(runs[key] == 1 for key in answered)
    # What the kill cut off (the two held, and any other caught mid-way) ran
    # once, on p1, and failed cleanly: a 502 each, never sent again.
    cut_off = set(ran["p1"]) - answered
    assert len(cut_off) >= 2
    assert cut_off <= set(failed)
    assert set(failed.values()) == {502}
    # Only a POST that may have reached p1 fails (one sent just before the
    # kill may not have started running there).
    assert not set(failed) & set(ran["p2"] + ran["p3"])


def test_the_demo_sees_the_real_client_behind_the_dispatcher(processes):
    demos = [processes.pserve(ROOT / "development.ini")[1] for _ in range(2)]
    _, url = processes.dispatcher(demos, **FAST_CHECKS)
    host, port = url.removeprefix("http://").split(":")

    def whoami():
        # From another loopback address than the dispatcher's own 127.0.0.1,
        # so the demo can only know it from the forwarded headers.
        conn = http.client.HTTPConnection(
            host, int(port), source_address=("127.0.0.2", 0)
        )
        try:
            conn.request("GET", "/whoami")
            response = conn.getresponse()
            body = response.read()
            return response.status, json.loads(body) if response.status == 200 else body
        finally:
            conn.close()

    # The demos warm up for a second; the dispatcher waits for their readiness.
    def both_up():
        answers = [whoami() for _ in range(4)]
        statuses = [status for status, _ in answers]
        return statuses == [200] * 4 and len({who["pid"] for _, who in answers}) == 2

    wait_until(both_up, 20)
    seen = [whoami()[1] for _ in range(4)]
    assert {who["client_addr"] for who in seen} == {"127.0.0.2"}
    assert {who["scheme"] for who in seen} == {"http"}
    assert {who["host_url"] for who in seen} == {url}
    assert len({who["pid"] for who in seen}) == 2


# -- in process, against canned instances (real sockets) -----------------------


@pytest.fixture
def canned_proxy():
    """A Proxy over canned instances; everything closed at the end."""
    started = []
    pools = []

    def make(*answers, retries=2, budget=None, **options):
        servers = [Canned(answer) for answer in answers]
        started.extend(servers)
        cluster = Cluster(
            [Backend(f"http://127.0.0.1:{s.port}", read_timeout=1) for s in servers]
        )
        proxy = Proxy(
            cluster,
            RoundRobin(cluster),
            retries=retries,
            budget=budget,
            **{"via_name": "lb-unit", **options},
        )
        pools.extend(b.pool for b in cluster.backends)
        return proxy, servers, cluster.backends

    yield make
    for pool in pools:
        pool.clear()
    for server in started:
        server.stop()


def test_uri_and_host_without_request_uri_or_host(canned_proxy):
    # HTTP/1.0 may leave out Host: the server's name and port stand in
    proxy, (server,), _ = canned_proxy(canned.in_turn(OK))
    status, _, body = call(
        proxy,
        path="/a b/é",
        QUERY_STRING="x=1",
        SCRIPT_NAME="/app",
        SERVER_PROTOCOL="HTTP/1.0",
        HTTP_HOST=None,
    )
    assert (status, body) == ("200 OK", b"ok")
    head = server.requests[0].head
    assert server.requests[0].request_line == b"GET /app/a%20b/%C3%A9?x=1 HTTP/1.1"
    assert b"\r\nHost: example.org:8080\r\n" in head
    assert b'\r\nForwarded: for=192.0.2.1;proto=http;host="example.org:8080"' in head


def test_invalid_content_length_is_400(canned_proxy):
    proxy, (server,), _ = canned_proxy(canned.in_turn(OK))
    status, _, body = call(proxy, "POST", CONTENT_LENGTH="-5")
    assert status == "400 Bad Request"
    assert body.startswith(b"400 Bad Request: invalid Content-Length")
    status, _, body = call(proxy, "POST", CONTENT_LENGTH="10")  # body missing
    assert status == "400 Bad Request"
    assert b"shorter than its Content-Length" in body
    assert server.requests == []


@pytest.mark.parametrize(
    ("status_line", "expected"),
    [
        pytest.param(b"HTTP/1.1 404 \r\n", "404 Not Found", id="empty reason"),
        pytest.param(b"HTTP/1.1 599 \r\n", "599 Unknown", id="unknown code"),
        pytest.param(b"HTTP/1.1 200 Fine\r\n", "200 Fine", id="own reason"),
    ],
)
def test_status_line(canned_proxy, status_line, expected):
    proxy, _, _ = canned_proxy(status_line + b"Content-Length: 0\r\n\r\n")
    assert call(proxy)[0] == expected


def test_get_is_retried_on_another_instance_after_a_reset(canned_proxy):
    proxy, servers, backends = canned_proxy(canned.RESET, OK)
    status, _, body = call(proxy)
    assert (status, body) == ("200 OK", b"ok")
    assert [len(s.requests) for s in servers] == [1, 1]
    assert backends[1].retries == 1


def test_post_that_may_have_arrived_is_not_sent_again(canned_proxy):
    proxy, servers, _ = canned_proxy(canned.RESET, OK)
    status, _, body = call(
        proxy, "POST", CONTENT_LENGTH="2", **{"wsgi.input": io.BytesIO(b"hi")}
    )
    assert status == "502 Bad Gateway"
    assert [len(s.requests) for s in servers] == [1, 0]


def test_post_with_idempotency_key_is_retried(canned_proxy):
    proxy, servers, _ = canned_proxy(canned.RESET, OK)
    status, _, _ = call(
        proxy,
        "POST",
        CONTENT_LENGTH="2",
        HTTP_IDEMPOTENCY_KEY="order-7",
        **{"wsgi.input": io.BytesIO(b"hi")},
    )
    assert status == "200 OK"
    assert [s.requests[0].body for s in servers] == [b"hi", b"hi"]


def test_retries_stop_at_the_budget(canned_proxy):
    budget = RetryBudget(ratio=0.0, floor=0)
    proxy, servers, _ = canned_proxy(canned.RESET, OK, budget=budget)
    assert call(proxy)[0] == "502 Bad Gateway"
    assert len(servers[1].requests) == 0


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("POST", False)])
def test_a_timeout_on_a_stuck_instance_is_retried_only_if_idempotent(
    canned_proxy, method, retried
):
    proxy, servers, (stuck, _) = canned_proxy(canned.HANG, OK)
    status, _, _ = call(proxy, method)
    assert status == ("200 OK" if retried else "504 Gateway Timeout")
    assert len(servers[1].requests) == (1 if retried else 0)
    # and the timeout counts against the stuck one, for ejection
    assert stuck.errors_in_a_row == 1


def test_a_spent_budget_is_the_reason_given(canned_proxy, caplog):
    """An instance that cannot be reached, another that could answer, and
    no retry left: the 503 says why it was not tried there, and so does the
    log, rather than "no instance is available"."""
    refused = Canned(OK)
    refused.stop()  # nothing listens there any more: connection refused
    budget = RetryBudget(ratio=0.0, floor=0)
    proxy, servers, backends = canned_proxy(OK, budget=budget)
    proxy.cluster.add(Backend(f"http://127.0.0.1:{refused.port}", name="gone"))
    proxy.strategy = RoundRobin(proxy.cluster)
    answers = [call(proxy) for _ in range(2)]
    refusal = next(a for a in answers if a[0] != "200 OK")
    assert refusal[0] == "503 Service Unavailable"
    assert refusal[1]["Retry-After"]
    assert b"instance gone:" in refusal[2]
    assert b"the retry budget is spent" in refusal[2]
    assert "not retried: the retry budget is spent" in caplog.text


def test_retries_stop_at_retries(canned_proxy):
    proxy, servers, _ = canned_proxy(*[canned.RESET] * 3, retries=1)
    assert call(proxy)[0] == "502 Bad Gateway"
    assert sum(len(s.requests) for s in servers) == 2


def test_failure_mid_body_ends_the_response_with_an_error(canned_proxy, caplog):
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    proxy, _, backends = canned_proxy([chunked, canned.RESET])
    status, body = streamed(proxy)
    assert status == "200 OK"
    pieces = iter(body)
    assert next(pieces) == b"hello"
    with pytest.raises(UpstreamError):
        next(pieces)
    body.close()
    assert backends[0].in_flight == 0
    assert "failed mid-response" in caplog.text


def streamed(proxy, start_response=None):
    """The proxy's answer to a GET, not read yet: (status, iterable)."""
    seen = {}
    env = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "QUERY_STRING": "",
        "SERVER_NAME": "x",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "x",
        "REMOTE_ADDR": "192.0.2.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
    }
    body = proxy(
        env, start_response or (lambda status, headers: seen.update(status=status))
    )
    return seen.get("status"), body


def test_a_body_that_never_comes_is_a_clean_504(canned_proxy):
    """The head came, the body did not: nothing has gone out to the client
    yet, so it gets a 504 (WSGI's start_response with exc_info) rather than
    the server's 500 for an app that raised."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"
    proxy, _, (backend,) = canned_proxy([head, canned.HANG])
    started = []

    def start_response(status, headers, exc_info=None):
        started.append((status, dict(headers), exc_info is not None))

    _, body = streamed(proxy, start_response)
    answer = b"".join(body)
    body.close()
    assert [(s, again) for s, _, again in started] == [
        ("200 OK", False),
        ("504 Gateway Timeout", True),
    ]
    assert answer.startswith(b"504 Gateway Timeout: ")
    assert started[1][1]["Content-Length"] == str(len(answer))
    assert backend.in_flight == 0


@pytest.mark.parametrize("read_all", [True, False], ids=["read to the end", "cut"])
def test_closing_a_streamed_answer_releases_its_connection_and_counts_it(
    canned_proxy, read_all
):
    gate = canned.Gate()
    reply = [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab", gate, b"cd"]
    proxy, (server,), (backend,) = canned_proxy(reply)
    status, body = streamed(proxy)
    assert status == "200 OK"
    assert backend.in_flight == 1
    pieces = iter(body)
    assert next(pieces) == b"ab"
    if read_all:
        gate.open()
        assert b"".join(pieces) == b"cd"
    body.close()
    body.close()  # the server may: once is counted
    assert (backend.in_flight, backend.tally.count) == (0, 1)
    # Only a connection whose answer ended cleanly goes back to the pool.
    assert len(backend.pool._idle) == (1 if read_all else 0)


# -- what the instance is told ---------------------------------------------------


def sent_headers(server):
    """The headers of the last request the canned instance got, by name."""
    lines = server.requests[-1].head.decode("latin-1").split("\r\n")[1:]
    headers = {}
    for line in filter(None, lines):
        name, _, value = line.partition(": ")
        headers.setdefault(name, []).append(value)
    return headers


FORGED = {
    "HTTP_X_FORWARDED_FOR": "6.6.6.6",
    "HTTP_X_FORWARDED_PROTO": "https",
    "HTTP_X_FORWARDED_HOST": "evil.example",
    "HTTP_X_FORWARDED_PORT": "9",
    "HTTP_X_FORWARDED_PREFIX": "/evil",
    "HTTP_X_FORWARDED_SSL": "on",
    "HTTP_FORWARDED": "for=6.6.6.6;host=evil.example;proto=https",
    "HTTP_X_REAL_IP": "6.6.6.6",
    "HTTP_CF_CONNECTING_IP": "6.6.6.6",
    "HTTP_TRUE_CLIENT_IP": "6.6.6.6",
}


def trusting(headers):
    return {
        "trusted": ProxyHeaders.from_options(
            {"trusted_proxies": "192.0.2.1", "trusted_headers": headers}
        )
    }


TRUSTING = trusting(PREFIXED)


@pytest.mark.parametrize(
    ("options", "environ", "expected"),
    [
        pytest.param(
            {},
            {"HTTP_HOST": "example.org"},
            {"Host": "example.org", "X-Forwarded-Port": "80"},
            id="no port in host: the scheme's default, not the socket's",
        ),
        pytest.param(
            {},
            {"HTTP_HOST": "example.org", "wsgi.url_scheme": "https"},
            {"X-Forwarded-Port": "443", "X-Forwarded-Proto": "https"},
            id="no port in host over https",
        ),
        pytest.param(
            {},
            {"HTTP_HOST": "example.org:80"},
            {"X-Forwarded-Host": "example.org:80", "X-Forwarded-Port": "80"},
            id="default port written",
        ),
        pytest.param(
            {},
            {"HTTP_HOST": "[2001:db8::1]"},
            {"X-Forwarded-Host": "[2001:db8::1]", "X-Forwarded-Port": "80"},
            id="ipv6 literal without port",
        ),
        pytest.param(
            {},
            {"HTTP_HOST": "[2001:db8::1]:8443"},
            {"X-Forwarded-Port": "8443"},
            id="ipv6 literal with port",
        ),
        pytest.param(
            {},
            {"HTTP_HOST": "example.org:9000", **FORGED},
            {
                "Host": "example.org:9000",
                "X-Forwarded-For": "192.0.2.1",
                "X-Forwarded-Proto": "http",
                "X-Forwarded-Host": "example.org:9000",
                "X-Forwarded-Port": "9000",
                "Forwarded": 'for=192.0.2.1;proto=http;host="example.org:9000"',
            },
            id="nobody trusted: every forwarding header replaced",
        ),
        pytest.param(
            TRUSTING,
            {"REMOTE_ADDR": "192.0.2.99", "HTTP_HOST": "example.org", **FORGED},
            {
                "X-Forwarded-For": "192.0.2.99",
                "X-Forwarded-Proto": "http",
                "X-Forwarded-Host": "example.org",
            },
            id="untrusted peer: every forwarding header replaced",
        ),
        pytest.param(
            TRUSTING,
            {
                "HTTP_HOST": "internal:8080",
                "HTTP_X_FORWARDED_FOR": "6.6.6.6, 203.0.113.9",
                "HTTP_X_FORWARDED_PROTO": "https",
                "HTTP_X_FORWARDED_HOST": "shop.example",
                "HTTP_X_FORWARDED_PREFIX": "/shop",
            },
            {
                "Host": "shop.example",
                "X-Forwarded-For": "203.0.113.9, 203.0.113.9",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "shop.example",
                "X-Forwarded-Port": "443",
                "X-Forwarded-Prefix": "/shop",
                "Forwarded": "for=203.0.113.9;proto=https;host=shop.example",
            },
            id="trusted front: its view passed on, the client last",
        ),
        pytest.param(
            trusting("cf-connecting-ip"),
            {"HTTP_HOST": "example.org", "HTTP_CF_CONNECTING_IP": "2001:db8::9"},
            {
                "X-Forwarded-For": "2001:db8::9",
                "Forwarded": 'for="[2001:db8::9]";proto=http;host=example.org',
            },
            id="trusted cloudflare names the client",
        ),
        pytest.param(
            trusting("forwarded"),
            {
                "HTTP_HOST": "example.org",
                "HTTP_FORWARDED": "for=6.6.6.6, for=203.0.113.9;proto=https",
            },
            {
                "Forwarded": "for=203.0.113.9;proto=https, "
                "for=203.0.113.9;proto=https;host=example.org",
                "X-Forwarded-Proto": "https",
            },
            id="trusted rfc 7239 element kept, ours appended",
        ),
    ],
)
def test_the_instance_is_told_the_dispatchers_view(
    canned_proxy, options, environ, expected
):
    proxy, (server,), _ = canned_proxy(OK, **options)
    status, _, _ = call(proxy, **environ)
    assert status == "200 OK"
    seen = sent_headers(server)
    for name, value in expected.items():
        assert seen.get(name) == [value], name
    for name in ("X-Forwarded-Ssl", "X-Real-Ip", "Cf-Connecting-Ip", "True-Client-Ip"):
        assert name not in seen
    if "X-Forwarded-Prefix" not in expected:
        assert "X-Forwarded-Prefix" not in seen


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param({"HTTP_HOST": None}, id="http/1.1 without host"),
        pytest.param({"HTTP_HOST": "good.example, evil.example"}, id="two hosts"),
        pytest.param({"HTTP_HOST": "good.example evil"}, id="whitespace"),
        pytest.param({"HTTP_HOST": "good.example/evil"}, id="slash"),
        pytest.param({"HTTP_HOST": "user@good.example"}, id="userinfo"),
        pytest.param({"HTTP_HOST": ""}, id="empty"),
        pytest.param({"HTTP_HOST": "good.example:99999"}, id="port out of range"),
        pytest.param({"REQUEST_URI": "ftp://x/y"}, id="target neither path nor url"),
    ],
)
def test_a_bad_host_is_400_and_never_forwarded(canned_proxy, environ):
    proxy, (server,), _ = canned_proxy(OK)
    status, _, body = call(proxy, **environ)
    assert status == "400 Bad Request"
    assert server.requests == []


def test_a_malformed_trusted_header_is_400(canned_proxy):
    proxy, (server,), _ = canned_proxy(OK, **TRUSTING)
    status, _, body = call(proxy, HTTP_X_FORWARDED_FOR="not-an-address")
    assert status == "400 Bad Request"
    assert b"X-Forwarded-For" in body
    assert server.requests == []


def test_via_names():
    value = '1.1 lb (pyramid_lb, "a (b)"), HTTP/1.0 Other-Proxy, 2 third (x (y))'
    assert via_names(value) == ["lb", "other-proxy", "third"]


@pytest.mark.parametrize(
    ("name", "via", "loop"),
    [
        pytest.param("lb", "1.1 lb (pyramid_lb)", True, id="own name"),
        pytest.param("lb", "1.1 web, 1.1 LB", True, id="own name further on"),
        pytest.param("lb", "1.1 lb-staging (pyramid_lb)", False, id="longer name"),
        pytest.param("host-123", "1.1 host-1234 (pyramid_lb)", False, id="pid prefix"),
        pytest.param("lb", "1.1 other (lb)", False, id="in a comment"),
    ],
)
def test_a_loop_is_its_own_name_exactly(canned_proxy, name, via, loop):
    proxy, (server,), _ = canned_proxy(OK, via_name=name)
    status, _, _ = call(proxy, HTTP_VIA=via)
    assert status == ("508 Loop Detected" if loop else "200 OK")
    assert len(server.requests) == (0 if loop else 1)


def test_a_trickling_body_reaches_the_client_as_it_comes(processes, trio):
    _, url = processes.dispatcher(trio[:1])
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        started = time.monotonic()
        conn.request("GET", "/trickle?s=0.4")
        response = conn.getresponse()
        first = response.read(1)
        first_at = time.monotonic() - started
        rest = response.read()
    finally:
        conn.close()
    assert first + rest == b"hello"
    assert first_at < 0.5


def test_one_key_stays_on_its_instance_under_concurrency(processes, trio):
    _, url = processes.dispatcher(
        trio, strategy="hash", hash_key="header:Authorization"
    )
    headers = {"Authorization": "Bearer one-user"}

    def client(_):
        with requests.Session() as session:
            return [
                session.get(url + "/slow?s=0.05", headers=headers, timeout=10)
                for _ in range(5)
            ]

    with ThreadPoolExecutor(8) as pool:
        answers = [a for batch in pool.map(client, range(8)) for a in batch]
    assert [a.status_code for a in answers] == [200] * 40
    assert len({a.json()["name"] for a in answers}) == 1


def test_an_apps_503_is_passed_on_and_not_held_against_the_instance(canned_proxy):
    busy = b"HTTP/1.1 503 Busy\r\nRetry-After: 7\r\nContent-Length: 4\r\n\r\nbusy"
    proxy, _, (backend,) = canned_proxy(busy)
    for _ in range(6):
        status, headers, body = call(proxy)
        assert (status, headers["Retry-After"], body) == ("503 Busy", "7", b"busy")
    assert (backend.errors, backend.errors_in_a_row, backend.ejections) == (0, 0, 0)
