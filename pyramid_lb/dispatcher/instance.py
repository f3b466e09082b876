"""One supervised instance: ``[app:main]`` of an ini file served on a given port."""

from __future__ import annotations

import argparse
import configparser
import ctypes
import errno
import importlib.metadata
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from typing import Any

import waitress
from paste.deploy.loadwsgi import APP, SERVER, loadcontext
from pyramid.exceptions import ConfigurationError
from pyramid.paster import setup_logging

from pyramid_lb import server as front
from pyramid_lb.health import IHealth
from pyramid_lb.process import PORT_IN_USE
from pyramid_lb.settings import TRUSTED_PROXIES_ENV, SettingsError

PROG = "pyramid_lb.dispatcher.instance"
# Not __name__: run with -m, that is "__main__", outside the ini's loggers.
log = logging.getLogger(PROG)
PARENT_ENV = "PYRAMID_LB_PARENT"
PR_SET_PDEATHSIG = 1
#: Server keys replaced by ``listen = HOST:PORT``; waitress refuses mixes.
ADDRESS_KEYS = ("listen", "host", "port", "unix_socket", "unix_socket_perms")
WAITRESS_FORWARDED = (
    "x-forwarded-for x-forwarded-host x-forwarded-proto x-forwarded-port"
)


class Failure(Exception):
    """Start-up stopped for a reason told in one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def follow_parent(
    environ: Mapping[str, str] = os.environ, interval: float = 0.5
) -> None:
    """Make sure this process never outlives the one named in ``$PYRAMID_LB_PARENT``."""
    parent = environ.get(PARENT_ENV)
    if not parent:
        return  # started by hand: nobody to follow
    try:
        parent_pid = int(parent)
    except ValueError:
        raise Failure(f"{PARENT_ENV} = {parent!r} is not a process id", 2) from None
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        # A failure here is not fatal: the watchdog below still notices.
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    # The parent may have died before prctl took effect: then no signal comes.
    if os.getppid() != parent_pid:
        raise Failure(f"parent process {parent_pid} is gone; not starting")

    def watch() -> None:
        # For platforms without prctl, and as a second line of defence.
        stop = threading.Event()
        while not stop.wait(interval):
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGTERM)
                # SIGTERM normally ends it; if shutdown hangs, do not linger.
                stop.wait(10)
                os._exit(1)

    threading.Thread(target=watch, name="pyramid_lb parent watch", daemon=True).start()


def listen_host(conf: Mapping[str, Any]) -> str:
    """The host a server section asks for, ready to put before ``:PORT``."""
    entries = str(conf.get("listen") or "").split()
    if entries:
        host = entries[0]
        if ":" in host:
            head, _, tail = host.rpartition(":")
            if "]" not in tail:  # the colon was the port's, not inside [IPv6]
                host = head
    else:
        host = str(conf.get("host") or "127.0.0.1")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return host


def _port_problem(port: str) -> str | None:
    """Why ``port`` is no TCP port waitress should be given, or None."""
    if port.isascii() and port.isdigit():
        # Waitress would wrap 99999 around to 34463 without a word.
        return None if int(port) <= 65535 else "above 65535"
    try:
        socket.getservbyname(port, "tcp")  # waitress takes "http" for 80 too
    except OSError:
        return "not a number"
    return None


def listen_problem(conf: Mapping[str, Any]) -> str | None:
    """What is wrong with the ports a server section's ``listen`` or ``port``
    gives, in a sentence naming the key and the value, or None."""
    allowed = "expected a TCP port from 1 to 65535 (0: any free port)"
    listen = str(conf.get("listen") or "")
    for entry in listen.split():
        head, colon, port = entry.rpartition(":")
        if not colon or "]" in port or (":" in head and not head.endswith("]")):
            continue  # no port given (a bare IPv6 address): waitress's default
        problem = _port_problem(port)
        if problem:
            return (
                f"listen = {listen!r} is not valid: the port of {entry!r} is "
                f"{problem}; {allowed}"
            )
    if conf.get("port") not in (None, ""):
        port = str(conf["port"]).strip()
        problem = _port_problem(port)
        if problem:
            return f"port = {port!r} is not valid: {problem}; {allowed}"
    return None


def forwarded_options(
    app: Any, conf: Mapping[str, Any], environ: Mapping[str, str] = os.environ
) -> dict[str, Any]:
    """Waitress options that let the dispatcher's forwarded headers through."""
    registry = getattr(app, "registry", None)
    if registry is not None:
        if registry.queryUtility(IHealth) is not None:
            log.debug("forwarded headers are left to the pyramid_lb add-on")
            return {"clear_untrusted_proxy_headers": False}
    if conf.get("trusted_proxy"):
        log.info(
            "forwarded headers: trusted_proxy = %s (from the ini)",
            conf["trusted_proxy"],
        )
        return {}
    proxy = (
        (environ.get(TRUSTED_PROXIES_ENV) or "127.0.0.1").replace(",", " ").split()[0]
    )
    log.info(
        "forwarded headers: no pyramid_lb add-on, waitress applies them from %s", proxy
    )
    return {
        "trusted_proxy": proxy,
        "trusted_proxy_count": 1,
        "trusted_proxy_headers": WAITRESS_FORWARDED,
    }


