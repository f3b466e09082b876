"""Life-cycle operations (reload, scale, restart, drain, enable), one at a time.

Two at once step on each other: a scale stopping an instance that a rolling
restart is about to replace leaves the rollout replacing an instance that
is gone, and counts of instances taken during a rollout include its
replacements. So an operation asked for while another runs is refused
(:class:`Busy`, a 409 for the admin) rather than queued: the operator sees
what is running and decides again once it is done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("pyramid_lb.dispatcher")


class Busy(RuntimeError):
    """Another operation is under way; the message says which and since when."""

    def __init__(self, running: str, since: float):
        super().__init__(
            f"{running} is under way (started {since:.0f}s ago); one life-cycle "
            "operation runs at a time: try again once it is done"
        )
        self.running = running


class Operations:
    """Who is changing the instances right now, if anyone.

    :meth:`claim` and :meth:`release` bracket an operation, and each logs a
    line: ``<what> started``, then ``<what> <outcome> in <seconds>s``.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self.running: str | None = None
        self._since = 0.0

    def claim(self, what: str) -> None:
        """Make ``what`` the operation under way, or raise :class:`Busy`."""
        with self._lock:
            if self.running is not None:
                raise Busy(self.running, self._clock() - self._since)
            self.running, self._since = what, self._clock()
        log.info("%s started", what)

    def release(self, outcome: str = "done") -> None:
        """End the operation under way, saying how it went."""
        with self._lock:
            what, elapsed = self.running, self._clock() - self._since
            self.running = None
        if what is not None:
            log.info("%s %s in %.1fs", what, outcome, elapsed)

    def run(self, what: str, work: Callable[[], bool], background: bool = False):
        """Claim ``what``, run ``work`` (in a thread of its own with
        ``background``), release. ``work`` returns whether it got to the end.

        Raises :class:`Busy` at once, in the caller's thread, when another
        operation runs. Returns ``work``'s result, or None in the background.
        """
        self.claim(what)

        def go() -> bool:
            finished = False
            try:
                finished = work()
                return finished
            except Exception:
                log.exception("%s failed", what)
                return False
            finally:
                self.release("done" if finished else "stopped")

        if not background:
            return go()
        threading.Thread(target=go, name="pyramid_lb-operation", daemon=True).start()
        return None
