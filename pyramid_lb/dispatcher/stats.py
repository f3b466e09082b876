"""What the dispatcher counts per instance: status classes and latencies.

Counting is cheap on purpose (a few integer additions under the lock a
request takes anyway); percentiles, totals and the Prometheus text are
worked out only when someone asks.
"""

from __future__ import annotations

import bisect
import collections
import time
from collections.abc import Callable

#: Upper bounds of the latency histogram, in seconds (Prometheus's defaults).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
#: Status classes counted: 0 is "no answer" (the exchange failed).
CLASSES = ("failed", "1xx", "2xx", "3xx", "4xx", "5xx")
#: Latencies kept per instance for its percentiles.
RECENT = 1024
#: Whole seconds of counts kept per instance, for the dashboard's chart.
KEEP = 60


class Tally:
    """Counts for one instance (or for requests no instance answered).

    Besides the totals, how many exchanges ended in each of the last
    :data:`KEEP` seconds (of ``clock``), so that the chart of requests per
    second counts exactly what the totals count.
    """

    __slots__ = ("classes", "buckets", "seconds", "recent", "_clock", "_per_second")

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.classes = [0] * len(CLASSES)
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.seconds = 0.0
        self.recent: collections.deque[float] = collections.deque(maxlen=RECENT)
        self._clock = clock
        #: slot -> [second, count], slots reused every KEEP + 1 seconds
        self._per_second = [[-1, 0] for _ in range(KEEP + 1)]

    def add(self, status: int, elapsed: float) -> None:
        """Count one exchange; the caller holds the lock that guards it."""
        self.classes[status // 100 if 100 <= status < 600 else 0] += 1
        self.buckets[bisect.bisect_left(BUCKETS, elapsed)] += 1
        self.seconds += elapsed
        self.recent.append(elapsed)
        now = int(self._clock())
        slot = self._per_second[now % (KEEP + 1)]
        if slot[0] == now:
            slot[1] += 1
        else:
            slot[0], slot[1] = now, 1

    def history(self, now: int | None = None) -> list[int]:
        """Exchanges ended in each of the :data:`KEEP` whole seconds before
        ``now`` (the clock's current second), oldest first."""
        now = int(self._clock()) if now is None else now
        counts = dict(self._per_second)
        return [counts.get(second, 0) for second in range(now - KEEP, now)]

    @property
    def count(self) -> int:
        return sum(self.classes)

    def percentiles(self, *fractions: float) -> list[float | None]:
        """Latency percentiles over the last exchanges, in seconds."""
        recent = sorted(self.recent)
        if not recent:
            return [None] * len(fractions)
        last = len(recent) - 1
        return [recent[round(fraction * last)] for fraction in fractions]
