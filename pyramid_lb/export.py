"""``pyramid-lb export``: the dispatcher's setup as nginx or HAProxy configuration."""

from __future__ import annotations

import configparser
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from paste.deploy.loadwsgi import APP, SERVER, loadcontext

from pyramid_lb.affinity_cookie import sign
from pyramid_lb.dispatcher.admin import PREFIX
from pyramid_lb.dispatcher.cluster import parse_backend_url
from pyramid_lb.settings import SettingsError, parse_dispatcher

ENGINES = ("nginx", "haproxy")


class ExportError(Exception):
    """The export stopped for a reason told in one line."""


class Server(NamedTuple):
    """An instance as the front end sees it."""

    name: str  # its id (PYRAMID_LB_INSTANCE for spawned ones)
    host: str
    port: int
    weight: int  # 1 unless the strategy uses weights, as in the dispatcher
    cookie: str | None  # its affinity cookie value: its id, signed


class Site(NamedTuple):
    """What an export needs from an ini file."""

    ini: str
    settings: dict[str, Any]
    servers: list[Server]
    binds: list[tuple[str, str]]  # (host, port) pairs to listen on


def load(ini: str, listen: str | None = None) -> Site:
    """Read ``[app:dispatcher]`` and ``[server:dispatcher]`` of ``ini``."""
    if not os.path.isfile(ini):
        raise ExportError(f"{ini}: no such file")
    path = os.path.abspath(ini)
    try:
        local_conf = loadcontext(APP, "config:" + path, name="dispatcher").local_conf
    except LookupError:
        raise ExportError(f"{ini} has no [app:dispatcher] section") from None
    except (ImportError, configparser.Error) as exc:
        raise ExportError(f"{ini}: {exc}") from None
    try:
        settings = parse_dispatcher(local_conf)
    except SettingsError as exc:
        raise ExportError(f"[app:dispatcher] {exc}") from None
    return Site(path, settings, _servers(path, settings), _binds(path, listen))


def _servers(path: str, settings: dict[str, Any]) -> list[Server]:
    """The supervisor's plan: copies of ``path``, then ``ini_files``, each
    named ``<stem>-<n>``, on consecutive ports; then ``backends``."""
    here = os.path.dirname(path)
    plan = [path] * settings["instances"]
    for name in settings["ini_files"]:
        plan.append(os.path.join(here, name))
        if not os.path.isfile(plan[-1]):
            raise ExportError(f"[app:dispatcher] ini_files: {name!r} is not a file")
    numbers: dict[str, int] = {}
    members = []
    for port, spawned in enumerate(plan, settings["base_port"]):
        stem = Path(spawned).stem
        numbers[stem] = numbers.get(stem, 0) + 1
        members.append((f"{stem}-{numbers[stem]}", "127.0.0.1", port, 1))
        if port > 65535:
            raise ExportError("[app:dispatcher] base_port leaves too few ports")
    for spec in settings["backends"]:
        host, port = parse_backend_url(spec.url)
        members.append((f"{host}:{port}", host, port, spec.weight))
    if not members:
        raise ExportError(
            "[app:dispatcher] has no instances: set instances, ini_files or backends"
        )
    weighted = settings["strategy"] in ("weighted_round_robin", "hash")
    secret = settings["affinity_secret"] if settings["sticky"] != "off" else None
    return [
        Server(
            name, host, port, weight if weighted else 1, secret and sign(name, secret)
        )
        for name, host, port, weight in members
    ]


def _binds(path: str, listen: str | None) -> list[tuple[str, str]]:
    """Where to listen: ``listen``, else what ``[server:dispatcher]`` says."""
    if listen is not None:
        entries = [listen]
    else:
        try:
            conf = loadcontext(SERVER, "config:" + path, name="dispatcher").local_conf
        except LookupError:
            raise ExportError(
                f"{path} has no [server:dispatcher] section: give --listen HOST:PORT"
            ) from None
        entries = str(conf.get("listen") or "").split() or [
            f"{conf.get('host') or '0.0.0.0'}:{conf.get('port') or 8080}"
        ]
    binds = []
    for entry in entries:
        host, _, port = entry.rpartition(":")
        if not (port.isdigit() and 0 < int(port) < 65536):
            raise ExportError(
                f"cannot listen on {entry!r}: a front end needs a fixed port "
                "(give --listen HOST:PORT)"
            )
        binds.append((host or "*", port))
    return binds


