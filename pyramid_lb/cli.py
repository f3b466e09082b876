"""The ``pyramid-lb`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request


def serve(args) -> int:
    from pyramid_lb.dispatcher.serve import ServeError, serve

    try:
        serve(
            args.ini,
            instances=args.instances,
            port=args.port,
            dispatch=not args.no_dispatcher,
        )
    except ServeError as exc:
        return fail(str(exc))
    return 0


def admin_url(target: str) -> str:
    """The dispatcher's base URL: given, or read from an ini file."""
    if "://" in target:
        return target.rstrip("/")
    if not os.path.isfile(target):
        raise ValueError(f"{target}: neither a URL nor an ini file")
    from paste.deploy.loadwsgi import SERVER, loadcontext

    from pyramid_lb.dispatcher.instance import listen_host

    conf = loadcontext(
        SERVER, "config:" + os.path.abspath(target), name="dispatcher"
    ).local_conf
    listen = str(conf.get("listen") or "").split()
    port = listen[0].rpartition(":")[2] if listen else conf.get("port", "8080")
    host = listen_host(conf) if listen or conf.get("host") else "127.0.0.1"
    if host in ("*", "0.0.0.0", "[::]", "localhost", ""):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def get_json(target: str, path: str) -> dict:
    """GET a dispatcher's JSON page."""
    url = admin_url(target) + path
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise ValueError(f"{url}: {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise ValueError(f"cannot reach {target}: {exc.reason}") from None


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
    request = urllib.request.Request(
        admin_url(target) + "/_lb/" + action,
        method="POST",
        headers={"X-Requested-With": "pyramid-lb"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            detail = json.load(exc).get("error", exc.reason)
        except ValueError:
            detail = exc.reason
        raise ValueError(f"{exc.code} {detail}") from None
    except urllib.error.URLError as exc:
        raise ValueError(f"cannot reach {target}: {exc.reason}") from None


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
    from pyramid_lb.export import ExportError, export

    try:
        text = export(args.engine, args.ini, listen=args.listen)
    except ExportError as exc:
        return fail(str(exc))
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(text)
    except OSError as exc:
        return fail(f"cannot write {args.output}: {exc.strerror}")
    return 0


def fail(message: str) -> int:
    print(f"pyramid-lb: error: {message}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyramid-lb",
        description="Run and inspect Pyramid apps behind pyramid_lb.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "serve",
        help="run the dispatcher and the instances it spawns",
        description="Run [app:dispatcher] of INI under [server:dispatcher], "
        "with the instances it spawns (instances = N, ini_files).",
    )
    run.add_argument("ini", metavar="INI", help="the ini file")
    run.add_argument(
        "--instances", type=int, metavar="N", help="spawn N copies of [app:main]"
    )
    run.add_argument("--port", type=int, metavar="P", help="the dispatcher's port")
    run.add_argument(
        "--no-dispatcher",
        action="store_true",
        help="run only the supervised instances, for nginx or HAProxy in front",
    )
    run.set_defaults(handler=serve)

    for name, handler, text in (
        ("status", status, "print the instances and their counts as a table"),
        ("reload", reload, "replace every instance, one at a time"),
        ("scale", scale, "change the number of instances"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument(
            "target", metavar="URL|INI", help="the dispatcher, or its ini file"
        )
        if name == "scale":
            command.add_argument("instances", type=int, metavar="N")
        command.set_defaults(handler=handler)

    front = commands.add_parser(
        "export",
        help="print an nginx or HAProxy configuration equivalent to the dispatcher",
        description="Print a complete nginx or HAProxy configuration doing what "
        "[app:dispatcher] of INI does, in front of the instances that "
        "`pyramid-lb serve INI --no-dispatcher` runs.",
    )
    front.add_argument("engine", choices=("nginx", "haproxy"))
    front.add_argument("ini", metavar="INI", help="the ini file")
    front.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="where to listen (default: as [server:dispatcher])",
    )
    front.add_argument(
        "-o", "--output", metavar="FILE", help="write to FILE rather than stdout"
    )
    front.set_defaults(handler=export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.handler(args)
