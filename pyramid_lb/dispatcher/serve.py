"""``pyramid-lb serve``: the dispatcher and its instances from one ini file."""

from __future__ import annotations

import configparser
import errno
import importlib.metadata
import logging
import os
import signal
import threading

from paste.deploy.loadwsgi import APP, SERVER, loadcontext
from pyramid.paster import setup_logging

from pyramid_lb.dispatcher import make_dispatcher
from pyramid_lb.dispatcher.instance import ADDRESS_KEYS, listen_host
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
    setup_logging(path)
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
        server = _create_server(dispatcher, _context(SERVER, path, "dispatcher"), port)
    dispatcher.start()
    try:
        dispatcher.install_signal_handlers() or _stop_on_sigterm()
        if server is None:
            log.info("supervising the instances, without a dispatcher")
            threading.Event().wait()
        else:
            server.print_listen("Serving on http://{}:{}")
            server.run()  # until SIGTERM or SIGINT, then in-flight requests end
    except KeyboardInterrupt:
        pass
    finally:
        dispatcher.stop()


def _create_server(dispatcher, context, port: int | None):
    import waitress

    if context.object is not waitress.serve_paste:
        raise ServeError("[server:dispatcher] must use egg:waitress#main")
    options = dict(context.local_conf)
    if port is not None:
        host = (
            listen_host(options)
            if options.get("listen") or options.get("host")
            else "*"
        )
        options = {k: v for k, v in options.items() if k not in ADDRESS_KEYS}
        options["listen"] = f"{host}:{port}"
    try:
        return waitress.create_server(dispatcher, **options)
    except OSError as exc:
        where = options.get("listen") or f"{options.get('host')}:{options.get('port')}"
        reason = (
            "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        )
        raise ServeError(f"cannot listen on {where}: {reason}") from None
    except ValueError as exc:  # waitress's check of the section
        raise ServeError(f"[server:dispatcher]: {exc}") from None


def _stop_on_sigterm() -> None:
    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
