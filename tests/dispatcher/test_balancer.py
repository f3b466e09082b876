"""Balancing strategies, driven over backends that are never connected to."""

import collections
import random
import threading

import pytest

from pyramid_lb.dispatcher.balancer import (
    STRATEGIES,
    ConsistentHash,
    LeastConnections,
    PowerOfTwoChoices,
    RoundRobin,
    WeightedRoundRobin,
    key_function,
    make_strategy,
)
from pyramid_lb.dispatcher.cluster import DOWN, UP, Backend, Cluster


def backends(*names, weights=None):
    weights = weights or [1] * len(names)
    return [
        Backend(f"http://127.0.0.1:{9000 + i}", name=name, weight=weight)
        for i, (name, weight) in enumerate(zip(names, weights, strict=True))
    ]


def names(picks):
    return "".join(b.name for b in picks)


def picks(strategy, count, environ=None, tried=()):
    return [strategy.choose(environ or {}, tried) for _ in range(count)]


def picks_in_threads(strategy, threads, count):
    """``count`` picks in each of ``threads`` threads at once, all together."""
    chosen = []
    start = threading.Barrier(threads)

    def run():
        start.wait()
        chosen.extend(picks(strategy, count))

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return collections.Counter(chosen)


# -- what every strategy shares ------------------------------------------------


def _seeded_p2c(cluster):
    return PowerOfTwoChoices(cluster, rng=random.Random(0))


def _hash_keyed(cluster):
    return ConsistentHash(cluster, hash_key="header:X-Key")


ALL = [
    pytest.param(RoundRobin, id="round robin"),
    pytest.param(WeightedRoundRobin, id="weighted"),
    pytest.param(LeastConnections, id="least connections"),
    pytest.param(_seeded_p2c, id="p2c"),
    pytest.param(_hash_keyed, id="hash"),
]
KEYED = {"HTTP_X_KEY": "some-user"}


@pytest.mark.parametrize("make", ALL)
@pytest.mark.parametrize("environ", [{}, KEYED], ids=["no key", "key"])
def test_empty_cluster_gives_none(make, environ):
    assert make(Cluster()).choose(environ) is None


@pytest.mark.parametrize("make", ALL)
@pytest.mark.parametrize("environ", [{}, KEYED], ids=["no key", "key"])
def test_all_tried_gives_none(make, environ):
    members = backends("a", "b", "c")
    assert make(Cluster(members)).choose(environ, members) is None


@pytest.mark.parametrize("make", ALL)
@pytest.mark.parametrize("environ", [{}, KEYED], ids=["no key", "key"])
def test_no_candidate_gives_none(make, environ):
    cluster = Cluster(backends("a", "b"))
    for backend in cluster.backends:
        cluster.set_state(backend, DOWN)
    assert make(cluster).choose(environ) is None


@pytest.mark.parametrize("make", ALL)
@pytest.mark.parametrize("environ", [{}, KEYED], ids=["no key", "key"])
def test_only_the_untried_one_is_left(make, environ):
    a, b, c = members = backends("a", "b", "c")
    strategy = make(Cluster(members))
    assert picks(strategy, 5, environ, tried=[a, c]) == [b] * 5


@pytest.mark.parametrize("make", ALL)
def test_never_picks_a_backend_out_of_rotation(make):
    a, b, c, d = members = backends("a", "b", "c", "d")
    cluster = Cluster(members)
    cluster.set_state(a, DOWN)
    cluster.hold(c)
    strategy = make(cluster)
    environs = [{"HTTP_X_KEY": f"user{i}"} for i in range(200)] + [{}] * 10
    assert {strategy.choose(environ) for environ in environs} == {b, d}


# -- round robin ---------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_round_robin_rotates_exactly(count):
    members = backends(*"abcdefg"[:count])
    strategy = RoundRobin(Cluster(members))
    assert picks(strategy, 3 * count) == members * 3


def test_round_robin_rotates_exactly_across_threads():
    a, b, c = members = backends("a", "b", "c")
    strategy = RoundRobin(Cluster(members))
    assert picks_in_threads(strategy, 8, 300) == {a: 800, b: 800, c: 800}


def test_round_robin_skips_tried():
    a, b, c = members = backends("a", "b", "c")
    strategy = RoundRobin(Cluster(members))
    chosen = picks(strategy, 10, tried=[b])
    assert b not in chosen
    assert collections.Counter(chosen) == {a: 5, c: 5}


