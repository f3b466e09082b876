"""The cluster: who takes requests, passive ejection and panic mode."""

import logging
import re

import pytest

from pyramid_lb.dispatcher.cluster import (
    DOWN,
    DRAINING,
    FAILED,
    STARTING,
    UP,
    Backend,
    Cluster,
    parse_backend_url,
)
from pyramid_lb.dispatcher.upstream import (
    HEAD,
    ConnectFailed,
    ReadTimeout,
    UpstreamError,
)
from tests.clock import Clock


class FakeSocket:
    closed = False

    def close(self):
        self.closed = True


def backends(*names):
    return [
        Backend(f"http://127.0.0.1:{9000 + i}", name=name)
        for i, name in enumerate(names)
    ]


def pooled(backend):
    """An idle connection put in ``backend``'s pool, to see it cleared."""
    sock = FakeSocket()
    backend.pool.give_back(sock)
    return sock


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def caplog(caplog):
    caplog.set_level(logging.INFO, logger="pyramid_lb.dispatcher")
    return caplog


def messages(caplog):
    return [record.getMessage() for record in caplog.records]


# -- backends ------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, address",
    [
        pytest.param("http://127.0.0.1:6544", ("127.0.0.1", 6544), id="ip and port"),
        pytest.param("http://app.internal", ("app.internal", 80), id="no port"),
        pytest.param("http://[::1]:6544/", ("::1", 6544), id="ipv6, slash"),
    ],
)
def test_parse_backend_url(url, address):
    assert parse_backend_url(url) == address


@pytest.mark.parametrize(
    "url, message",
    [
        pytest.param("https://a:1", "only http://", id="https"),
        pytest.param("127.0.0.1:6544", "only http://", id="no scheme"),
        pytest.param("http://a:99999", "port is not a number", id="port too big"),
        pytest.param("http://a:x", "port is not a number", id="port not a number"),
        pytest.param("http://:6544", "with no path", id="no host"),
        pytest.param("http://a:1/app", "with no path", id="path"),
        pytest.param("http://a:1/?x=1", "with no path", id="query"),
    ],
)
def test_parse_backend_url_says_what_is_wrong(url, message):
    with pytest.raises(ValueError, match=f"^{re.escape(repr(url))}: .*{message}"):
        parse_backend_url(url)


def test_backend_defaults():
    backend = Backend("http://127.0.0.1:6544/")
    assert backend.url == "http://127.0.0.1:6544"
    assert backend.name == "127.0.0.1:6544"
    assert (backend.weight, backend.state, backend.held) == (1, UP, False)
    assert backend.pool.address == ("127.0.0.1", 6544)
    assert repr(backend) == "<Backend 127.0.0.1:6544 http://127.0.0.1:6544 up>"


def test_attempts_count_requests_in_flight_and_end_once():
    backend = Backend("http://127.0.0.1:9")
    cluster = Cluster([backend])
    assert cluster.take(backend) and cluster.take(backend)
    first = cluster.attempt(backend)
    with cluster.attempt(backend, retry=True):
        assert (backend.in_flight, backend.requests, backend.retries) == (2, 2, 1)
    assert backend.in_flight == 1
    first.answered(200)
    first.end()
    first.end()
    assert backend.in_flight == 0
    assert backend.tally.classes[2] == 1  # one 2xx; the other ended unanswered


def test_an_attempt_failing_counts_against_the_instance_timeouts_too():
    """A stuck instance is taken out passively: its timeouts in a row count."""
    backend = Backend("http://127.0.0.1:9")
    cluster = Cluster([backend], eject_after=3)
    for error in (ConnectFailed("refused"), ReadTimeout("slow", HEAD)):
        assert cluster.take(backend)
        with pytest.raises(UpstreamError), cluster.attempt(backend):
            raise error
    assert (backend.errors, backend.errors_in_a_row, backend.in_flight) == (2, 2, 0)
    assert cluster.take(backend)
    with pytest.raises(UpstreamError), cluster.attempt(backend):
        raise ReadTimeout("slow", HEAD)
    assert cluster.ejected(backend)


def test_a_kept_attempt_ends_only_when_told():
    backend = Backend("http://127.0.0.1:9")
    cluster = Cluster([backend])
    assert cluster.take(backend)
    with cluster.attempt(backend) as attempt:
        attempt.answered(200)
        attempt.keep()
    assert backend.in_flight == 1
    attempt.end()
    assert backend.in_flight == 0


def test_ejected_by_the_clusters_clock(clock):
    backend = Backend("http://127.0.0.1:9")
    cluster = Cluster([backend], clock=clock)
    assert not cluster.ejected(backend)
    backend.ejected_until = clock.now + 60
    assert cluster.ejected(backend)
    clock.now += 61
    assert not cluster.ejected(backend)


# -- candidates ----------------------------------------------------------------


