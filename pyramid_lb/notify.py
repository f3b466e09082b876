"""Telling systemd how the dispatcher is doing: the sd_notify protocol.

The protocol is one datagram of ``NAME=value`` lines to the ``AF_UNIX``
socket named by ``$NOTIFY_SOCKET`` (``@name``: an abstract socket), so it is
implemented here directly rather than with a dependency. Without the
variable nothing is sent. A failure to send never stops the dispatcher: the
service manager may be gone, or the socket full; it is logged once, at debug
level, and later messages are tried all the same.

:class:`Notifier` turns the dispatcher's life into the messages
``Type=notify`` expects: ``READY=1`` once the first instance takes requests
and the dispatcher serves, ``STATUS=N/M instances ready`` as that changes,
``RELOADING=1`` and ``READY=1`` around a rolling restart, ``STOPPING=1``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import MutableMapping

log = logging.getLogger("pyramid_lb.dispatcher")

ENV = "NOTIFY_SOCKET"

#: How long a send may wait for room in the socket's queue.
SEND_TIMEOUT = 1.0


def socket_address(name: str) -> str | None:
    """The ``AF_UNIX`` address of ``$NOTIFY_SOCKET`` ``name``, None if it has
    none (empty, or a kind of socket this module does not speak, such as
    ``vsock:``)."""
    if name.startswith("@"):
        return "\0" + name[1:]  # Linux's abstract namespace
    if name.startswith("/"):
        return name
    return None


def send(address: str, *assignments: str) -> None:
    """Send ``assignments`` (``"READY=1"``, ...) as one datagram to ``address``;
    raises OSError."""
    message = "\n".join(assignments).encode("utf-8", "replace")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(SEND_TIMEOUT)
        s.sendto(message, address)


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, as ``MONOTONIC_USEC=`` wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """The dispatcher's messages to systemd, or none without a socket.

    ``name`` is ``$NOTIFY_SOCKET``'s value (see :meth:`from_environ`). Safe
    to call from any thread, and from a signal handler: nothing here logs in
    the calling thread.
    """

    def __init__(self, name: str | None = None):
        self.name = name
        self.address = socket_address(name) if name else None
        self._lock = threading.RLock()  # a signal handler may re-enter
        self._serving = False
        self._ready = 0  # instances taking requests, as last told
        self._total = 0
        self._told_ready = False
        self._stopping = False
        self._complained = False
        if name and self.address is None:
            self._complain(f"{ENV}={name!r} is not a socket path or @name")

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] = os.environ) -> Notifier:
        """The notifier for ``$NOTIFY_SOCKET``, taken out of ``environ`` so
        that the instances the dispatcher spawns do not inherit it (with
        ``NotifyAccess=main`` systemd would refuse what they sent anyway)."""
        return cls(environ.pop(ENV, None) or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``assignments`` in one datagram; whether it was sent."""
        if self.address is None:
            return False
        try:
            send(self.address, *assignments)
        except OSError as exc:
            self._complain(f"cannot notify {self.name}: {exc}")
            return False
        return True

    def _complain(self, message: str) -> None:
        if self._complained:
            return
        self._complained = True
        # Logged from a thread of its own: the caller may be a signal handler
        # that interrupted a write to the log.
        threading.Thread(
            target=log.debug, args=("%s (said once)", message), daemon=True
        ).start()

    # -- the dispatcher's life ---------------------------------------------

    def serving(self) -> None:
        """The dispatcher accepts connections (or, without one, supervises):
        READY=1 as soon as an instance is ready too."""
        with self._lock:
            self._serving = True
            self._tell_ready()

    def instances_ready(self, ready: int, total: int) -> None:
        """``ready`` of ``total`` instances take requests now (a change)."""
        with self._lock:
            self._ready, self._total = ready, total
            if not (self._stopping or self._tell_ready()):
                self.notify(self._status())

    def _tell_ready(self) -> bool:
        """READY=1 the first time the dispatcher serves with an instance ready."""
        if self._told_ready or not (self._serving and self._ready):
            return False
        self._told_ready = True
        self.notify("READY=1", self._status())
        return True

    def _status(self, prefix: str = "") -> str:
        return f"STATUS={prefix}{self._ready}/{self._total} instances ready"

    def reloading(self) -> None:
        """A rolling restart starts."""
        with self._lock:
            if not self._stopping:
                self.notify(
                    "RELOADING=1",
                    f"MONOTONIC_USEC={monotonic_usec()}",
                    "STATUS=rolling restart",
                )

    def reloaded(self, outcome: str) -> None:
        """The rolling restart is over: ``outcome`` says how, in a few words."""
        with self._lock:
            if not self._stopping:
                self.notify("READY=1", self._status(f"rolling restart {outcome}; "))

    def stopping(self) -> None:
        """SIGTERM or SIGINT: the dispatcher stops (said once)."""
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self.notify("STOPPING=1", "STATUS=stopping")

    def failed(self, why: str) -> None:
        """The app does not start: why, for ``systemctl status``."""
        first = why.strip().splitlines()[0] if why.strip() else "failed"
        self.notify(f"STATUS={first}")
