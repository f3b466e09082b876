"""One supervised instance: ``[app:main]`` of an ini file served on a given port."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any

from pyramid.exceptions import ConfigurationError
from pyramid.paster import setup_logging

from pyramid_lb import server as front
from pyramid_lb.health import IHealth
from pyramid_lb.process import (
    INSTANCE_ENV,
    MODULES_ENV,
    PARENT_ENV,
    TRUSTED_PROXIES_ENV,
    StartupError,
    create_server,
    is_waitress,
    load,
    stop_on_signals,
)
from pyramid_lb.settings import SettingsError

PROG = "pyramid_lb.dispatcher.instance"
# Not __name__: run with -m, that is "__main__", outside the ini's loggers.
log = logging.getLogger(PROG)
PR_SET_PDEATHSIG = 1
WAITRESS_FORWARDED = (
    "x-forwarded-for x-forwarded-host x-forwarded-proto x-forwarded-port"
)


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
        raise StartupError(
            f"{PARENT_ENV} = {parent!r} is not a process id", 2
        ) from None
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        # A failure here is not fatal: the watchdog below still notices.
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    # The parent may have died before prctl took effect: then no signal comes.
    if os.getppid() != parent_pid:
        raise StartupError(f"parent process {parent_pid} is gone; not starting")

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


def insist_on_stopping(interval: float = 0.5) -> None:
    """Under a server other than waitress, SIGTERM raises SystemExit again
    every ``interval`` seconds until the server ends: one may swallow it
    (wsgiref's request handler catches everything, SystemExit included,
    when the signal lands while it answers)."""
    stop = signal.getsignal(signal.SIGTERM)

    def again():
        while True:
            time.sleep(interval)
            os.kill(os.getpid(), signal.SIGTERM)

    def on_sigterm(signum, frame):
        if repeating.is_set():
            raise SystemExit(0)  # said already
        repeating.set()
        threading.Thread(target=again, daemon=True).start()
        stop(signum, frame)

    repeating = threading.Event()
    signal.signal(signal.SIGTERM, on_sigterm)


def health_paths(app: Any) -> tuple[str, ...]:
    """The add-on's liveness and readiness paths, when the app has them: the
    server answers them on threads of their own, so that a dispatcher
    filling every thread with slow requests (up to its cap) does not see
    the instance as hung."""
    registry = getattr(app, "registry", None)
    if registry is None or registry.queryUtility(IHealth) is None:
        return ()
    settings = registry.settings
    return (settings["pyramid_lb.health_path"], settings["pyramid_lb.ready_path"])


def stop_at_once(app: Any) -> None:
    """SIGTERM and SIGINT stop the server without draining: the dispatcher
    drained this instance already."""
    settings = getattr(getattr(app, "registry", None), "settings", None) or {}
    grace = settings.get("pyramid_lb.drain_on_sigterm")
    if grace is not None:
        log.info(
            "pyramid_lb.drain_on_sigterm = %g is overridden: the dispatcher drains "
            "this instance before it stops it, so SIGTERM stops it at once",
            grace,
        )
    stop_on_signals(log)


def serve(
    ini: str, port: int, app_name: str = "main", server_name: str = "main"
) -> None:
    """Load ``[app:APP]`` of ``ini`` and serve it on ``port``, until a signal."""
    variables = {"http_port": str(port)}
    server = load(ini, f"server:{server_name}", variables)
    setup_logging(os.path.abspath(ini), variables)
    try:
        app = load(ini, f"app:{app_name}", variables).create()
    except StartupError as exc:  # no such section, say
        _tell_imported(exc)
        raise
    except (SettingsError, ConfigurationError) as exc:
        _tell_imported(exc)
        raise StartupError(str(exc)) from None
    except Exception as exc:
        # The traceback for the reader, its last line (the error) replaced
        # by one with the place too, which the supervisor quotes as the
        # reason a rollout stopped (see Supervisor._exit_reason).
        _tell_imported(exc)
        lines = "".join(traceback.format_exception(exc)).rstrip("\n").split("\n")
        print("\n".join(lines[:-1]), file=sys.stderr)
        raise StartupError(f"[app:{app_name}] did not load: {one_line(exc)}") from None
    _tell_imported()
    stop_at_once(app)
    if not is_waitress(server):
        log.warning(
            "[server:%s] is not waitress: it listens where http_port = %s puts it",
            server_name,
            port,
        )
        insist_on_stopping()
        server.create()(app)
        return
    conf = dict(server.local_conf)
    conf.update(forwarded_options(app, conf))
    wsgi_server, grace = create_server(
        app, conf, f"{ini} [server:{server_name}]", port, own_paths=health_paths(app)
    )
    wsgi_server.print_listen("Serving on http://{}:{}")
    # Until SIGTERM: what is in flight (answers being sent included) is then
    # finished, within the supervisor's stop_timeout.
    front.run(wsgi_server, grace)


def one_line(exc: BaseException) -> str:
    """``exc`` in one line, with where it was raised."""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f"{exc.filename}, line {exc.lineno}"
        return f"{type(exc).__name__}: {exc.msg} ({where})"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}{': ' + text[0] if text else ''}{where}"


def _tell_imported(failure: BaseException | None = None) -> None:
    """Under ``pyramid-lb serve --reload``: say which files to watch."""
    if os.environ.get(MODULES_ENV):
        from pyramid_lb.dispatcher.reloader import write_module_list

        write_module_list(os.environ.get(INSTANCE_ENV, str(os.getpid())), failure)


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
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        pass  # SIGINT, through a server other than waitress
    return 0


if __name__ == "__main__":
    sys.exit(main())
