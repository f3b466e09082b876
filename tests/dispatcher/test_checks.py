"""Active health checks against real (fixture) instances."""

import pytest
import requests

from pyramid_lb.dispatcher.checks import HealthChecker
from pyramid_lb.dispatcher.cluster import DOWN, STARTING, UP, Backend, Cluster
from tests.dispatcher.canned import CLOSE, Canned


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
    assert checker.last_check(backend)[1:] == (outcomes[-1], "seen")


def test_probe_of_a_live_instance(processes):
    instance = processes.backend("live")
    backend = Backend(instance.url)
    cluster, checker = make(backend, health_check_path="/readyz")
    passed, detail = checker.probe(backend)
    assert passed and detail.startswith("200 in ")
    requests.get(instance.url + "/drain", timeout=10)
    passed, detail = checker.probe(backend)
    assert not passed and detail.startswith("503 in ")
    checker.stop()


@pytest.fixture(scope="module")
def answering(module_processes):
    """A fixture instance that answers ``/status?code=N`` with status N."""
    return module_processes.backend("answering")


@pytest.mark.parametrize(
    ("code", "passed"),
    [
        pytest.param(200, True, id="200"),
        pytest.param(204, True, id="204 no content"),
        pytest.param(301, True, id="301 moved"),
        pytest.param(302, True, id="302 found: a login redirect"),
        pytest.param(308, True, id="308 permanent redirect"),
        pytest.param(400, False, id="400"),
        pytest.param(404, False, id="404"),
        pytest.param(500, False, id="500"),
        pytest.param(503, False, id="503 draining"),
    ],
)
def test_probe_passes_on_2xx_and_3xx(answering, code, passed):
    backend = Backend(answering.url)
    cluster, checker = make(backend, health_check_path=f"/status?code={code}")
    try:
        outcome, detail = checker.probe(backend)
    finally:
        checker.stop()
    assert (outcome, detail.split()[0]) == (passed, str(code))


def test_probe_of_a_dead_instance(processes):
    instance = processes.backend("dead")
    backend = Backend(instance.url)
    instance.kill()
    cluster, checker = make(backend, health_check_timeout=0.5)
    passed, detail = checker.probe(backend)
    assert not passed
    assert "connect to" in detail
    checker.stop()


def test_check_all_marks_states(processes):
    alive = processes.backend("alive")
    gone = processes.backend("gone")
    gone.kill()
    backends = [Backend(alive.url, state=STARTING), Backend(gone.url)]
    cluster, checker = make(*backends, rise=1, fall=1, health_check_timeout=0.5)
    checker.check_all()
    assert [b.state for b in backends] == [UP, DOWN]
    assert cluster.candidates() == (backends[0],)
    checker.stop()


@pytest.fixture
def canned():
    """Canned instances (scripted bytes on a real socket), stopped at the end."""
    servers = []

    def start(answer):
        servers.append(Canned(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_a_huge_health_answer_is_cut_off_and_its_connection_dropped(canned):
    body = b"x" * (1 << 20)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    server = canned([head, body])
    backend = Backend(f"http://127.0.0.1:{server.port}")
    cluster, checker = make(backend)
    try:
        outcomes = [checker.probe(backend)[0] for _ in range(2)]
    finally:
        checker.stop()
    assert outcomes == [True, True]  # the status is what counts
    assert server.connections == 2  # not read to its end: not reused


def test_an_answer_cut_short_fails_the_probe(canned):
    server = canned([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", CLOSE])
    backend = Backend(f"http://127.0.0.1:{server.port}")
    cluster, checker = make(backend)
    try:
        passed, detail = checker.probe(backend)
    finally:
        checker.stop()
    assert not passed
    assert not detail.startswith("200")
