"""Waitress's main loop on epoll, which wakes once per request, not three times.

Waitress's loop (``wasyncore.poll2``) builds a new poll set at every wake-up,
asking every connection whether it is ``readable()`` and ``writable()``,
and a worker wakes it with its trigger after every answer so that the
connection is polled again. With keep-alive clients that is three wake-ups
and three rebuilds per request, each as long as the list of connections.

:class:`EpollLoop` keeps each connection registered and changes a
registration only when what the connection wants changes:

- A connection stays registered for reading while a thread serves it. If
  bytes come meanwhile (a pipelined request, a close), it is *muted*: taken
  off reading until the thread is done, as waitress's loop would have left
  it out.
- A worker finishing an answer wakes the loop only when the loop has
  something to do for that connection: it was muted, it has bytes left to
  send, or it is to be closed (:meth:`EpollLoop.wake`, through the server's
  ``pull_trigger``). The common keep-alive answer wakes nothing.
- Every connection is looked at again after waitress's idle-connection
  sweep, which tells nobody what it marked, and every
  ``asyncore_loop_timeout`` seconds, as waitress's loop does at the
  latest, so that any other change nobody was told of is seen as soon.

What each connection is then asked to do is exactly what ``poll2`` would
ask of it: the same events, the same ``readable()``/``writable()`` tests,
the same handlers (``wasyncore.readwrite``). Where there is no epoll
(macOS, Windows), :class:`WasyncoreLoop` runs waitress's own loop.
"""

from __future__ import annotations

import select
import threading
import time
from collections import deque

from waitress import wasyncore
from waitress.channel import HTTPChannel


class Serving(threading.local):
    """What a server thread is doing (each thread sees its own)."""

    #: The connection it serves, for :meth:`EpollLoop.wake`.
    channel = None
    #: Whether it is ending an answer's exchange (see ``server.end_here``).
    ending = False
    #: The parked connection it runs once its own is served.
    next = None


serving = Serving()

if hasattr(select, "epoll"):
    READ = select.EPOLLIN | select.EPOLLPRI
    WRITE = select.EPOLLOUT
    # poll() reports these whatever was asked; wasyncore closes on them.
    TROUBLE = select.EPOLLERR | select.EPOLLHUP


