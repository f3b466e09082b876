"""Counting: tallies and rates, stats.json, Prometheus metrics, the access log."""

import http.client
import re
import subprocess

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from pyramid_lb.dispatcher.stats import BUCKETS, KEEP, Tally
from tests.clock import Clock
from tests.processes import BIN, wait_until


def test_tally_counts_classes_buckets_and_percentiles():
    tally = Tally()
    for status, elapsed in [
        (200, 0.001),
        (204, 0.02),
        (404, 0.2),
        (503, 3.0),
        (0, 0.5),
    ]:
        tally.add(status, elapsed)
    assert tally.classes == [1, 0, 2, 0, 1, 1]
    assert tally.count == 5
    assert sum(tally.buckets) == 5
    assert tally.buckets[0] == 1  # 1 ms <= 5 ms
    assert tally.buckets[BUCKETS.index(0.025)] == 1
    assert tally.seconds == pytest.approx(3.721)
    assert tally.percentiles(0.5, 0.99) == [0.2, 3.0]
    assert Tally().percentiles(0.5) == [None]


def test_a_latency_beyond_the_last_bucket_lands_in_inf():
    tally = Tally()
    tally.add(200, 60.0)
    assert tally.buckets[-1] == 1


def test_tally_counts_each_second():
    clock = Clock(1000.2)
    tally = Tally(clock=clock)
    tally.add(200, 0.01)
    tally.add(503, 0.01)
    clock.now = 1001.5
    tally.add(200, 0.01)
    clock.now = 1002.0
    history = tally.history()
    assert len(history) == KEEP
    assert history[-2:] == [2, 1]  # whole seconds only: 1002 is not over
    assert sum(history) == tally.count
    clock.now = 1000.0 + KEEP + 2  # a minute later, it has all gone by
    assert sum(tally.history()) == 0
    tally.add(200, 0.01)  # reusing the slot of 1002
    assert sum(tally.history(int(clock.now) + 1)) == 1


def test_the_chart_counts_what_the_cards_count(processes):
    """Answers the dispatcher gives itself (503: nothing to route to) are
    Unrouted, on the chart as on the cards, never Requests."""
    backend = processes.backend("c1")
    _, url = processes.dispatcher([backend])
    name = backend.url.removeprefix("http://")
    with requests.Session() as client:
        for _ in range(3):
            assert client.get(url + "/whoami", timeout=10).status_code == 200
        client.post(
            f"{url}/_lb/instances/{name}/drain",
            headers={"X-Requested-With": "t"},
            timeout=10,
        )
        for _ in range(5):
            assert client.get(url + "/whoami", timeout=10).status_code == 503

        def settled():
            # The chart has whole seconds: wait for the last one to end.
            stats = client.get(url + "/_lb/stats.json", timeout=10).json()
            charted = (
                sum(point[1] for point in stats["rate"]),
                sum(point[2] for point in stats["rate"]),
            )
            return charted == (3, 5) and stats

        stats = wait_until(settled, timeout=5)
    assert (stats["totals"]["requests"], stats["totals"]["unrouted"]) == (3, 5)


def whoami_from(url, source):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), source_address=(source, 0))
    try:
        conn.request("GET", "/_lb/metrics")
        return conn.getresponse().status
    finally:
        conn.close()


def test_metrics_count_what_was_sent(processes):
    instances = [processes.backend(name) for name in ("m1", "m2")]
    process, url = processes.dispatcher(instances, via_name="lb-m")
    with requests.Session() as client:
        for _ in range(10):
            assert client.get(url + "/whoami", timeout=10).status_code == 200
        for _ in range(3):
            client.get(url + "/status?code=500", timeout=10)
        for _ in range(2):
            client.get(url + "/status?code=404", timeout=10)
        looped = client.get(url + "/whoami", headers={"Via": "1.1 lb-m"}, timeout=10)
        assert looped.status_code == 508
        text = client.get(url + "/_lb/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counts = {}
    for sample in families["pyramid_lb_requests"].samples:
        if sample.name == "pyramid_lb_requests_total":
            key = (sample.labels["instance"], sample.labels["code_class"])
            counts[key] = sample.value
    by_class = {}
    for (instance, code_class), value in counts.items():
        if instance != "none":
            by_class[code_class] = by_class.get(code_class, 0) + value
    assert by_class == {"failed": 0, "1xx": 0, "2xx": 10, "3xx": 0, "4xx": 2, "5xx": 3}
    assert counts[("none", "5xx")] == 1  # the 508, answered by the dispatcher
    assert {i for i, _ in counts if i != "none"} == {
        b.url.removeprefix("http://") for b in instances
    }
    histogram = families["pyramid_lb_request_duration_seconds"].samples
    total = sum(
        s.value
        for s in histogram
        if s.name.endswith("_bucket")
        and s.labels["le"] == "+Inf"
        and s.labels["instance"] != "none"
    )
    assert total == 15
    up = {
        s.labels["instance"]: s.value
        for s in families["pyramid_lb_instance_up"].samples
    }
    assert set(up.values()) == {1.0}
    assert "pyramid_lb_retries" in families and "pyramid_lb_ejections" in families
    # from another address than loopback's 127.0.0.1: refused
    assert whoami_from(url, "127.0.0.2") == 403


def test_stats_json_and_the_access_log(processes):
    instances = [processes.backend(name) for name in ("t1", "t2")]
    process, url = processes.dispatcher(instances)
    with requests.Session() as client:
        for _ in range(4):
            client.get(url + "/whoami?token=secret", timeout=10)
        stats = client.get(url + "/_lb/stats.json", timeout=10).json()
    assert stats["totals"]["requests"] == 4
    assert stats["totals"]["up"] == 2
    assert [i["statuses"]["2xx"] for i in stats["instances"]] == [2, 2]
    assert all(
        i["p50_ms"] is not None and i["p99_ms"] >= i["p50_ms"]
        for i in stats["instances"]
    )
    assert len(stats["rate"]) == 60
    lines = re.findall(r"INFO \[pyramid_lb.access\] (.*)", process.output())
    assert len(lines) == 4
    client_addr, request, status, size, duration, instance, request_id = re.fullmatch(
        r'(\S+) "(GET /whoami)" (\d+) (\d+) ([\d.]+)ms (\S+) ([0-9a-f]{32})', lines[0]
    ).groups()
    assert (client_addr, status) == ("127.0.0.1", "200")
    assert int(size) > 0 and float(duration) > 0
    assert instance in {b.url.removeprefix("http://") for b in instances}
    assert "secret" not in process.output()  # query strings are not logged


def test_status_command_prints_the_table(processes):
    instances = [processes.backend(name) for name in ("u1", "u2")]
    _, url = processes.dispatcher(instances)
    requests.get(url + "/whoami", timeout=10)
    result = subprocess.run(
        [BIN / "pyramid-lb", "status", url], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("instance")
    assert {line.split()[0] for line in lines[1:3]} == {
        b.url.removeprefix("http://") for b in instances
    }
    assert lines[-2].startswith("2/2 up, 0 in flight, 1 requests")
    assert lines[-1].startswith("queue: 0/")


def test_status_of_nothing_is_one_clear_line():
    result = subprocess.run(
        [BIN / "pyramid-lb", "status", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("pyramid-lb: error: cannot reach")
