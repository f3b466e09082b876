"""The ``pyramid-lb`` command line."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import textwrap
import urllib.error
import urllib.request

from pyramid_lb.process import StartupError, listen_host, load


def serve(args) -> int:
    from pyramid_lb.dispatcher.serve import serve

    serve(
        args.ini,
        instances=args.instances,
        port=args.port,
        dispatch=not args.no_dispatcher,
        reload=args.reload,
    )
    return 0


def tcp_port(text: str) -> int:
    """``--port``: 1 to 65535, or 0 for a free port the system picks."""
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a TCP port: expected 1 to 65535 (0: any free port)"
        )
    return int(text)


def instance_count(text: str) -> int:
    """A number of instances: 0 to 1000, as the ``instances`` setting allows."""
    if not (text.isascii() and text.isdigit()) or int(text) > 1000:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of instances: expected 0 to 1000"
        )
    return int(text)


def admin_url(target: str) -> str:
    """The dispatcher's base URL: given, or read from an ini file."""
    if "://" in target:
        return target.rstrip("/")
    if not os.path.isfile(target):
        raise ValueError(f"{target}: neither a URL nor an ini file")
    conf = load(
        target,
        "server:dispatcher",
        hint=" to find the dispatcher by; give its URL instead (e.g. "
        "http://127.0.0.1:8080)",
    ).local_conf
    listen = str(conf.get("listen") or "").split()
    port = listen[0].rpartition(":")[2] if listen else conf.get("port", "8080")
    host = listen_host(conf)
    if host in ("*", "0.0.0.0", "[::]", "localhost", ""):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def unreachable(target: str, base: str, reason) -> ValueError:
    """The error for a dispatcher that does not answer, naming the URL tried."""
    source = "" if base == target.rstrip("/") else f" (the dispatcher of {target})"
    if isinstance(reason, OSError) and reason.strerror:
        reason = reason.strerror  # without "[Errno 111]"
    return ValueError(f"cannot reach {base}{source}: {reason}")


