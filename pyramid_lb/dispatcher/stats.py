"""What the dispatcher counts per instance: status classes and latencies.

Counting is cheap on purpose (a few integer additions under the lock a
request takes anyway); percentiles, totals and the Prometheus text are
worked out only when someone asks.
"""

from __future__ import annotations

import bisect
import collections

#: Upper bounds of the latency histogram, in seconds (Prometheus's defaults).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
#: Status classes counted: 0 is "no answer" (the exchange failed).
CLASSES = ("failed", "1xx", "2xx", "3xx", "4xx", "5xx")
#: Latencies kept per instance for its percentiles.
RECENT = 1024


class Tally:
    """Counts for one instance (or for requests no instance answered)."""

    __slots__ = ("classes", "buckets", "seconds", "recent")

    def __init__(self):
        self.classes = [0] * len(CLASSES)
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.seconds = 0.0
        self.recent: collections.deque[float] = collections.deque(maxlen=RECENT)

    def add(self, status: int, elapsed: float) -> None:
        """Count one exchange; the caller holds the lock that guards it."""
        self.classes[status // 100 if 100 <= status < 600 else 0] += 1
        self.buckets[bisect.bisect_left(BUCKETS, elapsed)] += 1
        self.seconds += elapsed
        self.recent.append(elapsed)

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
