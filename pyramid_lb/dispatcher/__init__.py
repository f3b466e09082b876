"""The dispatcher: a load-balancing reverse proxy for sibling app instances."""

from __future__ import annotations

import atexit
import functools
import logging
import os
import signal
import threading

from pyramid_lb.dispatcher.admin import PREFIX, Admin
from pyramid_lb.dispatcher.balancer import Strategy, make_strategy
from pyramid_lb.dispatcher.cache import Cache
from pyramid_lb.dispatcher.checks import HealthChecker
from pyramid_lb.dispatcher.cluster import UP, Backend, Cluster
from pyramid_lb.dispatcher.config import (
    AUTO,
    DispatcherConfig,
    parse_dispatcher,
    retry_after,
)
from pyramid_lb.dispatcher.operations import Busy, Operations
from pyramid_lb.dispatcher.proxy import Proxy, RetryBudget
from pyramid_lb.dispatcher.queueing import RequestQueue
from pyramid_lb.dispatcher.sticky import Sticky
from pyramid_lb.dispatcher.supervisor import Supervisor
from pyramid_lb.forwarded import ProxyHeaders
from pyramid_lb.notify import Notifier
from pyramid_lb.process import WAITRESS_THREADS, outside_the_handler, stop_on_signals
from pyramid_lb.settings import SettingsError

log = logging.getLogger("pyramid_lb.dispatcher")