def stop_on_signals(app: Any) -> None:
    """SIGTERM and SIGINT stop the server now: the dispatcher drained us already."""
    settings = getattr(getattr(app, "registry", None), "settings", None) or {}
    grace = settings.get("pyramid_lb.drain_on_sigterm")
    if grace is not None:
        log.info(
            "pyramid_lb.drain_on_sigterm = %g is overridden: the dispatcher drains "
            "this instance before it stops it, so SIGTERM stops it at once",
            grace,
        )

    def stop(signum, frame):
        raise SystemExit(0)  # waitress closes cleanly on SystemExit

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def serve(
    ini: str, port: int, app_name: str = "main", server_name: str = "main"
) -> None:
    """Load ``[app:APP]`` of ``ini`` and serve it on ``port``, until a signal."""
    if not os.path.isfile(ini):
        raise Failure(f"{ini}: no such file", code=2)
    path = os.path.abspath(ini)
    variables = {"http_port": str(port)}
    setup_logging(path, variables)
    try:
        server = loadcontext(
            SERVER, "config:" + path, name=server_name, global_conf=variables
        )
        app_context = loadcontext(
            APP, "config:" + path, name=app_name, global_conf=variables
        )
    except (
        LookupError,
        importlib.metadata.PackageNotFoundError,
        configparser.Error,
    ) as exc:
        raise Failure(f"{ini}: {exc}") from None
    try:
        app = app_context.create()
    except (SettingsError, ConfigurationError) as exc:
        raise Failure(str(exc)) from None

    if server.object not in (waitress.serve_paste, front.serve_paste):
        log.warning(
            "[server:%s] is not waitress: it listens where http_port = %s puts it",
            server_name,
            port,
        )
        stop_on_signals(app)
        server.create()(app)
        return
    conf = dict(server.local_conf)
    problem = listen_problem(conf)
    if problem:  # the port itself is replaced, but pserve would be given it
        raise Failure(f"{ini} [server:{server_name}] {problem}")
    host = listen_host(conf)
    try:
        grace = front.graceful_timeout(conf)
    except SettingsError as exc:
        raise Failure(f"{ini} [server:{server_name}] {exc}") from None
    options = {
        key: value
        for key, value in conf.items()
        if key not in ADDRESS_KEYS and key not in front.OWN_KEYS
    }
    options.update(forwarded_options(app, conf), listen=f"{host}:{port}")
    stop_on_signals(app)
    try:
        wsgi_server = front.create_server(app, options)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise Failure(
                f"cannot listen on {host}:{port}: address already in use", PORT_IN_USE
            ) from None
        raise Failure(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    except ValueError as exc:  # waitress's check of the server section
        raise Failure(f"{ini} [server:{server_name}]: {exc}") from None
    wsgi_server.print_listen("Serving on http://{}:{}")
    # Until SIGTERM: what is in flight (answers being sent included) is then
    # finished, within the supervisor's stop_timeout.
    front.run(wsgi_server, grace)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("ini", help="the ini file (PasteDeploy)")
    parser.add_argument("port", type=int, help="the TCP port to serve on")
    parser.add_argument(
        "--app", default="main", help="app section name (default: main)"
    )
    parser.add_argument(
        "--server", default="main", help="server section (default: main)"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"argument port: {args.port} is not a TCP port (0 to 65535)")
    try:
        follow_parent()
        serve(args.ini, args.port, args.app, args.server)
    except Failure as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
