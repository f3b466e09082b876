"""The queue at the dispatcher: requests waiting for an instance with room.

When every instance a request may go to has ``max_in_flight`` requests in
flight, the request waits here, in arrival order, rather than inside an
instance's waitress where nobody sees it and nothing times it out (HAProxy's
per-server ``maxconn`` with ``timeout queue`` is the model). A slot freed by
an exchange that ends is handed straight to the first waiter that may use
it, so a request arriving meanwhile cannot overtake the queue.

A request that may go to any instance waits before it has a thread: the
server parks it (:meth:`RequestQueue.park`) and hands it to a thread only
once a slot is taken for it, so a queue costs neither a thread per waiter
nor the wake-up of one. Under caps every such request takes its slot there,
even one that need not wait: were its thread left to take one, it could
find none, and threads asleep for slots held by parked requests that wait
for a thread would stall both until the queue's timeout.

A request bound to one instance (sticky, hashed), or retried on another,
is chosen for with its environ, on its thread, and waits there
(:meth:`RequestQueue.wait`), its thread asleep on a lock. The dispatcher's
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
# The thread that times parked requests stops after this long without any.
_KEEPER_IDLE = 5.0


class Waiter:
    """One request in the queue: what it waits for, and what it got."""

    __slots__ = (
        "want",
        "tried",
        "backend",
        "gone",
        "refused",
        "asleep",
        "resume",
        "started",
        "cluster",
    )

    def __init__(self, want: Backend | None, tried, resume=None):
        #: The one instance it must go to (pinned, or its hash's), or None.
        self.want = want
        #: Instances it already failed on: not offered again.
        self.tried = tried
        self.backend: Backend | None = None
        self.gone = False
        #: Why a parked request was refused without waiting (FULL, CLOSED).
        self.refused: str | None = None
        #: For a parked request, called with the waiter when its wait ends.
        self.resume = resume
        self.started = perf_counter()
        if resume is None:
            # Held while it waits; released to wake it. A bare lock is the
            # cheapest way to hand a thread something (an Event builds a
            # Condition and a lock per wait on top of one).
            self.asleep = threading.Lock()
            self.asleep.acquire()

    def abandon(self) -> None:
        """The parked request will not use the slot taken for it (its client
        left, or it is refused): the slot goes back, once."""
        backend, self.backend = self.backend, None
        if backend is not None:
            self.cluster.release(backend)

    @property
    def done(self) -> bool:
        return self.backend is not None or self.gone


class RequestQueue:
    """At most ``size`` requests waiting, each at most ``timeout`` seconds."""

    def __init__(self, size: int = 100, timeout: float = 10.0):
        self.size = size
        self.timeout = timeout
        self._waiters: collections.deque[Waiter] = collections.deque()
        # The parked ones among them, oldest first, and the thread that
        # ends their waits on time (started with the first one).
        self._parked: collections.deque[Waiter] = collections.deque()
        self._lock = threading.Lock()
        self._keeper: threading.Thread | None = None
        self._keeper_wakes = threading.Condition(self._lock)
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
        started = waiter.started
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

    def park(self, cluster: Cluster, resume, choose) -> bool:
        """Take a request that may go to any instance before it has a thread,
        so that its thread never waits: when the instances have caps, a slot
        is taken for it now if one is free (on ``choose()``, the balancing
        strategy's pick), else it waits here. ``resume(waiter)`` is called
        once, with the slot taken or the reason it got none (see
        :meth:`outcome`). False, and nothing kept, when there are no caps
        (a slot is always free) or no instance at all: its thread then
        chooses, or refuses, itself."""
        if not cluster.capped or not cluster.untried(()):
            return False  # the common case, without the lock
        waiter = Waiter(None, (), resume)
        waiter.cluster = cluster
        with self._lock:
            if not self._waiters and self._take_now(cluster, choose, waiter):
                pass  # not queued: neither counted nor timed as a wait
            elif self.closed:  # a stop refuses only what would wait
                waiter.refused = CLOSED
            elif len(self._waiters) >= self.size:
                self.rejected += 1
                waiter.refused = FULL
            else:
                self._queue_parked(cluster, waiter)
                return True
        resume(waiter)
        return True

    def _take_now(self, cluster: Cluster, choose, waiter: Waiter) -> bool:
        # Threads retrying elsewhere take slots without the lock: the pick
        # may be full by the time it is taken.
        for _ in range(3):
            backend = choose()
            if backend is None:
                return False
            if cluster.take(backend):
                waiter.backend = backend
                return True
        return False

    def _queue_parked(self, cluster: Cluster, waiter: Waiter) -> None:
        self._waiters.append(waiter)
        self._parked.append(waiter)
        if self._keeper is None:
            self._keeper = threading.Thread(
                target=self._keep_time,
                args=(cluster,),
                name="pyramid_lb queue timer",
                daemon=True,
            )
            self._keeper.start()
        elif len(self._parked) == 1:
            self._keeper_wakes.notify()  # it sleeps, with none to time
        # A slot freed before this one queued is not lost.
        self._serve(cluster, waiter)

    def outcome(self, waiter: Waiter) -> tuple[Backend | None, str | None]:
        """What a parked request's wait gave it, as :meth:`wait` says it."""
        if waiter.backend is not None:
            return waiter.backend, None
        if waiter.refused is not None:
            return None, waiter.refused
        if waiter.gone:
            return None, CLOSED if self.closed else GONE
        return None, TIMEOUT

    def _keep_time(self, cluster: Cluster) -> None:
        """End the waits of parked requests that ran out of time; look for
        slots now and then, as the threads of waiters do. Ends a few
        seconds after the last parked request left."""
        with self._lock:
            try:
                self._time_parked(cluster)
            finally:
                self._keeper = None  # the next park starts another

    def _time_parked(self, cluster: Cluster) -> None:
        idle_since = perf_counter()
        while True:
            now = perf_counter()
            if not self._parked:
                if now - idle_since > _KEEPER_IDLE:
                    return
                self._keeper_wakes.wait(_KEEPER_IDLE)
                continue
            first = self._parked[0]
            left = first.started + self.timeout - now
            if left <= 0:
                self.timeouts += 1
                self._end_wait(first)
                idle_since = now
                continue
            self._keeper_wakes.wait(min(left, _RECHECK))
            for waiter in list(self._parked):
                if not waiter.done:
                    self._serve(cluster, waiter)
            idle_since = perf_counter()

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
        if waiter.resume is not None:
            self.served += 1
        self._end_wait(waiter)

    def _let_go(self, waiter: Waiter) -> None:
        waiter.gone = True
        self._end_wait(waiter)

    def _end_wait(self, waiter: Waiter) -> None:
        """Out of the queue; its thread woken, or a parked request resumed
        (a thread waiter counts its own wait when it wakes)."""
        self._waiters.remove(waiter)
        if waiter.resume is None:
            waiter.asleep.release()
            return
        self._parked.remove(waiter)
        self._count(perf_counter() - waiter.started)
        waiter.resume(waiter)

    def _count(self, elapsed: float) -> None:
        self.buckets[bisect.bisect_left(WAIT_BUCKETS, elapsed)] += 1
        self.waited += elapsed
