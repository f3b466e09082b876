"""``pyramid-lb serve``: the dispatcher and its instances from one ini file."""

from __future__ import annotations

import configparser
import errno
import importlib.metadata
import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

from paste.deploy.loadwsgi import APP, SERVER, loadcontext
from pyramid.paster import setup_logging

from pyramid_lb import server as front
from pyramid_lb.dispatcher import make_dispatcher
from pyramid_lb.dispatcher.instance import ADDRESS_KEYS, listen_host, listen_problem
from pyramid_lb.settings import SettingsError

log = logging.getLogger("pyramid_lb.dispatcher")


class ServeError(Exception):
    """Start-up stopped for a reason told in one line."""


def _context(kind, path: str, name: str):
    try:
        return loadcontext(kind, "config:" + path, name=name)
    except LookupError:
        section = "app" if kind is APP else "server"
        raise ServeError(f"{path} has no [{section}:{name}] section") from None
    except (importlib.metadata.PackageNotFoundError, configparser.Error) as exc:
        raise ServeError(f"{path}: {exc}") from None


def check_listen(options: Mapping[str, Any], section="[server:dispatcher]") -> None:
    """Refuse a ``listen`` or ``port`` that is no TCP port, before waitress
    sees it (it would wrap 99999 around to 34463 and listen there)."""
    problem = listen_problem(options)
    if problem:
        raise ServeError(f"{section} {problem}")


def serve(
    ini: str,
    instances: int | None = None,
    port: int | None = None,
    dispatch: bool = True,
) -> None:
    """Run ``[app:dispatcher]`` of ``ini`` under ``[server:dispatcher]``.

    ``instances`` and ``port`` override the ini file; without ``dispatch``
    only the instances run (supervised, health-checked), for a front end
    such as nginx or HAProxy. Raises ServeError for anything a user can fix.
    """
    if not os.path.isfile(ini):
        raise ServeError(f"{ini}: no such file")
    path = os.path.abspath(ini)
    _setup_logging(path)
    app = _context(APP, path, "dispatcher")
    overrides = {} if instances is None else {"instances": str(instances)}
    try:
        dispatcher = make_dispatcher(app.global_conf, overrides, **app.local_conf)
    except SettingsError as exc:
        raise ServeError(str(exc)) from None
    server = None
    if dispatch:
        # Listen before spawning anything, so that a port in use is an
        # error with nothing to clean up.
        server, grace = _create_server(
            dispatcher, _context(SERVER, path, "dispatcher"), port
        )
    if server is not None:
        dispatcher.url = public_url(server)
    # Said here, as this command's error, rather than logged as well.
    dispatcher.failure_is_raised = True
    try:
        # Before the instances start: one that fails at once stops us by a
        # signal (see Dispatcher._fatal).
        dispatcher.install_signal_handlers() or _stop_on_signals()
        try:
            dispatcher.start()
        except RuntimeError as exc:  # no free port left for an instance
            raise ServeError(str(exc)) from None
        if server is None:
            log.info("supervising the instances, without a dispatcher")
            threading.Event().wait()
        else:
            server.print_listen("Serving on http://{}:{}")
            # Until SIGTERM or SIGINT, then what is in flight is finished.
            front.run(server, grace)
    except (KeyboardInterrupt, SystemExit):
        pass  # a signal (a second one, or without a server): stop now
    finally:
        dispatcher.stop()
    if dispatcher.failure is not None:
        raise ServeError(dispatcher.failure)


def _setup_logging(path: str) -> None:
    """The ini file's logging; without a [loggers] section, INFO to stderr, so
    that where the dispatcher listens and what its instances do is seen."""
    parser = configparser.RawConfigParser(strict=False)
    try:
        parser.read(path)
    except configparser.Error as exc:
        raise ServeError(f"{path}: {exc}") from None
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


def _create_server(dispatcher, context, port: int | None):
    """The dispatcher's server (see :mod:`pyramid_lb.server`), listening."""
    import waitress

    if context.object not in (waitress.serve_paste, front.serve_paste):
        raise ServeError(
            "[server:dispatcher] must use egg:pyramid_lb#waitress "
            "(or egg:waitress#main)"
        )
    options = dict(context.local_conf)
    try:
        grace = front.graceful_timeout(options)
    except SettingsError as exc:
        raise ServeError(f"[server:dispatcher] {exc}") from None
    options = {k: v for k, v in options.items() if k not in front.OWN_KEYS}
    if port is not None:
        host = (
            listen_host(options)
            if options.get("listen") or options.get("host")
            else "*"
        )
        options = {k: v for k, v in options.items() if k not in ADDRESS_KEYS}
        options["listen"] = f"{host}:{port}"
    check_listen(options)
    try:
        return front.create_server(dispatcher, options), grace
    except OSError as exc:
        where = options.get("listen") or f"{options.get('host')}:{options.get('port')}"
        reason = (
            "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        )
        raise ServeError(f"cannot listen on {where}: {reason}") from None
    except ValueError as exc:  # waitress's check of the section, or ours
        raise ServeError(f"[server:dispatcher]: {exc}") from None


def _stop_on_signals() -> None:
    """For a dispatcher over backends only: SIGTERM and Ctrl-C stop it, each
    saying so, as the handlers of one that spawns instances do."""

    def stop(signum, frame):
        log.info("%s: stopping", signal.Signals(signum).name)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
