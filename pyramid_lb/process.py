"""A pyramid_lb process's start and stop: ini sections, listening, signals, and
what the dispatcher tells the instances it spawns."""

from __future__ import annotations

import configparser
import errno
import importlib.metadata
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

import waitress
from paste.deploy.loadwsgi import APP, SERVER, loadcontext

from pyramid_lb import server as front

log = logging.getLogger(__name__)

#: Set for each spawned instance: its id (``request.lb_instance``).
INSTANCE_ENV = "PYRAMID_LB_INSTANCE"
#: Set for each spawned instance: the pid it must not outlive.
PARENT_ENV = "PYRAMID_LB_PARENT"
#: Set for each spawned instance: the dispatcher's address, added to
#: ``pyramid_lb.trusted_proxies`` so that it applies its forwarded headers.
TRUSTED_PROXIES_ENV = "PYRAMID_LB_TRUSTED_PROXIES"
#: Set for each spawned instance under ``pyramid-lb serve --reload``: the
#: directory to list the files it imported in (``<id>.files``).
MODULES_ENV = "PYRAMID_LB_MODULES_DIR"

#: The exit status of an instance whose port was taken between the moment the
#: supervisor found it free and its bind: no fault of the app's.
PORT_IN_USE = 3
#: Server keys replaced by ``listen = HOST:PORT``; waitress refuses mixes.
ADDRESS_KEYS = ("listen", "host", "port", "unix_socket", "unix_socket_perms")


class StartupError(Exception):
    """Start-up stopped for a reason the user can fix, in one line naming the
    file, the section or key and the value; ``code``: the instance runner's
    exit status (``pyramid-lb`` exits 1)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def load(
    ini: str,
    section: str,
    variables: Mapping[str, str] | None = None,
    hint: str = "",
):
    """The paste context of ``section`` (``app:NAME`` or ``server:NAME``) of
    the ini file ``ini``: its ``object``, ``global_conf`` and ``local_conf``.

    ``variables`` win over the file's ``[DEFAULT]``, as pserve's
    ``name=value`` arguments do; ``hint`` follows "has no [section] section".
    """
    if not os.path.isfile(ini):
        raise StartupError(f"{ini}: no such file", code=2)
    kind, _, name = section.partition(":")
    try:
        return loadcontext(
            APP if kind == "app" else SERVER,
            "config:" + os.path.abspath(ini),
            name=name,
            global_conf=dict(variables) if variables else None,
        )
    except LookupError as exc:
        if type(exc) is not LookupError:  # a KeyError of the app's, say
            raise
        # Paste's word for a missing section, and for an egg without the
        # entry point the section names.
        if str(exc).startswith("No section"):
            raise StartupError(f"{ini} has no [{section}] section{hint}") from None
        raise StartupError(f"{ini} [{section}]: {exc}") from None
    except importlib.metadata.PackageNotFoundError as exc:  # egg:NAME
        raise StartupError(f"{ini} [{section}]: {exc}") from None
    except configparser.Error as exc:  # its text spreads over lines
        raise StartupError(f"{ini}: {' '.join(str(exc).split())}") from None


def is_waitress(context) -> bool:
    """Whether a server context runs waitress, ours or waitress's own."""
    return context.object in (waitress.serve_paste, serve_paste)


#: Waitress's ``threads`` when a server section does not set it.
WAITRESS_THREADS = 4


def server_threads(ini: str) -> int:
    """The worker threads of ``ini``'s ``[server:main]``: how many requests
    its instance serves at once (without waiting inside waitress)."""
    try:
        # As the instance runner loads it: ``get port = http_port`` then
        # reads a port (any will do here) rather than fail.
        conf = load(ini, "server:main", {"http_port": "0"}).local_conf
    except ImportError:
        # A server of the app's own that only the instance can import (its
        # sys.path is the app's): the section's text is enough for this.
        parser = configparser.RawConfigParser(strict=False)
        parser.read(ini)
        conf = (
            dict(parser.items("server:main"))
            if parser.has_section("server:main")
            else {}
        )
    value = conf.get("threads", WAITRESS_THREADS)
    try:
        threads = int(value)
    except (TypeError, ValueError):
        raise StartupError(
            f"{ini} [server:main] threads = {value!r} is not a number"
        ) from None
    if threads < 1:
        raise StartupError(
            f"{ini} [server:main] threads = {value!r}: expected 1 or more"
        )
    return threads