def test_empty_cluster_has_no_candidates():
    cluster = Cluster()
    assert cluster.candidates() == ()
    assert not cluster.panic


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda c, b: c.set_state(b, STARTING), id="starting"),
        pytest.param(lambda c, b: c.set_state(b, DRAINING), id="draining"),
        pytest.param(lambda c, b: c.set_state(b, DOWN), id="down"),
        pytest.param(lambda c, b: c.set_state(b, FAILED), id="failed"),
        pytest.param(lambda c, b: c.hold(b), id="held"),
        pytest.param(
            lambda c, b: [c.failed(b, "boom") for _ in range(3)], id="ejected"
        ),
    ],
)
def test_candidates_exclude(change, clock):
    a, b, c = members = backends("a", "b", "c")
    cluster = Cluster(members, clock=clock)
    assert cluster.candidates() == (a, b, c)
    change(cluster, b)
    assert cluster.candidates() == (a, c)


def test_candidates_are_cached_until_a_change():
    a, b = members = backends("a", "b")
    cluster = Cluster(members)
    first = cluster.candidates()
    b.state = DOWN  # behind the cluster's back
    assert cluster.candidates() is first
    cluster.changed()
    assert cluster.candidates() == (a,)


def test_all_down_is_no_candidates_and_no_panic(caplog):
    cluster = Cluster(backends("a", "b"))
    for backend in cluster.backends:
        cluster.set_state(backend, DOWN)
    assert cluster.candidates() == ()
    assert not cluster.panic
    assert "panic" not in caplog.text


def test_hold_and_release():
    a, b = members = backends("a", "b")
    cluster = Cluster(members)
    cluster.hold(a)
    assert cluster.candidates() == (b,)
    cluster.hold(a, False)
    assert cluster.candidates() == (a, b)


def test_a_change_while_recomputing_is_not_lost():
    a, b = members = backends("a", "b")
    cluster = Cluster(members)

    class ChangesWhileRead(list):
        """Another thread holds ``a`` just after the states were read."""

        def __iter__(self):
            yield from super().__iter__()
            if not self.changed:
                self.changed = True
                cluster.hold(a)

    cluster.backends = ChangesWhileRead(members)
    cluster.backends.changed = False
    assert cluster.candidates() == (a, b)  # computed before the hold
    assert cluster.candidates() == (b,)


def test_recompute_by_a_thread_that_waited_is_skipped():
    a, b = members = backends("a", "b")
    cluster = Cluster(members)
    cluster.candidates()
    b.state = DOWN  # unannounced, so the waiting thread has nothing to redo
    cluster._recompute()
    assert cluster.candidates() == (a, b)


# -- membership ----------------------------------------------------------------


def test_add():
    a, b = backends("a", "b")
    cluster = Cluster([a])
    before = cluster.backends
    cluster.candidates()
    cluster.add(b)
    assert cluster.version == 1
    assert cluster.backends == [a, b]
    assert before == [a]  # replaced, not changed: safe to iterate meanwhile
    assert cluster.candidates() == (a, b)


def test_remove_bumps_version_and_clears_the_pool():
    a, b = members = backends("a", "b")
    cluster = Cluster(members)
    before = cluster.backends
    cluster.candidates()
    sock = pooled(b)
    cluster.remove(b)
    assert cluster.version == 1
    assert sock.closed
    assert cluster.backends == [a]
    assert before == [a, b]
    assert cluster.candidates() == (a,)
    assert cluster.get("b") is None


def test_remove_a_stranger_is_an_error():
    (a,) = members = backends("a")
    cluster = Cluster(members)
    with pytest.raises(ValueError):
        cluster.remove(Backend("http://127.0.0.1:9"))
    assert cluster.version == 0
    assert cluster.backends == [a]


def test_get():
    a, b = members = backends("a", "b")
    cluster = Cluster(members)
    assert cluster.get("b") is b
    assert cluster.get("z") is None


def test_set_weight_bumps_version():
    (a,) = members = backends("a")
    cluster = Cluster(members)
    cluster.set_weight(a, 5)
    assert (a.weight, cluster.version) == (5, 1)


# -- states --------------------------------------------------------------------


def test_set_state_logs_transitions(caplog):
    (a,) = members = backends("a")
    cluster = Cluster(members)
    cluster.set_state(a, DRAINING, "readiness answered 503")
    cluster.set_state(a, DRAINING, "again")
    cluster.set_state(a, DOWN)
    assert messages(caplog) == [
        "instance a: up -> draining (readiness answered 503)",
        "instance a: draining -> down",
    ]


@pytest.mark.parametrize(
    "state, cleared",
    [
        pytest.param(DOWN, True, id="down"),
        pytest.param(FAILED, True, id="failed"),
        pytest.param(DRAINING, False, id="draining finishes its requests"),
        pytest.param(UP, False, id="unchanged"),
    ],
)
def test_set_state_clears_the_pool_of_a_dead_instance(state, cleared):
    (a,) = members = backends("a")
    cluster = Cluster(members)
    sock = pooled(a)
    cluster.set_state(a, state)
    assert sock.closed is cleared


# -- passive health: ejection --------------------------------------------------


def fail(cluster, backend, times=3):
    for _ in range(times):
        cluster.failed(backend, "connection refused")