class Dispatcher:
    """The WSGI app of ``[app:dispatcher]``: the proxy and what keeps it going.

    ``ini`` is the file the section came from: ``instances = N`` spawns
    copies of its ``[app:main]``, and ``ini_files`` are relative to it.
    """

    #: Paths of its own (stats, admin), which the server gives threads of
    #: their own (see :mod:`pyramid_lb.server`).
    admin_prefix = PREFIX

    def __init__(self, config: DispatcherConfig, ini: str | None = None):
        #: The parsed ``[app:dispatcher]`` (see :mod:`.config`).
        self.config = config
        pool_options = dict(
            pool_size=config.pool_size,
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
        )
        self.cluster = Cluster(
            eject_after=config.eject_after,
            eject_time=config.eject_time,
            slow_start=config.slow_start,
            queue=RequestQueue(config.queue_size, config.queue_timeout),
        )
        for spec in config.backends:
            cap = spec.max_in_flight
            if cap == AUTO:  # its threads are unknown here: the setting's, if any
                cap = None if config.max_in_flight == AUTO else config.max_in_flight
            self.cluster.add(
                Backend(
                    spec.url,
                    weight=spec.weight,
                    state=UP,
                    max_in_flight=cap,
                    **pool_options,
                )
            )
        options = {}
        if config.strategy == "hash":
            options = dict(hash_key=config.hash_key, hash_balance=config.hash_balance)
        self.strategy = make_strategy(config.strategy, self.cluster, **options)
        sticky = trusted = None
        if config.sticky != "off":
            sticky = Sticky(
                self.cluster,
                config.affinity_cookie,
                config.affinity_secret,
                insert=config.sticky == "insert",
            )
        if config.trusted_proxies:
            trusted = ProxyHeaders(
                config.trusted_proxies,
                config.trusted_proxy_count,
                config.trusted_headers,
            )
        self.proxy = Proxy(
            self.cluster,
            self.strategy,
            retries=config.retries,
            budget=RetryBudget(config.retry_budget),
            max_body_size=config.max_body_size,
            via_name=config.via_name,
            retry_after=retry_after(config),
            sticky=sticky,
            trusted=trusted,
            cache=self._cache(),
        )
        # Whether a request may wait for any instance before its environ is
        # read: not when a cookie or a hash binds it to one, nor when the
        # cache may answer it without any.
        self._parks = (
            sticky is None
            and self.proxy.cache is None
            and type(self.strategy).binds is Strategy.binds
        )
        # Such a strategy reads nothing of the request: none is given.
        self._choose_any = functools.partial(self.strategy.choose, {})
        self.checker = HealthChecker(
            self.cluster,
            health_check_path=config.health_check_path,
            health_check_interval=config.health_check_interval,
            health_check_timeout=config.health_check_timeout,
            rise=config.rise,
            fall=config.fall,
            liveness_path=config.liveness_path,
        )
        #: Reloads, scaling, restarts, drains: one at a time.
        self.operations = Operations()
        #: Why the app did not start (the supervisor gave up), once it is so.
        self.failure: str | None = None
        #: Set by whoever runs the dispatcher and reports ``failure`` itself
        #: (``pyramid-lb serve`` makes it its error); else it is logged.
        self.failure_is_raised = False
        #: The address it serves on, for the log (set by whoever serves it).
        self.url: str | None = None
        self._notifier = Notifier()
        self._ready: int | None = None  # instances taking requests, as last told
        self._ever_ready = False
        self._ready_lock = threading.Lock()
        self._signals = False
        self.cluster.on_change = self._readiness_changed
        self.supervisor = None
        if config.instances or config.ini_files:
            here = os.path.dirname(ini) if ini else os.getcwd()
            self.supervisor = Supervisor(
                self.cluster,
                self.checker,
                instances=config.instances,
                main_ini=ini,
                ini_files=[os.path.join(here, name) for name in config.ini_files],
                base_port=config.base_port,
                startup_timeout=config.startup_timeout,
                max_restarts=config.max_restarts,
                restart_window=config.restart_window,
                drain_timeout=config.drain_timeout,
                stop_timeout=config.stop_timeout,
                backend_options=pool_options,
                operations=self.operations,
                on_fatal=self._fatal,
                max_requests=config.max_requests,
                max_requests_jitter=config.max_requests_jitter,
                max_memory=config.max_memory,
                max_in_flight=config.max_in_flight,
            )
        self.admin = Admin(self, config.admin_allow, config.admin_hosts)
        #: Server settings the dispatcher needs (see pyramid_lb.server): a
        #: body over the limit refused before it is read (waitress refuses a
        #: length equal to its own limit, hence the 1), and forwarded headers
        #: left for the dispatcher to check against trusted_proxies.
        self.server_defaults = {
            "max_request_body_size": config.max_body_size + 1,
            "clear_untrusted_proxy_headers": False,
            "threads": self._threads_needed(ini),
        }
        self._stopped = False

    @property
    def notifier(self) -> Notifier:
        """Tells systemd how it goes (set by whoever serves it; silent here)."""
        return self._notifier

    @notifier.setter
    def notifier(self, notifier: Notifier) -> None:
        self._notifier = notifier
        if self.supervisor is not None:
            self.supervisor.notifier = notifier

    def _cache(self) -> Cache | None:
        """The shared cache, with ``cache = memory``."""
        config = self.config
        if config.cache == "off":
            return None
        return Cache(
            config.cache_size, config.cache_max_object, config.cache_stale_if_error
        )

    def _threads_needed(self, ini: str | None) -> int:
        """Worker threads for the dispatcher's server: one per request the
        instances may have in flight plus one per place in the queue (a
        request waits on its thread), so that none waits inside waitress,
        unseen and untimed. An instance without a cap counts as waitress's
        default."""
        config = self.config
        caps = [b.max_in_flight or WAITRESS_THREADS for b in self.cluster.backends]
        if self.supervisor is not None:
            for path in self.supervisor.plan:
                caps.append(self.supervisor.in_flight_cap(path) or WAITRESS_THREADS)
        # And a few more, to answer at once (503) those that find the queue
        # full instead of leaving them to wait inside waitress.
        spare = max(4, config.queue_size // 10)
        return sum(caps) + config.queue_size + spare

    def start(self) -> None:
        """Spawn the instances and start checking them."""
        if self.proxy.cache is not None and self.config.sticky == "insert":
            log.warning(
                "cache = memory stores nothing with sticky = insert: every answer "
                "from an instance then either pins its client (Set-Cookie) or "
                "answers a pinned one; sticky = cookie leaves pinning to the app"
            )
        if self.supervisor is not None:
            self.supervisor.start()
        self.checker.start()
        atexit.register(self.stop)
        self._readiness_changed()  # backends elsewhere take requests at once

    def _readiness_changed(self) -> None:
        """Log how many instances take requests, when that number changes."""
        if self._stopped:
            return  # instances going one by one is no news then
        with self._ready_lock:
            backends = list(self.cluster.backends)
            ready = sum(1 for b in backends if b.state == UP and not b.held)
            if ready == self._ready or (self._ready is None and not ready):
                return
            self._ready = ready
            first = ready and not self._ever_ready
            self._ever_ready = self._ever_ready or bool(ready)
        where = f": {self.url}" if self.url else ""
        if first:
            log.info(
                "%d/%d instances ready%s from now on",
                ready,
                len(backends),
                f"{where} takes requests" if where else ": requests are served",
            )
        elif ready:
            log.info("%d/%d instances ready%s", ready, len(backends), where)
        else:
            log.warning(
                "0/%d instances ready%s: requests get 503 until one is",
                len(backends),
                where,
            )
        self.notifier.instances_ready(ready, len(backends))

    def _fatal(self, message: str) -> None:
        """The app does not start (the supervisor gave up): stop, as on SIGTERM."""
        self.failure = message
        if not self.failure_is_raised:
            log.error("%s", message)
        if self._signals:
            # The main thread runs the server: a signal is what stops it.
            os.kill(os.getpid(), signal.SIGTERM)

    def park(self, resume) -> bool:
        """Called by the server (see :mod:`pyramid_lb.server`) before a
        request has a thread: whether the queue takes it, to ``resume`` it
        on a thread with a slot taken (now, or once an instance has room),
        or refused. Its thread then never waits for a slot while parked
        requests, holding theirs, wait for a thread."""
        return self._parks and self.cluster.queue.park(
            self.cluster, resume, self._choose_any
        )

    def stopping(self) -> None:
        """The server stops gracefully: the requests waiting for an instance
        are answered 503 now, since the grace time may not see them served."""
        self.cluster.queue.close()

    def stop(self) -> None:
        """Stop the instances and the checks (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self.checker.stop()  # first: stopping instances is no news
        if self.supervisor is not None:
            self.supervisor.stop()
        for backend in self.cluster.backends:
            backend.pool.close()

    def install_signal_handlers(self) -> bool:
        """SIGHUP: rolling restart; SIGTERM and SIGINT (Ctrl-C): stop, each
        saying so alike.

        Only for a dispatcher that spawns instances (it owns processes), and
        only from the main thread (where Python runs handlers); returns
        whether they were installed. SystemExit (SIGTERM) or
        KeyboardInterrupt (SIGINT) makes the server stop accepting and
        finish the requests in flight; the instances are stopped after that
        (``stop``, also registered with atexit).
        """
        if (
            self.supervisor is None
            or threading.current_thread() is not threading.main_thread()
        ):
            return False
        stop_on_signals(log, quiet=lambda: self.failure is not None)

        def rolling_restart():  # in a thread of its own
            try:  # logged as "rolling restart (SIGHUP) started"
                self.supervisor.rolling_restart(why="SIGHUP")
            except Busy as exc:
                log.warning("SIGHUP: no rolling restart: %s", exc)
                # RELOADING=1 then READY=1 even when refused: under systemd's
                # Type=notify-reload, `systemctl reload` waits for both.
                self.notifier.reloading()
                self.notifier.reloaded("refused (another operation is under way)")

        signal.signal(
            signal.SIGHUP, lambda signum, frame: outside_the_handler(rolling_restart)
        )
        self._signals = True
        return True

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path[:5] == "/_lb/" or path == PREFIX:
            return self.admin(environ, start_response)
        return self.proxy(environ, start_response)


def make_dispatcher(
    global_conf: dict, overrides: dict | None = None, **settings
) -> Dispatcher:
    """Parse an ``[app:dispatcher]`` section into a Dispatcher (not started)."""
    settings.update(overrides or {})
    try:
        config = parse_dispatcher(settings)
    except SettingsError as exc:
        raise SettingsError(f"[app:dispatcher] {exc}") from None
    ini = global_conf.get("__file__")
    if not (config.backends or config.instances or config.ini_files):
        raise SettingsError(
            "[app:dispatcher] has no instances to balance over: set instances = N "
            "(copies of this file's [app:main]), ini_files, or backends "
            "(e.g. backends = http://127.0.0.1:6544 http://127.0.0.1:6545)"
        )
    if config.instances and not ini:
        raise SettingsError(
            "[app:dispatcher] instances = N spawns copies of the ini file it is in, "
            "but this one was not loaded from a file"
        )
    for name in config.ini_files:
        path = os.path.join(os.path.dirname(ini or ""), name)
        if not os.path.isfile(path):
            raise SettingsError(
                f"[app:dispatcher] ini_files: {name!r} is not a file ({path})"
            )
    return Dispatcher(config, ini)


def main(global_conf, **settings):
    """The paste app factory (``use = egg:pyramid_lb#dispatcher``)."""
    dispatcher = make_dispatcher(global_conf, **settings)
    dispatcher.start()
    dispatcher.install_signal_handlers()
    return dispatcher