def test_round_robin_rotates_over_the_rest_when_one_goes_down():
    a, b, c = members = backends("a", "b", "c")
    cluster = Cluster(members)
    strategy = RoundRobin(cluster)
    picks(strategy, 3)
    cluster.set_state(b, DOWN)
    assert collections.Counter(picks(strategy, 10)) == {a: 5, c: 5}


# -- smooth weighted round robin -----------------------------------------------


def test_weighted_is_smooth_as_nginx():
    strategy = WeightedRoundRobin(Cluster(backends("a", "b", "c", weights=[5, 1, 1])))
    assert names(picks(strategy, 14)) == "aabacaa" * 2


def test_weighted_proportions_hold_in_every_period():
    a, b, c = members = backends("a", "b", "c", weights=[1, 2, 3])
    strategy = WeightedRoundRobin(Cluster(members))
    chosen = picks(strategy, 6000)
    assert collections.Counter(chosen) == {a: 1000, b: 2000, c: 3000}
    # smooth: not only overall, but within every turn of 6
    for start in range(0, 6000, 6):
        assert collections.Counter(chosen[start : start + 6]) == {a: 1, b: 2, c: 3}


def test_weighted_proportions_hold_across_threads():
    a, b, c = members = backends("a", "b", "c", weights=[1, 2, 3])
    strategy = WeightedRoundRobin(Cluster(members))
    assert picks_in_threads(strategy, 8, 600) == {a: 800, b: 1600, c: 2400}


def test_weighted_respects_weights_after_one_goes_down():
    a, b, c = members = backends("a", "b", "c", weights=[1, 2, 3])
    cluster = Cluster(members)
    strategy = WeightedRoundRobin(cluster)
    picks(strategy, 6)
    cluster.set_state(c, DOWN)
    assert collections.Counter(picks(strategy, 300)) == {a: 100, b: 200}
    cluster.set_state(c, UP)
    assert collections.Counter(picks(strategy, 600)) == {a: 100, b: 200, c: 300}


def test_weighted_follows_a_weight_change():
    a, b = members = backends("a", "b")
    cluster = Cluster(members)
    strategy = WeightedRoundRobin(cluster)
    assert collections.Counter(picks(strategy, 100)) == {a: 50, b: 50}
    cluster.set_weight(a, 4)
    assert collections.Counter(picks(strategy, 500)) == {a: 400, b: 100}


def test_weighted_skips_tried():
    a, b, c = members = backends("a", "b", "c", weights=[5, 1, 1])
    strategy = WeightedRoundRobin(Cluster(members))
    chosen = picks(strategy, 12, tried=[a])
    assert collections.Counter(chosen) == {b: 6, c: 6}


def test_weighted_forgets_removed_backends():
    a, b, c = members = backends("a", "b", "c")
    cluster = Cluster(members)
    strategy = WeightedRoundRobin(cluster)
    picks(strategy, 4)
    cluster.remove(b)
    # what b leaves behind skews the next few picks, as in nginx, then evens out
    assert collections.Counter(picks(strategy, 100)) in ({a: 50, c: 50}, {a: 49, c: 51})
    assert set(strategy._current) == {a, c}  # no leak as instances come and go


# -- least connections ---------------------------------------------------------


def test_least_connections_picks_the_fewest_in_flight():
    a, b, c = members = backends("a", "b", "c")
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
    strategy = LeastConnections(Cluster(members))
    assert picks(strategy, 6) == [b] * 6
    b.in_flight = 4
    assert picks(strategy, 6) == [c] * 6


def test_least_connections_ties_take_turns():
    members = backends("a", "b", "c")
    for backend in members:
        backend.in_flight = 2
    strategy = LeastConnections(Cluster(members))
    assert picks(strategy, 9) == members * 3


def test_least_connections_shares_between_the_idle_ones():
    a, b, c = members = backends("a", "b", "c")
    a.in_flight = 5
    chosen = collections.Counter(picks(LeastConnections(Cluster(members)), 30))
    assert set(chosen) == {b, c}
    assert min(chosen.values()) >= 10


def test_least_connections_skips_tried():
    a, b, c = members = backends("a", "b", "c")
    a.in_flight, b.in_flight, c.in_flight = 5, 0, 1
    strategy = LeastConnections(Cluster(members))
    assert picks(strategy, 3, tried=[b]) == [c] * 3


# -- power of two choices ------------------------------------------------------