def _time(seconds: float) -> str:
    """A duration both engines read: ``2s`` or ``250ms``."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _size(size: int) -> str:
    """A size for nginx: ``1g``, ``512k`` or bytes."""
    for unit, shift in (("g", 30), ("m", 20), ("k", 10)):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(max(size, 1))  # nginx reads 0 as "no limit"


def _header(site: Site, engine: str, saved_as: str, run: str) -> list[str]:
    """The opening comment: where the file comes from and how to run it."""
    return [
        f"# {engine} configuration generated by `pyramid-lb export {engine}` from",
        f"# [app:dispatcher] in {site.ini}.",
        "# Start the instances it fronts (supervised, without the dispatcher):",
        f"#     pyramid-lb serve {site.ini} --no-dispatcher",
        f"# then {engine}, from the directory holding this file saved as {saved_as}:",
        f"#     {run}",
        "# Spawned instances are assumed to get base_port and the next ports, free",
        "# ones: the supervisor skips ports in use, and a rolling restart (SIGHUP)",
        "# moves instances to new ports and names. Export again after either.",
        "",
    ]


# -- nginx -------------------------------------------------------------------

_NGINX_MAIN = """\
worker_processes auto;
# Relative paths are under nginx's prefix (-p): no root needed, nothing outside.
pid nginx.pid;
error_log error.log warn;

events {
    worker_connections 1024;
}

