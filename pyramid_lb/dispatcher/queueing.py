"""The queue at the dispatcher: requests waiting for an instance with room.

When every instance a request may go to has ``max_in_flight`` requests in
flight, the request waits here, in arrival order, rather than inside an
instance's waitress where nobody sees it and nothing times it out (HAProxy's
per-server ``maxconn`` with ``timeout queue`` is the model). A slot freed by
an exchange that ends is handed straight to the first waiter that may use
it, so a request arriving meanwhile cannot overtake the queue.

A waiter blocks its thread on a lock, it does not poll; the dispatcher's
own ``/_lb/`` endpoints have threads of their own (see
:mod:`pyramid_lb.server`), so a full queue cannot keep them from answering.
"""

from __future__ import annotations

import bisect
import collections
import random
import threading
from time import perf_counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyramid_lb.dispatcher.cluster import Backend, Cluster

#: Upper bounds of the histogram of time spent waiting, in seconds.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# Why a wait ended without an instance.
FULL = "full"  # queue_size requests were waiting already
TIMEOUT = "timeout"  # no slot within queue_timeout
GONE = "gone"  # the instance waited for left rotation, or every instance did
CLOSED = "closed"  # the dispatcher is stopping: it sends no more requests

# Waiters look again this often, in case a slot came free without a word
# (an ejection that ran out): a safety net, not how they are served.
_RECHECK = 0.5


class Waiter:
    """One request in the queue: what it waits for, and what it got."""

    __slots__ = ("want", "tried", "backend", "gone", "asleep")

    def __init__(self, want: Backend | None, tried):
        #: The one instance it must go to (pinned, or its hash's), or None.
        self.want = want
        #: Instances it already failed on: not offered again.
        self.tried = tried
        self.backend: Backend | None = None
        self.gone = False
        # Held while it waits; released to wake it. A bare lock is the
        # cheapest way to hand a thread something (an Event builds a
        # Condition and a lock per wait on top of one).
        self.asleep = threading.Lock()
        self.asleep.acquire()

    @property
    def done(self) -> bool:
        return self.backend is not None or self.gone


class RequestQueue:
    """At most ``size`` requests waiting, each at most ``timeout`` seconds."""

    def __init__(self, size: int = 100, timeout: float = 10.0):
        self.size = size
        self.timeout = timeout
        self._waiters: collections.deque[Waiter] = collections.deque()
        self._lock = threading.Lock()
        # for the stats
        self.served = 0  # waited, then sent
        self.timeouts = 0
        self.rejected = 0  # found the queue full
        self.buckets = [0] * (len(WAIT_BUCKETS) + 1)
        self.waited = 0.0  # seconds, all waits together
        self.closed = False

    @property
    def depth(self) -> int:
        """Requests waiting now."""
        return len(self._waiters)

    def wait(
        self, cluster: Cluster, want: Backend | None, tried
    ) -> tuple[Backend | None, str | None]:
        """Wait for a slot on ``want`` (or, without it, on any candidate not
        in ``tried``); ``(backend, None)`` with the slot taken, or ``(None,
        why)``: :data:`FULL`, :data:`TIMEOUT`, :data:`GONE` or :data:`CLOSED`."""
        waiter = Waiter(want, tried)
        started = perf_counter()
        with self._lock:
            if self.closed:
                return None, CLOSED
            if len(self._waiters) >= self.size:
                self.rejected += 1
                return None, FULL
            self._waiters.append(waiter)
            # A slot freed before this one queued is not lost.
            self._serve(cluster, waiter)
        deadline = started + self.timeout
        while not waiter.done:
            left = deadline - perf_counter()
            if left <= 0:
                break
            if not waiter.asleep.acquire(timeout=min(left, _RECHECK)):
                with self._lock:
                    if not waiter.done:
                        self._serve(cluster, waiter)
        with self._lock:
            if not waiter.done:
                self._waiters.remove(waiter)
                self.timeouts += 1
            self._count(perf_counter() - started)
            if waiter.backend is not None:
                self.served += 1
                return waiter.backend, None
        if waiter.gone:
            return None, CLOSED if self.closed else GONE
        return None, TIMEOUT

    def offer(self, cluster: Cluster, backend: Backend) -> None:
        """A slot came free on ``backend``: the first waiter that may use it
        gets it."""
        with self._lock:
            candidate = backend in cluster.candidates()
            bound = candidate or cluster.keeps_pinned(backend)
            # In its slow start, an instance takes only its share of the
            # requests that could go anywhere.
            share = cluster.share(backend)
            welcome = candidate and (share >= 1 or random.random() < share)
            for waiter in self._waiters:
                wanted = waiter.want
                if (wanted is backend and bound) or (
                    wanted is None and welcome and backend not in waiter.tried
                ):
                    if cluster.take(backend):
                        self._hand(waiter, backend)
                    return

    def kick(self, cluster: Cluster) -> None:
        """The instances changed (one came up, left, was released): serve
        every waiter that can be served now, and let go of those whose
        instance left."""
        if not self._waiters:
            return
        with self._lock:
            for waiter in list(self._waiters):
                self._serve(cluster, waiter)

    def _serve(self, cluster: Cluster, waiter: Waiter) -> None:
        """Give ``waiter`` a slot if one is free for it (the lock is held)."""
        candidates = cluster.candidates()
        wanted = waiter.want
        if wanted is not None:
            if wanted not in candidates and not cluster.keeps_pinned(wanted):
                self._let_go(waiter)
            elif cluster.take(wanted):
                self._hand(waiter, wanted)
            return
        if not cluster.untried(waiter.tried):
            self._let_go(waiter)
            return
        for backend in cluster.eligible(waiter.tried):
            if cluster.take(backend):
                self._hand(waiter, backend)
                return

    def close(self) -> None:
        """The dispatcher stops: every waiter, and every later request that
        would wait, is let go at once (to be answered 503), rather than cut
        off when the stop's grace time runs out."""
        with self._lock:
            self.closed = True
            for waiter in list(self._waiters):
                self._let_go(waiter)

    def _hand(self, waiter: Waiter, backend: Backend) -> None:
        waiter.backend = backend
        self._waiters.remove(waiter)
        waiter.asleep.release()

    def _let_go(self, waiter: Waiter) -> None:
        waiter.gone = True
        self._waiters.remove(waiter)
        waiter.asleep.release()

    def _count(self, elapsed: float) -> None:
        self.buckets[bisect.bisect_left(WAIT_BUCKETS, elapsed)] += 1
        self.waited += elapsed
