"""Balancing strategies: which instance takes the next request.

Each strategy picks from the cluster's eligible instances (up, not
draining, not ejected, with room under their cap, slow start applied) and
skips the instances a retry already tried. Consistent hashing is the
exception: a key keeps to its instance, full or not (the request then
waits for it).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
import threading
from collections.abc import Sequence

from pyramid_lb.affinity_cookie import cookie_value
from pyramid_lb.dispatcher.cluster import Backend, Cluster


def _untried(candidates: Sequence[Backend], tried) -> Sequence[Backend]:
    return [b for b in candidates if b not in tried] if tried else candidates


class Strategy:
    """What every strategy shares."""

    def binds(self, environ) -> bool:
        """Whether the request belongs to the instance chosen for it (it then
        waits for that one's room rather than go elsewhere)."""
        return False


class RoundRobin(Strategy):
    """Each candidate in turn."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        # itertools.count is atomic under the GIL: no lock on the hot path
        self._next = itertools.count().__next__

    def choose(self, environ, tried=()) -> Backend | None:
        candidates = self.cluster.eligible(tried)
        if not candidates:
            return None
        return candidates[self._next() % len(candidates)]


class WeightedRoundRobin(Strategy):
    """Smooth weighted round robin, as nginx's: weights spread out evenly.

    With weights 5, 1, 1 the order is a a b a c a a, never a run of five.
    """

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self._current: dict[Backend, int] = {}
        self._version = cluster.version
        self._lock = threading.Lock()

    def choose(self, environ, tried=()) -> Backend | None:
        candidates = self.cluster.eligible(tried)
        if not candidates:
            return None
        with self._lock:
            current = self._current
            total = 0
            best = None
            best_weight = 0
            for backend in candidates:
                weight = current.get(backend, 0) + backend.weight
                current[backend] = weight
                total += backend.weight
                if best is None or weight > best_weight:
                    best, best_weight = backend, weight
            current[best] = best_weight - total
            if self._version != self.cluster.version:  # forget removed ones
                self._version = self.cluster.version
                members = set(self.cluster.backends)
                for backend in [b for b in current if b not in members]:
                    del current[backend]
        return best


class LeastConnections(Strategy):
    """The candidate with the fewest requests in flight; ties take turns."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self._next = itertools.count().__next__

    def choose(self, environ, tried=()) -> Backend | None:
        candidates = self.cluster.eligible(tried)
        count = len(candidates)
        if not count:
            return None
        start = self._next() % count
        best = None
        for index in range(start, start + count):
            backend = candidates[index % count]
            if best is None or backend.in_flight < best.in_flight:
                best = backend
        return best


class PowerOfTwoChoices(Strategy):
    """Two random candidates; the one with fewer requests in flight wins.

    Nearly as good as least connections, without every request looking at
    every instance, and without herding onto one that just became idle.
    """

    def __init__(self, cluster: Cluster, rng: random.Random | None = None):
        self.cluster = cluster
        self._random = rng or random.Random()

    def choose(self, environ, tried=()) -> Backend | None:
        candidates = self.cluster.eligible(tried)
        count = len(candidates)
        if count < 2:
            return candidates[0] if candidates else None
        first, second = self._random.sample(candidates, 2)
        return second if second.in_flight < first.in_flight else first


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def key_function(spec: str):
    """The request key named by ``spec``: client, path, cookie:NAME, header:NAME."""
    kind, _, name = spec.partition(":")
    if kind == "client" and not name:
        return lambda environ: environ.get("REMOTE_ADDR")
    if kind == "path" and not name:
        return lambda environ: environ.get("PATH_INFO")
    if kind == "header" and name:
        key = "HTTP_" + name.upper().replace("-", "_")
        if key in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
            key = key[5:]
        return lambda environ: environ.get(key)
    if kind == "cookie" and name:
        return lambda environ: cookie_value(environ.get("HTTP_COOKIE"), name)
    raise ValueError(
        f"{spec!r} is not a hash key; expected client, path, cookie:NAME or header:NAME"
    )


class ConsistentHash(Strategy):
    """Consistent hashing on a key of the request, bounded loads optional.

    Each instance owns ``points`` spots (times its weight) on a ring; a key
    goes to the first instance clockwise from its hash that may take
    requests, so adding or removing an instance moves only about 1/N of the
    keys. With ``hash_balance`` (a factor >= 1), an instance already carrying
    more than that many times the average load is passed over for the next
    one on the ring (Mirrokni, Thorup and Zadimoghaddam, 2016), so one hot
    key cannot swamp its instance; the price is that a key spills to an
    instance without the state its own built. Off by default, as HAProxy's
    ``hash-balance-factor``: users hash to keep a key on its instance.
    Requests without the key, or with an empty one, are balanced round
    robin: hashed, they would all land on one instance.
    """

    def __init__(
        self,
        cluster: Cluster,
        hash_key: str = "client",
        hash_balance: float | None = None,
        points: int = 100,
    ):
        self.cluster = cluster
        self.key = key_function(hash_key)
        self.balance = hash_balance
        self.points = points
        self._version = -1
        self._ring: tuple[list[int], list[Backend], int] = ([], [], 0)
        self._fallback = RoundRobin(cluster)
        self._lock = threading.Lock()

    def _build(self) -> tuple[list[int], list[Backend], int]:
        with self._lock:
            # The version is read before the members (the cluster replaces
            # them before bumping it): a change made during the build then
            # leaves the ring marked old, to be built again next time.
            version = self.cluster.version
            if self._version != version:
                spots = sorted(
                    (
                        (_hash64(f"{backend.name}#{i}".encode()), backend)
                        for backend in self.cluster.backends
                        for i in range(self.points * max(backend.weight, 1))
                    ),
                    key=lambda spot: spot[0],
                )
                owners = [b for _, b in spots]
                self._ring = ([h for h, _ in spots], owners, len(set(owners)))
                self._version = version
            return self._ring

    def binds(self, environ) -> bool:
        """A request with a key keeps to its instance, full or not."""
        return bool(self.key(environ))

    def choose(self, environ, tried=()) -> Backend | None:
        key = self.key(environ)
        if not key:
            return self._fallback.choose(environ, tried)
        candidates = _untried(self.cluster.candidates(), tried)
        if not candidates:
            return None
        ring = self._ring if self._version == self.cluster.version else self._build()
        hashes, owners, distinct = ring
        allowed = set(candidates)
        if self.balance is None:
            bound = math.inf
        else:
            load = sum(b.in_flight for b in candidates) + 1
            bound = math.ceil(self.balance * load / len(candidates))
        size = len(owners)
        index = bisect.bisect(hashes, _hash64(key.encode("utf-8", "surrogatepass")))
        seen = set()
        # Every owner turns up within one turn of the ring, so this ends.
        while len(seen) < distinct:
            backend = owners[index % size]
            index += 1
            if backend in seen:
                continue
            if backend in allowed and backend.in_flight < bound:
                return backend
            seen.add(backend)
        # every candidate is at its bound (balance < 1) or not yet on the
        # ring: the least loaded one
        return min(candidates, key=lambda b: b.in_flight)


#: Every strategy by its name in ``strategy = ...``.
STRATEGIES = {
    "round_robin": RoundRobin,
    "weighted_round_robin": WeightedRoundRobin,
    "least_connections": LeastConnections,
    "p2c": PowerOfTwoChoices,
    "hash": ConsistentHash,
}


def make_strategy(name: str, cluster: Cluster, **options):
    """The strategy called ``name`` (one of :data:`STRATEGIES`).

    ``options`` go to it as they are: one it does not take is a TypeError,
    not silently ignored.
    """
    try:
        kind = STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"{name!r} is not a strategy; expected one of {', '.join(STRATEGIES)}"
        ) from None
    return kind(cluster, **options)