def get_json(target: str, path: str) -> dict:
    """GET a dispatcher's JSON page."""
    base = admin_url(target)
    url = base + path
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise ValueError(f"{url}: {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise unreachable(target, base, getattr(exc, "reason", exc)) from None


def status(args) -> int:
    from pyramid_lb.status import format_stats

    try:
        stats = get_json(args.target, "/_lb/stats.json")
    except ValueError as exc:
        return fail(str(exc))
    print(format_stats(stats))
    return 0


def post(target: str, action: str) -> dict:
    """POST an admin action to a dispatcher; its JSON answer."""
    base = admin_url(target)
    request = urllib.request.Request(
        base + "/_lb/" + action,
        method="POST",
        headers={"X-Requested-With": "pyramid-lb"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            answer = json.load(exc)
        except ValueError:
            answer = {}
        detail = answer.get("error", exc.reason)
        if answer.get("running"):  # another life-cycle operation holds it
            raise ValueError(f"{base} is busy: {detail}") from None
        raise ValueError(f"{base}: {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise unreachable(target, base, getattr(exc, "reason", exc)) from None


def reload(args) -> int:
    try:
        post(args.target, "reload")
    except ValueError as exc:
        return fail(str(exc))
    print("rolling restart started; the dispatcher's log tells how it goes")
    return 0


def scale(args) -> int:
    try:
        answer = post(args.target, f"scale?instances={args.instances}")
    except ValueError as exc:
        return fail(str(exc))
    print(f"{answer['instances']} instances ({answer['change']:+d})")
    return 0


def export(args) -> int:
    from pyramid_lb.export import export

    if args.output_dir is not None or args.engine == "docker":
        return export_files(args)
    text = export(args.engine, args.ini, listen=args.listen)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(text)
    except OSError as exc:
        return fail(f"cannot write {args.output}: {exc.strerror}")
    return 0


def export_files(args) -> int:
    """``export docker``: two files, into ``--output-dir`` or to stdout."""
    from pyramid_lb import export_docker
    from pyramid_lb.export import check_engine, export

    if args.engine != "docker":
        return fail(
            f"--output-dir is for docker, which writes two files; {args.engine} "
            "writes one: give -o FILE"
        )
    if args.output is not None:
        return fail(
            f"docker writes two files ({export_docker.DOCKERFILE} and "
            f"{export_docker.COMPOSE}): give --output-dir DIR, not -o FILE"
        )
    if args.output_dir is None:
        sys.stdout.write(export(args.engine, args.ini, listen=args.listen))
        return 0
    check_engine(args.engine, args.listen)
    files = export_docker.docker(args.ini, args.output_dir)
    export_docker.write(files, args.output_dir)
    return 0


def fail(message: str) -> int:
    print(f"pyramid-lb: error: {message}", file=sys.stderr)
    return 1


def settings_epilog() -> str:
    """The known settings' names, for ``serve --help`` (their docs: README)."""
    from pyramid_lb import ADDON_SETTINGS
    from pyramid_lb.dispatcher.config import DISPATCHER_SETTINGS
    from pyramid_lb.settings import ADDON_PREFIX

    def block(title: str, names) -> str:
        return (
            title
            + "\n"
            + textwrap.fill(
                ", ".join(names), width=78, initial_indent="  ", subsequent_indent="  "
            )
        )

    return "\n\n".join(
        (
            block("[app:dispatcher] settings:", (s.name for s in DISPATCHER_SETTINGS)),
            block(
                f"[app:main] {ADDON_PREFIX}* settings (the add-on):",
                (ADDON_PREFIX + s.name for s in ADDON_SETTINGS),
            ),
            "Each is described in the settings reference of pyramid_lb's README.",
        )
    )


def version() -> str:
    try:
        return importlib.metadata.version("pyramid_lb")
    except importlib.metadata.PackageNotFoundError:  # run from a bare checkout
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyramid-lb",
        description="Run and inspect Pyramid apps behind pyramid_lb.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "serve",
        help="run the dispatcher and the instances it spawns",
        description="Run [app:dispatcher] of INI under [server:dispatcher], with "
        "the instances\nit spawns (instances = N, ini_files).",
        epilog=settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "ini",
        metavar="INI",
        help="the ini file with [app:dispatcher], [server:dispatcher] and the "
        "app's [app:main]/[server:main]",
    )
    run.add_argument(
        "--instances",
        type=instance_count,
        metavar="N",
        help="spawn N copies of [app:main] (overrides instances = N)",
    )
    run.add_argument(
        "--port",
        type=tcp_port,
        metavar="P",
        help="the dispatcher's port, 1 to 65535 (overrides [server:dispatcher])",
    )
    run.add_argument(
        "--no-dispatcher",
        action="store_true",
        help="run only the supervised instances, for nginx or HAProxy in front",
    )
    run.add_argument(
        "--reload",
        action="store_true",
        help="for development: on a change to the app's code or ini files, "
        "replace the instances one at a time (no request dropped; code that "
        "does not load leaves the old instances serving)",
    )
    run.set_defaults(handler=serve)

    for name, handler, text in (
        ("status", status, "print the instances and their counts as a table"),
        ("reload", reload, "replace every instance, one at a time"),
        ("scale", scale, "change the number of instances"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument(
            "target",
            metavar="URL|INI",
            help="the dispatcher's URL (http://HOST:PORT), or the ini file to "
            "read its [server:dispatcher] from",
        )
        if name == "scale":
            command.add_argument(
                "instances",
                type=instance_count,
                metavar="N",
                help="how many copies of [app:main] to run from now on",
            )
        command.set_defaults(handler=handler)

    front = commands.add_parser(
        "export",
        help="print an nginx or HAProxy configuration equivalent to the "
        "dispatcher, or a systemd unit, Kubernetes objects or Docker files",
        description="Print a complete nginx or HAProxy configuration doing what "
        "[app:dispatcher] of INI does, in front of the instances that "
        "`pyramid-lb serve INI --no-dispatcher` runs; or a systemd unit running "
        "`pyramid-lb serve INI`; or Kubernetes objects, one pod per instance; "
        "or a Dockerfile and a compose file running `pyramid-lb serve INI` in "
        "a container.",
    )
    front.add_argument(
        "engine",
        choices=("nginx", "haproxy", "systemd", "kubernetes", "docker"),
        help="nginx or haproxy: a front end's configuration; systemd: a unit "
        "running `pyramid-lb serve INI`; kubernetes: a Deployment (one pod per "
        "instance, each running pserve INI), a Service and a "
        "PodDisruptionBudget, as one YAML file; docker: a Dockerfile and a "
        "compose.yaml (see --output-dir)",
    )
    front.add_argument(
        "ini", metavar="INI", help="the ini file with [app:dispatcher] to export"
    )
    front.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="nginx and haproxy: where to listen (default: as [server:dispatcher])",
    )
    front.add_argument(
        "-o", "--output", metavar="FILE", help="write to FILE rather than stdout"
    )
    front.add_argument(
        "--output-dir",
        metavar="DIR",
        help="docker: write DIR/Dockerfile and DIR/compose.yaml (usually the "
        "ini file's directory, the build context), replacing only files an "
        "earlier export wrote; without it both are printed, each after a "
        "'# ==> NAME <==' line",
    )
    front.set_defaults(handler=export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args)
    except StartupError as exc:
        return fail(str(exc))