def listen_host(conf: Mapping[str, Any], default: str = "127.0.0.1") -> str:
    """The host a server section asks for, ready to put before ``:PORT``."""
    entries = str(conf.get("listen") or "").split()
    if entries:
        host = entries[0]
        if ":" in host:
            head, _, tail = host.rpartition(":")
            if "]" not in tail:  # the colon was the port's, not inside [IPv6]
                host = head
    else:
        host = str(conf.get("host") or default)
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


def create_server(
    app,
    conf: Mapping[str, Any],
    section: str,
    port: int | None = None,
    host: str = "127.0.0.1",
    own_paths: tuple[str, ...] = (),
):
    """A listening :func:`pyramid_lb.server.create_server` for ``app``, and
    its ``graceful_timeout``, from the server section ``conf`` (``section``
    in errors); ``port`` replaces its port, on its host or else ``host``.
    A port in use has the code :data:`PORT_IN_USE`."""
    # Checked even when ``port`` replaces it: pserve would be given it.
    problem = listen_problem(conf)
    if problem:
        raise StartupError(f"{section} {problem}")
    try:
        grace = front.graceful_timeout(conf)
    except ValueError as exc:
        raise StartupError(f"{section} {exc}") from None
    dropped = front.OWN_KEYS + (ADDRESS_KEYS if port is not None else ())
    options = {key: value for key, value in conf.items() if key not in dropped}
    if port is not None:
        options["listen"] = f"{listen_host(conf, host)}:{port}"
    where = options.get("listen") or f"{conf.get('host')}:{conf.get('port')}"
    try:
        return front.create_server(app, options, own_paths), grace
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"cannot listen on {where}: address already in use", PORT_IN_USE
            ) from None
        raise StartupError(f"cannot listen on {where}: {exc.strerror}") from None
    except ValueError as exc:  # waitress's check of the section, or ours
        raise StartupError(f"{section}: {exc}") from None


def outside_the_handler(function: Callable[..., Any], *args: Any) -> None:
    """Run ``function`` in a thread of its own, not in a signal handler.

    A handler interrupts the main thread wherever it is, half-way through
    writing a log line to stderr, say: logging from the handler would then
    fail (a reentrant write), and the error, caught by the server as the
    request's, would swallow the signal.
    """
    threading.Thread(target=function, args=args, daemon=True).start()


def handles_sigterm(handler):
    """Mark a signal handler as pyramid_lb's own (the add-on's drain, the
    dispatcher's): ``stop_on_signals(keep_own=True)`` leaves it in place."""
    handler.pyramid_lb = True
    return handler


def stop_on_signals(
    logger: logging.Logger = log,
    keep_own: bool = False,
    quiet: Callable[[], bool] = lambda: False,
) -> None:
    """SIGTERM and SIGINT (Ctrl-C) stop this process, each saying so alike:
    SystemExit or KeyboardInterrupt, which :func:`pyramid_lb.server.run`
    turns into a graceful stop; a second signal stops at once.

    ``keep_own`` keeps pyramid_lb's own handlers; any other is replaced (a
    tool's, such as coverage's, would cut off what is in flight). While
    ``quiet()``, nothing is logged: the reason was told already.
    """
    signals = 0

    @handles_sigterm
    def stop(signum, frame):
        nonlocal signals
        signals += 1
        if not quiet():
            how = "stopping" if signals == 1 else "stopping at once"
            try:
                logger.info("%s: %s", signal.Signals(signum).name, how)
            except Exception:
                # A write to stderr this interrupted cannot be re-entered:
                # the line is lost, not the signal.
                pass
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(0)

    for signum in (signal.SIGTERM, signal.SIGINT):
        if not (keep_own and getattr(signal.getsignal(signum), "pyramid_lb", False)):
            signal.signal(signum, stop)


def serve_paste(app, global_conf, **options) -> int:
    """The paste server runner ``egg:pyramid_lb#waitress``."""
    server, grace = create_server(app, options, "egg:pyramid_lb#waitress")
    stop_on_signals(keep_own=True)
    server.print_listen("Serving on http://{}:{}")
    front.run(server, grace)
    return 0