def test_p2c_never_picks_the_busiest_when_two_are_idle():
    a, b, c = members = backends("a", "b", "c")
    a.in_flight = 10
    strategy = PowerOfTwoChoices(Cluster(members), rng=random.Random(1))
    chosen = collections.Counter(picks(strategy, 1000))
    assert a not in chosen
    # the idle ones share the work (each pair holding both wins half the time)
    assert 400 <= chosen[b] <= 600


def test_p2c_spreads_over_idle_backends():
    members = backends("a", "b", "c", "d")
    strategy = PowerOfTwoChoices(Cluster(members), rng=random.Random(7))
    chosen = collections.Counter(picks(strategy, 4000))
    assert set(chosen) == set(members)
    assert all(800 <= count <= 1200 for count in chosen.values())


def test_p2c_is_deterministic_with_a_seeded_random():
    members = backends("a", "b", "c", "d")
    first = PowerOfTwoChoices(Cluster(members), rng=random.Random(3))
    second = PowerOfTwoChoices(Cluster(members), rng=random.Random(3))
    assert picks(first, 50) == picks(second, 50)


def test_p2c_with_two_always_takes_the_less_busy():
    a, b = members = backends("a", "b")
    b.in_flight = 1
    strategy = PowerOfTwoChoices(Cluster(members), rng=random.Random(1))
    assert picks(strategy, 20) == [a] * 20


def test_p2c_with_one_candidate_takes_it():
    (a,) = members = backends("a")
    a.in_flight = 100
    assert PowerOfTwoChoices(Cluster(members)).choose({}) is a


# -- consistent hashing: the key -----------------------------------------------


@pytest.mark.parametrize(
    "spec, environ, key",
    [
        pytest.param("client", {"REMOTE_ADDR": "10.0.0.7"}, "10.0.0.7", id="client"),
        pytest.param("client", {}, None, id="client missing"),
        pytest.param("path", {"PATH_INFO": "/a/b"}, "/a/b", id="path"),
        pytest.param("path", {}, None, id="path missing"),
        pytest.param("header:X-User", {"HTTP_X_USER": "alice"}, "alice", id="header"),
        pytest.param(
            "header:x-user", {"HTTP_X_USER": "alice"}, "alice", id="header any case"
        ),
        pytest.param("header:X-User", {}, None, id="header missing"),
        pytest.param(
            "header:Content-Type",
            {"CONTENT_TYPE": "text/plain", "HTTP_CONTENT_TYPE": "wrong"},
            "text/plain",
            id="content-type has no HTTP_ prefix",
        ),
        pytest.param(
            "header:Content-Length",
            {"CONTENT_LENGTH": "12"},
            "12",
            id="content-length has no HTTP_ prefix",
        ),
        pytest.param(
            "cookie:session", {"HTTP_COOKIE": "session=abc"}, "abc", id="cookie"
        ),
        pytest.param(
            "cookie:session",
            {"HTTP_COOKIE": "theme=dark; session=abc; lang=en"},
            "abc",
            id="cookie among others",
        ),
        pytest.param(
            "cookie:session",
            {"HTTP_COOKIE": " theme = dark ;session = abc "},
            "abc",
            id="cookie with spaces",
        ),
        pytest.param(
            "cookie:session",
            {"HTTP_COOKIE": 'prefs={"a": 1, "b": "x y"}; session=abc'},
            "abc",
            id="cookie after a malformed one",
        ),
        pytest.param(
            "cookie:session",
            {"HTTP_COOKIE": "flag; bad@name=1; session=abc"},
            "abc",
            id="cookie after one without a value and a bad name",
        ),
        pytest.param(
            "cookie:path",
            {"HTTP_COOKIE": "path=/x"},
            "/x",
            id="cookie named like an attribute",
        ),
        pytest.param(
            "cookie:session",
            {"HTTP_COOKIE": "sessionid=abc; old_session=def; x=session"},
            None,
            id="cookie name only inside others",
        ),
        pytest.param(
            "cookie:session",
            {"HTTP_COOKIE": "session"},
            None,
            id="cookie malformed, no value",
        ),
        pytest.param(
            "cookie:session", {"HTTP_COOKIE": ""}, None, id="cookie header empty"
        ),
        pytest.param("cookie:session", {}, None, id="cookie header missing"),
    ],
)
def test_key_function(spec, environ, key):
    assert key_function(spec)(environ) == key