def test_ejected_after_eject_after_failures_in_a_row(clock, caplog):
    a, b = members = backends("a", "b")
    cluster = Cluster(members, eject_after=3, eject_time=5, clock=clock)
    sock = pooled(a)
    fail(cluster, a, 2)
    assert cluster.candidates() == (a, b)
    assert a.errors_in_a_row == 2
    fail(cluster, a, 1)
    assert cluster.candidates() == (b,)
    assert a.ejected_until == clock.now + 5
    assert (a.errors_in_a_row, a.ejections, a.errors) == (0, 1, 3)
    assert sock.closed
    assert messages(caplog) == [
        "instance a ejected for 5s after 3 failures in a row (last: connection refused)"
    ]


def test_success_resets_the_failures_in_a_row(clock):
    a, b = members = backends("a", "b")
    cluster = Cluster(members, eject_after=3, clock=clock)
    fail(cluster, a, 2)
    cluster.succeeded(a)
    assert a.errors_in_a_row == 0
    fail(cluster, a, 2)
    assert cluster.candidates() == (a, b)
    cluster.succeeded(a)
    cluster.succeeded(a)
    fail(cluster, a, 3)
    assert cluster.candidates() == (b,)
    assert a.errors == 7


def test_ejection_ends_by_itself(clock):
    a, b = members = backends("a", "b")
    cluster = Cluster(members, eject_time=5, clock=clock)
    fail(cluster, a)
    clock.now += 4.9
    assert cluster.candidates() == (b,)
    clock.now += 0.1
    assert cluster.candidates() == (a, b)


def test_failures_while_ejected_do_not_extend_it(clock):
    a, b = members = backends("a", "b")
    cluster = Cluster(members, eject_time=5, clock=clock)
    fail(cluster, a)
    until = a.ejected_until
    clock.now += 1
    fail(cluster, a, 5)  # requests that were in flight when it was ejected
    assert (a.ejected_until, a.ejections) == (until, 1)


@pytest.mark.parametrize(
    "max_eject_time, cooldowns",
    [
        pytest.param(300, [5, 10, 15, 20], id="grows"),
        pytest.param(12, [5, 10, 12, 12], id="up to the maximum"),
    ],
)
def test_ejection_grows_on_repeat(clock, max_eject_time, cooldowns):
    a, b = members = backends("a", "b")
    cluster = Cluster(members, eject_time=5, max_eject_time=max_eject_time, clock=clock)
    seen = []
    for _ in cooldowns:
        cluster.succeeded(a)
        fail(cluster, a)
        seen.append(a.ejected_until - clock.now)
        clock.now = a.ejected_until + 1  # back, and soon failing again
    assert seen == cooldowns


@pytest.mark.parametrize(
    "good_for, cooldown",
    [
        pytest.param(299, 10, id="not long enough"),
        pytest.param(300, 10, id="just the maximum"),
        pytest.param(301, 5, id="longer than the maximum"),
    ],
)
def test_ejection_starts_over_after_a_long_good_period(clock, good_for, cooldown):
    a, b = members = backends("a", "b")
    cluster = Cluster(members, eject_time=5, max_eject_time=300, clock=clock)
    fail(cluster, a)
    clock.now = a.ejected_until + good_for
    fail(cluster, a)
    assert a.ejected_until - clock.now == cooldown


# -- panic mode ----------------------------------------------------------------


def test_panic_when_every_serving_backend_is_ejected(clock, caplog):
    a, b, c = members = backends("a", "b", "c")
    cluster = Cluster(members, eject_time=5, clock=clock)
    cluster.set_state(c, DOWN)
    caplog.clear()
    fail(cluster, a)
    assert cluster.candidates() == (b,)
    clock.now += 1
    fail(cluster, b)
    # rather than 503 to everything, try the serving ones anyway
    assert cluster.candidates() == (a, b)
    assert cluster.panic
    cluster.candidates()
    cluster.set_state(c, STARTING)  # recomputed, still panicking
    assert cluster.candidates() == (a, b)
    panics = [m for m in messages(caplog) if "panic mode" in m]
    assert panics == [
        "every instance is ejected after failures; trying them all anyway (panic mode)"
    ]
    clock.now += 4  # a's ejection is over, b's is not
    assert cluster.candidates() == (a,)
    assert not cluster.panic
    assert messages(caplog)[-1] == "panic mode over: some instances are healthy again"


def test_panic_with_a_single_backend(clock):
    (a,) = members = backends("a")
    cluster = Cluster(members, clock=clock)
    fail(cluster, a)
    assert cluster.candidates() == (a,)
    assert cluster.panic


def test_panic_over_when_a_healthy_backend_comes_up(clock, caplog):
    a, b = members = backends("a", "b")
    cluster = Cluster(members, clock=clock)
    cluster.set_state(b, STARTING)
    fail(cluster, a)
    assert cluster.candidates() == (a,)
    cluster.set_state(b, UP)
    assert cluster.candidates() == (b,)
    assert not cluster.panic
    assert "panic mode over" in messages(caplog)[-1]
