"""``pyramid-lb serve``: the dispatcher and its instances from one ini file."""

from __future__ import annotations

import configparser
import logging
import os
import signal
import threading

from pyramid.paster import setup_logging

from pyramid_lb import server as front
from pyramid_lb.dispatcher import make_dispatcher
from pyramid_lb.dispatcher.reloader import Reloader
from pyramid_lb.notify import Notifier
from pyramid_lb.process import (
    StartupError,
    create_server,
    handles_sigterm,
    is_waitress,
    load,
    stop_on_signals,
)
from pyramid_lb.settings import SettingsError

log = logging.getLogger("pyramid_lb.dispatcher")


def serve(
    ini: str,
    instances: int | None = None,
    port: int | None = None,
    dispatch: bool = True,
    reload: bool = False,
) -> None:
    """Run ``[app:dispatcher]`` of ``ini`` under ``[server:dispatcher]``.

    ``instances`` and ``port`` override the ini file; without ``dispatch``
    only the instances run (supervised, health-checked), for a front end
    such as nginx or HAProxy. Raises StartupError for anything a user can fix.

    Under systemd (``$NOTIFY_SOCKET``), it says READY=1 once an instance
    takes requests and it serves, and more: see :mod:`pyramid_lb.notify`.
    With ``reload``, a change to the app's files is a rolling restart (see
    :mod:`pyramid_lb.dispatcher.reloader`).
    """
    notifier = Notifier.from_environ()  # before any instance inherits it
    app = load(ini, "app:dispatcher")
    _setup_logging(os.path.abspath(ini))
    overrides = {} if instances is None else {"instances": str(instances)}
    try:
        dispatcher = make_dispatcher(app.global_conf, overrides, **app.local_conf)
    except SettingsError as exc:
        raise StartupError(str(exc)) from None
    dispatcher.notifier = notifier
    server = grace = watcher = None
    supervisor = dispatcher.supervisor
    if supervisor is not None:
        supervisor.fixed_ports = not dispatch
    if reload:
        if supervisor is None:
            raise StartupError(
                f"{ini}: --reload replaces the instances the dispatcher spawns, "
                "and [app:dispatcher] spawns none (it has only backends)"
            )
    if dispatch:
        context = load(ini, "server:dispatcher")
        if not is_waitress(context):
            raise StartupError(
                f"{ini} [server:dispatcher] must use egg:pyramid_lb#waitress "
                "(or egg:waitress#main)"
            )
        # Listen before spawning anything, so that a port in use is an
        # error with nothing to clean up. Without a host, --port listens
        # everywhere, as waitress does.
        server, grace = create_server(
            dispatcher, context.local_conf, f"{ini} [server:dispatcher]", port, "*"
        )
        dispatcher.url = public_url(server)
    # Said here, as this command's error, rather than logged as well.
    dispatcher.failure_is_raised = True
    try:
        # Before the instances start: one that fails at once stops us by a
        # signal (see Dispatcher._fatal).
        dispatcher.install_signal_handlers() or stop_on_signals(log)
        if notifier.enabled:
            _notify_stopping(notifier)
        if reload:
            watcher = Reloader(
                [os.path.abspath(ini), *supervisor.plan], _reloading(ini, supervisor)
            )
            supervisor.modules_dir = watcher.modules_dir
        try:
            dispatcher.start()
        except RuntimeError as exc:  # no free port left for an instance
            raise StartupError(str(exc)) from None
        if watcher is not None:
            watcher.start()
        if server is None:
            log.info("supervising the instances, without a dispatcher")
            notifier.serving()
            threading.Event().wait()
        else:
            server.print_listen("Serving on http://{}:{}")
            # Listening since create_server: connections wait in the backlog
            # for the loop that front.run starts now.
            notifier.serving()
            # Until SIGTERM or SIGINT, then what is in flight is finished.
            front.run(server, grace)
    except (KeyboardInterrupt, SystemExit):
        pass  # a signal (a second one, or without a server): stop now
    finally:
        if watcher is not None:
            watcher.stop()
        dispatcher.stop()
    if dispatcher.failure is not None:
        notifier.failed(dispatcher.failure)
        raise StartupError(dispatcher.failure)


def _own_sections(ini: str) -> dict[str, dict[str, str]]:
    """The dispatcher's sections of ``ini`` as written (empty if unreadable)."""
    parser = configparser.RawConfigParser(strict=False)
    try:
        parser.read(ini)
    except configparser.Error:
        return {}
    names = ("app:dispatcher", "server:dispatcher")
    return {n: dict(parser.items(n)) for n in names if parser.has_section(n)}


def _reloading(ini: str, supervisor):
    """``--reload``'s rolling restart, saying when the dispatcher's own
    sections changed too: those take effect only when it starts again."""
    as_started = _own_sections(ini)

    def rolling_restart(why: str) -> None:
        nonlocal as_started
        now = _own_sections(ini)
        if now and now != as_started:
            log.warning(
                "%s: [app:dispatcher] or [server:dispatcher] changed; the "
                "dispatcher's own settings change when pyramid-lb serve starts "
                "again (the instances are replaced now)",
                ini,
            )
            as_started = now
        supervisor.rolling_restart(why=why)

    return rolling_restart


def _notify_stopping(notifier: Notifier) -> None:
    """Say STOPPING=1 first when SIGTERM or SIGINT stops the dispatcher, then
    do what their handlers (installed already) do."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        stop = signal.getsignal(signum)
        if not callable(stop):
            continue

        @handles_sigterm
        def stopping(signum, frame, stop=stop):
            notifier.stopping()
            stop(signum, frame)

        signal.signal(signum, stopping)


def _setup_logging(path: str) -> None:
    """The ini file's logging; without a [loggers] section, INFO to stderr, so
    that where the dispatcher listens and what its instances do is seen."""
    parser = configparser.RawConfigParser(strict=False)
    parser.read(path)  # loaded by paste already: it parses
    if parser.has_section("loggers"):
        setup_logging(path)
    else:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)-5.5s [%(name)s] %(message)s",
        )


def public_url(server) -> str | None:
    """Where a waitress server can be reached, for the log (None: unknown)."""
    listen = getattr(server, "effective_listen", None)  # several sockets
    if listen is None:
        port = getattr(server, "effective_port", None)
        if port is None:
            return None
        listen = [(server.effective_host, port)]
    hosts = {str(host) for host, _ in listen}
    host, port = listen[0]
    # Every address, or both loopback ones (listen = localhost:8080):
    # localhost reaches it from this machine.
    if hosts & {"0.0.0.0", "::"} or hosts == {"127.0.0.1", "::1"}:
        host = "localhost"
    elif ":" in str(host):
        host = f"[{host}]"
    return f"http://{host}:{port}/"