@pytest.mark.parametrize(
    "spec",
    ["", "ip", "Client", "client:x", "path:x", "cookie", "cookie:", "header:"],
)
def test_key_function_rejects_a_bad_spec(spec):
    with pytest.raises(ValueError, match=f"^{spec!r} is not a hash key; expected"):
        key_function(spec)


# -- consistent hashing: the ring ----------------------------------------------


def keyed(count=2000):
    return [{"HTTP_X_KEY": f"user-{i}"} for i in range(count)]


def placement(strategy, environs):
    return [strategy.choose(environ) for environ in environs]


def test_hash_same_key_same_backend():
    strategy = ConsistentHash(Cluster(backends(*"abcde")), hash_key="header:X-Key")
    environs = keyed(200)
    first = placement(strategy, environs)
    assert placement(strategy, environs) == first
    assert len(set(first)) == 5  # and the keys do spread


def test_hash_spreads_keys_evenly_enough():
    members = backends(*"abcde")
    strategy = ConsistentHash(Cluster(members), hash_key="header:X-Key")
    shares = collections.Counter(placement(strategy, keyed()))
    assert all(250 <= shares[b] <= 550 for b in members), shares


def test_hash_removing_one_moves_only_its_keys():
    members = backends(*"abcde")
    cluster = Cluster(members)
    strategy = ConsistentHash(cluster, hash_key="header:X-Key")
    environs = keyed()
    before = placement(strategy, environs)  # the ring is built and cached
    gone = members[2]
    cluster.remove(gone)
    after = placement(strategy, environs)
    moved = [i for i in range(len(environs)) if before[i] is not after[i]]
    assert gone not in after
    assert all(before[i] is gone for i in moved)
    assert moved == [i for i in range(len(environs)) if before[i] is gone]
    assert 0.12 <= len(moved) / len(environs) <= 0.28  # about 1/5


def test_hash_adding_one_moves_about_one_in_n_plus_one():
    members = backends(*"abcde")
    cluster = Cluster(members[:4])
    strategy = ConsistentHash(cluster, hash_key="header:X-Key")
    environs = keyed()
    before = placement(strategy, environs)
    cluster.add(members[4])
    after = placement(strategy, environs)
    moved = [i for i in range(len(environs)) if before[i] is not after[i]]
    assert all(after[i] is members[4] for i in moved)
    assert 0.12 <= len(moved) / len(environs) <= 0.28  # about 1/5


def test_hash_down_backend_keys_go_elsewhere_and_come_back():
    members = backends(*"abcd")
    cluster = Cluster(members)
    strategy = ConsistentHash(cluster, hash_key="header:X-Key")
    environs = keyed(500)
    before = placement(strategy, environs)
    down = members[1]
    cluster.set_state(down, DOWN)
    during = placement(strategy, environs)
    assert down not in during
    assert all(during[i] is before[i] for i in range(500) if before[i] is not down)
    cluster.set_state(down, UP)
    assert placement(strategy, environs) == before


def test_hash_tried_goes_to_the_next_on_the_ring():
    members = backends(*"abcd")
    cluster = Cluster(members)
    strategy = ConsistentHash(cluster, hash_key="header:X-Key")
    environs = keyed(100)
    home = placement(strategy, environs)
    for environ, backend in zip(environs, home, strict=True):
        retry = strategy.choose(environ, [backend])
        cluster.hold(backend)
        assert retry is strategy.choose(environ) is not backend
        cluster.hold(backend, False)


def test_hash_follows_a_weight_change():
    a, b, c = members = backends("a", "b", "c")
    cluster = Cluster(members)
    strategy = ConsistentHash(cluster, hash_key="header:X-Key")
    environs = keyed()
    before = collections.Counter(placement(strategy, environs))
    cluster.set_weight(a, 3)
    after = collections.Counter(placement(strategy, environs))
    assert before[a] < 800 < 1000 < after[a]


def test_hash_builds_again_after_a_change_during_the_build():
    a, b, late = backends("a", "b", "late")
    cluster = Cluster([a, b])
    strategy = ConsistentHash(cluster, hash_key="header:X-Key")

    class AddsWhileRead(list):
        """Another thread adds an instance while the ring is built."""

        def __iter__(self):
            if not self.added:
                self.added = True
                cluster.add(late)
            return super().__iter__()

    cluster.candidates()
    cluster.backends = AddsWhileRead(cluster.backends)
    cluster.backends.added = False
    strategy.choose(KEYED)  # built from a and b, while late arrives
    assert late in placement(strategy, keyed(200))