http {
    client_body_temp_path client_body_temp;
    proxy_temp_path proxy_temp;
    fastcgi_temp_path fastcgi_temp;
    uwsgi_temp_path uwsgi_temp;
    scgi_temp_path scgi_temp;
    server_tokens off;
    log_format pyramid_lb '$remote_addr [$time_local] "$request" $status '
                          '$body_bytes_sent $request_time '
                          'upstream=$upstream_addr upstream_status=$upstream_status';
    access_log access.log pyramid_lb;
"""

_NGINX_PROXY = """\
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Forwarded-Port $server_port;
            # nginx OSS has only passive health checks: health_check_path is
            # not probed, so a draining instance keeps getting requests until
            # it stops. An instance is left alone for fail_timeout (eject_time)
            # after max_fails (eject_after) failed requests: connection errors
            # and 502/503/504 answers, retried on another instance unless a
            # request with a non-idempotent method (POST...) already went out.
            # Timeouts, connect ones included here, count but are not retried.
            proxy_next_upstream error http_502 http_503 http_504;
"""


def _nginx_var(kind: str, name: str) -> str:
    """The nginx variable of a cookie or a header; ExportError if there is none."""
    if kind == "cookie" and re.fullmatch(r"\w+", name, re.ASCII):
        return f"$cookie_{name}"
    if kind == "header" and re.fullmatch(r"[\w-]+", name, re.ASCII):
        return "$http_" + name.lower().replace("-", "_")
    raise ExportError(
        f"nginx has no variable for the {kind} {name!r} (letters, digits and _ only)"
    )


def _nginx_upstream(
    site: Site, name: str, method: list[str], pinned: int | None = None
) -> list[str]:
    """An upstream block; with ``pinned``, that server first, the others backup."""
    settings = site.settings
    fails = (
        f"max_fails={settings['eject_after']} "
        f"fail_timeout={_time(settings['eject_time'])}"
    )
    lines = [f"    upstream {name} {{", *method, f"        zone {name} 64k;"]
    for index, server in enumerate(site.servers):
        options = fails + (f" weight={server.weight}" if server.weight != 1 else "")
        if pinned is not None and index != pinned:
            options += " backup"
        lines.append(
            f"        server {server.host}:{server.port} {options};  # {server.name}"
        )
    if settings["pool_size"]:
        lines.append(f"        keepalive {settings['pool_size']};")
    return lines + ["    }", ""]


def _nginx_method(site: Site) -> tuple[list[str], list[str]]:
    """The balancing lines of the main upstream, and the maps they need."""
    settings = site.settings
    strategy = settings["strategy"]
    if strategy == "least_connections":
        return ["        least_conn;"], []
    if strategy == "p2c":
        return ["        random two least_conn;"], []
    if strategy != "hash":  # round robin, by weight for weighted_round_robin
        return [], []
    kind, _, name = settings["hash_key"].partition(":")
    key = {"client": "$remote_addr", "path": "$uri"}.get(kind)
    maps = []
    if key is None:
        # As in the dispatcher, requests without the key are spread (a
        # random id each) rather than all hashed to one instance.
        var = _nginx_var(kind, name)
        key = "$pyramid_lb_hash_key"
        maps = [f"    map {var} {key} {{", '        "" $request_id;']
        maps += [f"        default {var};", "    }", ""]
    return [
        "        # nginx has no bounded loads (hash_balance): a hot key stays on",
        "        # its instance however loaded.",
        f"        hash {key} consistent;",
    ], maps


def _nginx_sticky(site: Site) -> list[str]:
    """Maps that route a client by its affinity cookie (and set it, for insert)."""
    settings = site.settings
    cookie = _nginx_var("cookie", settings["affinity_cookie"])
    values = [server.cookie for server in site.servers]
    lines = [
        "    # Affinity: a client whose cookie names an instance goes to that one",
        "    # while it answers, else to the others (the backup servers of its",
        "    # group), where it is pinned anew.",
        f"    map {cookie} $pyramid_lb_upstream {{",
        "        default pyramid_lb;",
        *(f'        "{value}" pyramid_lb_{i};' for i, value in enumerate(values)),
        "    }",
        "",
    ]
    if settings["sticky"] == "insert":
        lines += [
            "    # sticky = insert: the cookie of the instance that answered, unless",
            "    # the client has it already. (Unlike the dispatcher, nginx does not",
            "    # hide it from the instances.)",
            "    map $upstream_addr $pyramid_lb_pin {",
            '        default "";',
            *(
                f'        "~(^|\\s){re.escape(f"{s.host}:{s.port}")}$" "{value}";'
                for s, value in zip(site.servers, values, strict=True)
            ),
            "    }",
            f'    map "{cookie}|$pyramid_lb_pin" $pyramid_lb_set_cookie {{',
            f'        default "{settings["affinity_cookie"]}=$pyramid_lb_pin; '
            'Path=/; HttpOnly; SameSite=Lax";',
            '        "~\\|$" "";',
            '        "~^([^|]+)\\|\\1$" "";',
            "    }",
            "",
        ]
    return lines


def nginx(site: Site) -> str:
    """A complete nginx.conf for the site."""
    settings = site.settings
    run = 'nginx -p "$PWD" -c "$PWD/nginx.conf" -e stderr -g \'daemon off;\''
    lines = _header(site, "nginx", "nginx.conf", run) + _NGINX_MAIN.splitlines()
    method, maps = _nginx_method(site)
    lines += [""] + maps
    target = "pyramid_lb"
    pinned: list[str] = []
    if settings["sticky"] != "off":
        lines += _nginx_sticky(site)
        target = "$pyramid_lb_upstream"
        for index in range(len(site.servers)):
            pinned += _nginx_upstream(site, f"pyramid_lb_{index}", [], index)
    lines += _nginx_upstream(site, "pyramid_lb", method) + pinned
    lines += ["    server {"]
    lines += [f"        listen {host}:{port};" for host, port in site.binds]
    lines += [
        f"        client_max_body_size {_size(settings['max_body_size'])};",
        "",
        "        # The dispatcher's own pages: not exposed here.",
        f"        location ^~ {PREFIX}/ {{ return 404; }}",
        f"        location = {PREFIX} {{ return 404; }}",
        "",
        "        location / {",
        f"            proxy_pass http://{target};",
        *_NGINX_PROXY.splitlines(),
        f"            proxy_next_upstream_tries {settings['retries'] + 1};",
        f"            proxy_connect_timeout {_time(settings['connect_timeout'])};",
        f"            proxy_read_timeout {_time(settings['read_timeout'])};",
        f"            proxy_send_timeout {_time(settings['read_timeout'])};",
    ]
    if settings["sticky"] == "insert":
        lines.append("            add_header Set-Cookie $pyramid_lb_set_cookie always;")
    return "\n".join(lines + ["        }", "    }", "}", ""])


# -- HAProxy -----------------------------------------------------------------

_HAPROXY_BALANCE = {
    "round_robin": "roundrobin",
    "weighted_round_robin": "roundrobin",
    "least_connections": "leastconn",
    "p2c": "random(2)",
    "client": "source",
    "path": "uri path-only",
    "header": "hdr({})",
    "cookie": "hash req.cook({})",
}


def _haproxy_word(key: str, name: str) -> str:
    """``name``, if HAProxy reads it as written; ExportError otherwise."""
    if name and not re.fullmatch(r"[\w.-]+", name, re.ASCII):
        raise ExportError(f"{key}: HAProxy cannot take the name {name!r} as written")
    return name


def haproxy(site: Site) -> str:
    """A complete HAProxy configuration for the site."""
    settings = site.settings
    lines = _header(site, "haproxy", "haproxy.cfg", "haproxy -db -f haproxy.cfg")
    lines += [
        "global",
        "    # Logs to stdout; no chroot, pid file or socket: no files outside.",
        "    log stdout format raw local0",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    option http-keep-alive",
        f"    timeout connect {_time(settings['connect_timeout'])}",
        f"    timeout server {_time(settings['read_timeout'])}",
        "    # as long as waitress keeps an idle client (channel_timeout)",
        "    timeout client 120s",
        "",
        "frontend pyramid_lb",
        *(f"    bind {host.strip('[]')}:{port}" for host, port in site.binds),
        "    # The dispatcher's own pages: not exposed here.",
        f"    http-request deny deny_status 404 if {{ path,url_dec {PREFIX} }} "
        f"|| {{ path,url_dec -m beg {PREFIX}/ }}",
        "    # Bodies announced above max_body_size (a chunked body is not measured).",
        "    http-request deny deny_status 413 if "
        f"{{ req.hdr_val(content-length) gt {settings['max_body_size']} }}",
        "    option forwardfor",
        "    http-request set-header X-Forwarded-Proto %[ssl_fc,iif(https,http)]",
        "    http-request set-header X-Forwarded-Host %[req.hdr(host)]",
        "    http-request set-header X-Forwarded-Port %[dst_port]",
        "    default_backend pyramid_lb",
        "",
        "backend pyramid_lb",
    ]
    if settings["strategy"] == "hash":
        kind, _, name = settings["hash_key"].partition(":")
        _haproxy_word("hash_key", name)
        factor = max(101, round(settings["hash_balance"] * 100))
        lines += [
            f"    balance {_HAPROXY_BALANCE[kind].format(name)}",
            "    hash-type consistent",
            "    # bounded loads: an instance takes at most hash_balance times the",
            "    # average, in percent (above 100)",
            f"    hash-balance-factor {factor}",
        ]
    else:
        lines.append(f"    balance {_HAPROXY_BALANCE[settings['strategy']]}")
    cookie = _haproxy_word("affinity_cookie", settings["affinity_cookie"])
    if settings["sticky"] == "cookie":
        lines += [
            "    # Passive cookie persistence: the app sets the affinity cookie and",
            "    # HAProxy only reads it; each server's value is the one its",
            "    # instance signs (its id, PYRAMID_LB_INSTANCE). Unlike the",
            "    # dispatcher, a draining instance (down here) loses its clients.",
            f"    cookie {cookie}",
        ]
    elif settings["sticky"] == "insert":
        lines += [
            "    # HAProxy sets the affinity cookie, with the dispatcher's values.",
            f"    cookie {cookie} insert indirect nocache httponly attr SameSite=Lax",
        ]
    checks = (
        f"check inter {_time(settings['health_check_interval'])} "
        f"rise {settings['rise']} fall {settings['fall']}"
    )
    if settings["eject_after"]:
        # The dispatcher's ejection: that many failures in a row take an
        # instance out, until its health checks pass again.
        checks += f" observe layer7 error-limit {settings['eject_after']}"
        checks += " on-error mark-down"
    lines += [
        "    # A failed connection is retried on another instance, even past a",
        "    # client's affinity cookie (its instance is down or gone).",
        "    option redispatch 1",
        f"    retries {settings['retries']}",
        f"    option httpchk GET {settings['health_check_path']}",
        "    http-check expect status 200",
        f"    timeout check {_time(settings['health_check_timeout'])}",
        "    http-reuse safe",
        f"    default-server {checks} pool-max-conn {settings['pool_size']}",
    ]
    # HAProxy weights go up to 256: larger ones are scaled down together.
    scale = min(1.0, 256 / max(server.weight for server in site.servers))
    for server in site.servers:
        weight = max(1, round(server.weight * scale))
        options = f" weight {weight}" if weight != 1 else ""
        if server.cookie:
            options += f" cookie {server.cookie}"
        name = re.sub(r"[^\w.:-]", "_", server.name, flags=re.ASCII)
        lines.append(f"    server {name} {server.host}:{server.port}{options}")
    return "\n".join(lines + [""])


def export(engine: str, ini: str, listen: str | None = None) -> str:
    """The ``engine`` (nginx or haproxy) configuration for ``ini``."""
    if engine not in ENGINES:
        raise ExportError(f"{engine!r} is not an engine; expected nginx or haproxy")
    site = load(ini, listen)
    return nginx(site) if engine == "nginx" else haproxy(site)