class EpollLoop:
    """The main loop of the dispatchers in ``socket_map`` (waitress's map)."""

    def __init__(self, socket_map: dict, timeout: float):
        self.map = socket_map
        self.timeout = timeout
        self.epoll = select.epoll()
        #: fd -> (dispatcher, events it is registered for)
        self.registered: dict[int, tuple[object, int]] = {}
        #: Connections that had bytes to read while they could not take them.
        self.muted: set = set()
        #: Dispatchers to look at before the next wait (any thread adds).
        self.changed: deque = deque()
        self.rescan_due = 0.0
        self.rescan_asked = False
        self.servers: list = []  # listening sockets and triggers: every wake
        self.sweeps: dict = {}  # listener -> when its idle sweep is next due
        self.trigger = None

    def attach(self, listener) -> None:
        """Take the worker wake-ups of ``listener``'s connections."""
        listener.event_loop = self
        listener.pull_trigger = self.wake
        self.trigger = listener.trigger

    def step(self, timeout: float) -> None:
        """Wait at most ``timeout`` seconds, then handle what happened."""
        now = time.monotonic()
        if not (self.rescan_asked or now >= self.rescan_due):
            self.update_servers()
        if self.rescan_asked or now >= self.rescan_due:
            self.rescan(now)
        changed = self.changed
        while changed:
            self.update(changed.popleft())
        wait = max(0.0, min(timeout, self.rescan_due - now))
        socket_map, registered = self.map, self.registered
        for fd, events in self.epoll.poll(wait):
            obj = socket_map.get(fd)
            entry = registered.get(fd)
            if obj is None or entry is None or entry[0] is not obj:
                self.drop(fd)  # closed by nobody who told us
                continue
            self.dispatch(obj, events)
            self.update(obj)

    def update_servers(self) -> None:
        """Update the listeners and triggers, which any wake may change.

        A listener's ``readable()`` runs waitress's idle sweep when it is
        due, which marks connections to close without telling anyone: when
        a sweep has run, every connection is looked at now, as poll2 would.
        """
        sweeps = self.sweeps
        for obj in self.servers:
            self.update(obj)
            due = getattr(obj, "next_channel_cleanup", None)
            if sweeps.get(obj, due) != due:
                self.rescan_asked = True
            sweeps[obj] = due

    def dispatch(self, obj, events: int) -> None:
        """Hand ``obj`` the events ``poll2`` would have asked it for."""
        readable = obj.readable()
        # A hang-up too: reported at every wait, as bytes to read would be.
        if not readable and events & (READ | TROUBLE):
            # Set before looking again: a worker making it readable now
            # either sees the mute (and wakes us) or is seen here.
            self.muted.add(obj)
            readable = obj.readable()
            if readable:
                self.muted.discard(obj)
        writable = obj.writable() and not obj.accepting
        if not (readable or writable):
            return  # poll2 would not have polled it
        wanted = TROUBLE | (READ if readable else 0) | (WRITE if writable else 0)
        if events & wanted:
            wasyncore.readwrite(obj, events & wanted)

    def update(self, obj) -> None:
        """Register ``obj`` for what it wants now, if that changed."""
        fd = obj._fileno
        if fd is None or self.map.get(fd) is not obj:
            return  # closed
        readable = obj.readable()
        muted = self.muted
        if readable and obj in muted:
            muted.discard(obj)
        events = READ if readable or obj not in muted else 0
        if obj.writable() and not obj.accepting:
            events |= WRITE
        entry = self.registered.get(fd)
        if entry is not None and entry[0] is obj and entry[1] == events:
            return
        self.register(fd, obj, events)

    def register(self, fd: int, obj, events: int) -> None:
        entry = self.registered.get(fd)
        polled = entry is not None and entry[1] != 0
        if not events:
            # Not polled at all, as in poll2: a hang-up would be reported
            # even with no events asked for, at every wait.
            self.drop(fd)
            self.registered[fd] = (obj, 0)
            return
        epoll = self.epoll
        try:
            if polled:
                try:
                    epoll.modify(fd, events)
                except FileNotFoundError:  # closed and reused unannounced
                    epoll.register(fd, events)
            else:
                try:
                    epoll.register(fd, events)
                except FileExistsError:
                    epoll.modify(fd, events)
        except OSError:
            # A socket closed without leaving the map (waitress takes it out
            # first): look at everything at the next step.
            self.rescan_asked = True
            return
        self.registered[fd] = (obj, events)

    def drop(self, fd: int) -> None:
        entry = self.registered.pop(fd, None)
        if entry is None or entry[1] == 0:
            return  # not in the epoll set
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # already gone with its socket

    def rescan(self, now: float) -> None:
        """Look at every dispatcher in the map, and forget the closed ones."""
        self.rescan_asked = False
        self.rescan_due = now + self.timeout
        socket_map = self.map
        # list() in one C call: a worker closing its connection (a failed
        # "100 Continue") may drop a registration meanwhile.
        for fd in [fd for fd in list(self.registered) if fd not in socket_map]:
            self.drop(fd)
        self.muted.intersection_update(socket_map.values())
        servers = []
        for obj in list(socket_map.values()):
            if not isinstance(obj, HTTPChannel):  # a listener, a trigger
                servers.append(obj)
            self.update(obj)
        self.servers = servers

    def added(self, channel) -> None:
        """A connection was accepted: register it before the next wait."""
        self.changed.append(channel)

    def removed(self, fd: int, channel) -> None:
        """A connection is being closed (its socket still open)."""
        self.muted.discard(channel)
        entry = self.registered.get(fd)
        if entry is not None and entry[0] is channel:
            self.drop(fd)

    def wake(self) -> None:
        """A worker changed its connection: wake the loop if it has to act.

        Called as the server's ``pull_trigger``, from worker threads: after
        an answer, when bytes are left for the loop to send, when the
        connection is to be closed.
        """
        channel = serving.channel
        if channel is None:
            self.rescan_asked = True  # by someone else: look at everything
        elif (
            channel in self.muted
            or channel.total_outbufs_len
            or channel.will_close
            or channel.close_when_flushed
        ):
            self.changed.append(channel)
        else:
            return  # still registered for its next request: nothing to do
        self.trigger.pull_trigger()

    def reset(self) -> None:
        """Forget every registration; the next step makes them again.

        For a graceful stop: the signal that started it may have come
        between an ``epoll_ctl()`` and the note of it in ``registered``.
        """
        self.epoll.close()
        self.epoll = select.epoll()
        self.registered.clear()
        self.rescan_asked = True

    def close(self) -> None:
        self.epoll.close()
        self.registered.clear()
        self.muted.clear()


class WasyncoreLoop:
    """Waitress's own loop, where there is no epoll."""

    def __init__(self, socket_map: dict, timeout: float, use_poll: bool = True):
        self.map = socket_map
        self.use_poll = use_poll

    def attach(self, listener) -> None:
        listener.event_loop = self

    def added(self, channel) -> None:
        pass  # waitress's loop asks every connection at every wake-up

    def reset(self) -> None:
        pass

    def removed(self, fd: int, channel) -> None:
        pass

    def step(self, timeout: float) -> None:
        wasyncore.loop(timeout=timeout, map=self.map, use_poll=self.use_poll, count=1)

    def close(self) -> None:
        pass


def event_loop(socket_map: dict, listeners: list, adj):
    """The loop of a server's ``socket_map``: the one its listeners have, or
    a new one that takes their connections' wake-ups."""
    for listener in listeners:
        loop = getattr(listener, "event_loop", None)
        if loop is not None:
            return loop
    if hasattr(select, "epoll"):
        loop = EpollLoop(socket_map, adj.asyncore_loop_timeout)
    else:  # pragma: no cover - Linux has epoll
        loop = WasyncoreLoop(
            socket_map, adj.asyncore_loop_timeout, adj.asyncore_use_poll
        )
    for listener in listeners:
        loop.attach(listener)
    return loop