def test_hash_ring_is_built_once_per_version():
    cluster = Cluster(backends("a", "b"))
    strategy = ConsistentHash(cluster, hash_key="header:X-Key")
    strategy.choose(KEYED)
    ring = strategy._ring
    strategy.choose(KEYED)
    # as a thread that waited for the lock while another built it would
    assert strategy._build() is ring
    cluster.add(Backend("http://127.0.0.1:9", name="c"))
    strategy.choose(KEYED)
    assert strategy._ring is not ring


@pytest.mark.parametrize(
    "home_in_flight, moves",
    [
        pytest.param(0, False, id="idle"),
        pytest.param(4, False, id="as busy as the others"),
        pytest.param(6, False, id="busier but under the bound"),
        pytest.param(7, True, id="at the bound"),
        pytest.param(50, True, id="far over"),
    ],
)
def test_hash_bounded_loads(home_in_flight, moves):
    members = backends("a", "b", "c")
    cluster = Cluster(members)
    strategy = ConsistentHash(cluster, hash_key="header:X-Key", hash_balance=1.25)
    home = strategy.choose(KEYED)
    cluster.hold(home)
    next_on_ring = strategy.choose(KEYED)
    cluster.hold(home, False)
    for backend in members:
        backend.in_flight = 4
    # the bound is ceil(1.25 * (in flight + 1) / 3): 7 once home has 7
    home.in_flight = home_in_flight
    assert strategy.choose(KEYED) is (next_on_ring if moves else home)


def test_hash_keeps_a_key_home_however_loaded_by_default():
    members = backends("a", "b", "c")
    strategy = ConsistentHash(Cluster(members), hash_key="header:X-Key")
    home = strategy.choose(KEYED)
    for backend in members:
        backend.in_flight = 0
    home.in_flight = 1000
    assert placement(strategy, [KEYED] * 20) == [home] * 20


def test_hash_takes_the_least_loaded_when_all_are_over_the_bound():
    a, b, c = members = backends("a", "b", "c")
    a.in_flight, b.in_flight, c.in_flight = 3, 2, 3
    strategy = ConsistentHash(
        Cluster(members), hash_key="header:X-Key", hash_balance=0.5
    )
    assert placement(strategy, keyed(50)) == [b] * 50


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param({}, id="no key"),
        pytest.param({"HTTP_X_KEY": ""}, id="empty key"),
    ],
)
def test_hash_without_a_key_is_round_robin(environ):
    members = backends("a", "b", "c")
    strategy = ConsistentHash(Cluster(members), hash_key="header:X-Key")
    assert picks(strategy, 9, environ) == members * 3


def test_hash_key_may_hold_any_character():
    members = backends("a", "b")
    strategy = ConsistentHash(Cluster(members), hash_key="header:X-Key")
    assert strategy.choose({"HTTP_X_KEY": "caf\xe9 \ud800"}) in members


# -- make_strategy -------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kind",
    [
        pytest.param("round_robin", RoundRobin, id="round_robin"),
        pytest.param("weighted_round_robin", WeightedRoundRobin, id="weighted"),
        pytest.param("least_connections", LeastConnections, id="least_connections"),
        pytest.param("p2c", PowerOfTwoChoices, id="p2c"),
        pytest.param("hash", ConsistentHash, id="hash"),
    ],
)
def test_make_strategy(name, kind):
    cluster = Cluster(backends("a"))
    strategy = make_strategy(name, cluster)
    assert type(strategy) is kind
    assert strategy.cluster is cluster
    assert strategy.choose({"REMOTE_ADDR": "10.0.0.1"}) is cluster.backends[0]


def test_make_strategy_knows_every_listed_name():
    for name in STRATEGIES:
        make_strategy(name, Cluster())


def test_make_strategy_passes_options():
    cluster = Cluster(backends("a", "b"))
    hashed = make_strategy("hash", cluster, hash_key="path", hash_balance=2.0)
    assert hashed.balance == 2.0
    assert hashed.key({"PATH_INFO": "/x"}) == "/x"
    rng = random.Random(5)
    assert make_strategy("p2c", cluster, rng=rng)._random is rng


def test_make_strategy_rejects_an_option_the_strategy_does_not_take():
    with pytest.raises(TypeError):
        make_strategy("round_robin", Cluster(), hash_key="path")


def test_make_strategy_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="^'random' is not a strategy; expected one"):
        make_strategy("random", Cluster())
