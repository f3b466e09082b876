"""Active health checks against real (fixture) instances."""

import pytest
import requests

from pyramid_lb.dispatcher.checks import HealthChecker
from pyramid_lb.dispatcher.cluster import DOWN, STARTING, UP, Backend, Cluster


def make(*backends, **options):
    cluster = Cluster(backends)
    checker = HealthChecker(cluster, **options)
    return cluster, checker


@pytest.mark.parametrize(
    ("start", "outcomes", "end"),
    [
        pytest.param(UP, [False, False], UP, id="up stays up below fall"),
        pytest.param(UP, [False, False, False], DOWN, id="fall failures: down"),
        pytest.param(UP, [False, True, False, False], UP, id="a pass resets"),
        pytest.param(DOWN, [True], DOWN, id="down stays down below rise"),
        pytest.param(DOWN, [True, True], UP, id="rise passes: up"),
        pytest.param(STARTING, [True, True], UP, id="starting becomes up"),
        pytest.param(STARTING, [False] * 5, STARTING, id="starting never down"),
    ],
)
def test_rise_and_fall(start, outcomes, end):
    backend = Backend("http://127.0.0.1:9", state=start)
    cluster, checker = make(backend, rise=2, fall=3)
    for passed in outcomes:
        checker.record(backend, passed, "seen")
    assert backend.state == end
    assert backend.last_check[1:] == (outcomes[-1], "seen")


def test_probe_of_a_live_instance(processes):
    instance = processes.backend("live")
    backend = Backend(instance.url)
    cluster, checker = make(backend, path="/readyz")
    passed, detail = checker.probe(backend)
    assert passed and detail.startswith("200 in ")
    requests.get(instance.url + "/drain", timeout=10)
    passed, detail = checker.probe(backend)
    assert not passed and detail.startswith("503 in ")
    checker.stop()


def test_probe_of_a_dead_instance(processes):
    instance = processes.backend("dead")
    backend = Backend(instance.url)
    instance.kill()
    cluster, checker = make(backend, timeout=0.5)
    passed, detail = checker.probe(backend)
    assert not passed
    assert "connect to" in detail
    checker.stop()


def test_check_all_marks_states(processes):
    alive = processes.backend("alive")
    gone = processes.backend("gone")
    gone.kill()
    backends = [Backend(alive.url, state=STARTING), Backend(gone.url)]
    cluster, checker = make(*backends, rise=1, fall=1, timeout=0.5)
    checker.check_all()
    assert [b.state for b in backends] == [UP, DOWN]
    assert cluster.candidates() == (backends[0],)
    checker.stop()
