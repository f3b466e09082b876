"""The one fake clock of the tests: a monotonic clock the test moves by hand."""


class Clock:
    """Pass it where code takes ``clock=time.monotonic``; move ``now``."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now
