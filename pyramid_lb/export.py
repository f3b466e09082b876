"""``pyramid-lb export``: the dispatcher's setup as nginx or HAProxy
configuration, or as a systemd unit running it (Kubernetes and Docker: in
:mod:`pyramid_lb.export_kubernetes` and :mod:`pyramid_lb.export_docker`)."""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
from typing import NamedTuple

from pyramid_lb.affinity_cookie import sign
from pyramid_lb.dispatcher import make_dispatcher
from pyramid_lb.dispatcher.admin import PREFIX
from pyramid_lb.dispatcher.cache import FILL_WAIT
from pyramid_lb.dispatcher.config import DispatcherConfig, retry_after
from pyramid_lb.dispatcher.proxy import FORWARDING_HEADERS
from pyramid_lb.process import StartupError
from pyramid_lb.process import load as load_section
from pyramid_lb.server import graceful_timeout
from pyramid_lb.settings import SettingsError

ENGINES = ("nginx", "haproxy", "systemd", "kubernetes", "docker")
#: What each engine without --listen runs instead of a front end.
_RUNS = {
    "systemd": "the unit runs the dispatcher, which listens as "
    "[server:dispatcher] says",
    "kubernetes": "each pod serves [server:main] on base_port, behind a Service on "
    "[server:dispatcher]'s port",
    "docker": "the container runs the dispatcher, which listens as "
    "[server:dispatcher] says",
}


class Server(NamedTuple):
    """An instance as the front end sees it."""

    name: str  # its id (PYRAMID_LB_INSTANCE for spawned ones)
    host: str
    port: int
    weight: int  # 1 unless the strategy uses weights, as in the dispatcher
    cookie: str | None  # its affinity cookie value: its id, signed
    max_in_flight: int | None  # its cap, None for none


class Site(NamedTuple):
    """What an export needs from an ini file."""

    ini: str
    settings: DispatcherConfig
    servers: list[Server]
    binds: list[tuple[str, str]]  # (host, port) pairs to listen on


def load(ini: str, listen: str | None = None) -> Site:
    """Read ``[app:dispatcher]`` and ``[server:dispatcher]`` of ``ini``."""
    dispatcher = _dispatcher(ini)
    path = os.path.abspath(ini)
    return Site(path, dispatcher.config, _servers(dispatcher), _binds(path, listen))


def _dispatcher(ini: str):
    """The ``[app:dispatcher]`` of ``ini``, built, not started: nothing
    spawns, nothing connects."""
    context = load_section(ini, "app:dispatcher")
    try:
        return make_dispatcher(context.global_conf, **context.local_conf)
    except SettingsError as exc:
        raise StartupError(str(exc)) from None


def _servers(dispatcher) -> list[Server]:
    """The instances the supervisor starts, then the ``backends``, each with
    its ``max_in_flight`` as the dispatcher reads it."""
    settings = dispatcher.config
    members = []
    if dispatcher.supervisor is not None:
        for name, ini, port in dispatcher.supervisor.planned():
            if port > 65535:
                raise StartupError("[app:dispatcher] base_port leaves too few ports")
            cap = dispatcher.supervisor.in_flight_cap(ini)
            members.append((name, "127.0.0.1", port, 1, cap))
    # The dispatcher's own (not started) Backends of ``backends``: their caps
    # are resolved there (an own max_in_flight=N, else the setting's number;
    # auto: none).
    members += [
        (b.name, b.host, b.port, b.weight, b.max_in_flight)
        for b in dispatcher.cluster.backends
    ]
    weighted = settings.strategy in ("weighted_round_robin", "hash")
    secret = settings.affinity_secret if settings.sticky != "off" else None
    return [
        Server(
            name,
            host,
            port,
            weight if weighted else 1,
            secret and sign(name, secret),
            cap,
        )
        for name, host, port, weight, cap in members
    ]


def _binds(path: str, listen: str | None) -> list[tuple[str, str]]:
    """Where to listen: ``listen``, else what ``[server:dispatcher]`` says."""
    if listen is not None:
        entries = [listen]
    else:
        hint = ": give --listen HOST:PORT"
        conf = load_section(path, "server:dispatcher", hint=hint).local_conf
        entries = str(conf.get("listen") or "").split() or [
            f"{conf.get('host') or '0.0.0.0'}:{conf.get('port') or 8080}"
        ]
    binds = []
    for entry in entries:
        host, _, port = entry.rpartition(":")
        if not (port.isdigit() and 0 < int(port) < 65536):
            raise StartupError(
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
            # nginx OSS has only passive health checks: health_check_path is
            # not probed, so a draining instance keeps getting requests until
            # it stops. An instance is left alone for fail_timeout (eject_time)
            # after max_fails (eject_after) failed attempts: connection errors
            # and timeouts, retried on another instance unless a request with
            # a non-idempotent method (POST...) already went out. An answer is
            # never one: an app's own 503 (with its Retry-After) reaches the
            # client as it is, and does not take the instance out.
            proxy_next_upstream error timeout;
"""
# Forwarding headers a client may send that a front end would pass on, besides
# those it sets: nginx cannot drop headers by prefix, so the X-Forwarded-*
# ones in use are named.
_CLEARED = (
    "X-Forwarded-By",
    "X-Forwarded-Server",
    "X-Forwarded-Ssl",
    "X-Forwarded-Scheme",
    "X-Forwarded-Protocol",
    "X-Forwarded-Uri",
    *FORWARDING_HEADERS,
)
# The header a trusted front names the client in, for nginx's realip.
_REAL_IP_HEADERS = {
    "x-forwarded-for": "X-Forwarded-For",
    "x-real-ip": "X-Real-IP",
    "cf-connecting-ip": "CF-Connecting-IP",
}


def _nginx_var(kind: str, name: str) -> str:
    """The nginx variable of a cookie or a header; StartupError if there is none."""
    if kind == "cookie" and re.fullmatch(r"\w+", name, re.ASCII):
        return f"$cookie_{name}"
    if kind == "header" and re.fullmatch(r"[\w-]+", name, re.ASCII):
        return "$http_" + name.lower().replace("-", "_")
    raise StartupError(
        f"nginx has no variable for the {kind} {name!r} (letters, digits and _ only)"
    )


def _nginx_upstream(
    site: Site, name: str, method: list[str], pinned: int | None = None
) -> list[str]:
    """An upstream block; with ``pinned``, that server first, the others backup."""
    settings = site.settings
    fails = (
        f"max_fails={settings.eject_after} fail_timeout={_time(settings.eject_time)}"
    )
    lines = [f"    upstream {name} {{", *method, f"        zone {name} 64k;"]
    for index, server in enumerate(site.servers):
        options = fails + (f" weight={server.weight}" if server.weight != 1 else "")
        if server.max_in_flight is not None:
            options += f" max_conns={server.max_in_flight}"
        if pinned is not None and index != pinned:
            options += " backup"
        lines.append(
            f"        server {server.host}:{server.port} {options};  # {server.name}"
        )
    if settings.pool_size:
        lines.append(f"        keepalive {settings.pool_size};")
    return lines + ["    }", ""]


def _nginx_limits(site: Site) -> list[str]:
    """What nginx OSS makes of max_in_flight, the queue and slow_start."""
    settings = site.settings
    lines = []
    if any(server.max_in_flight is not None for server in site.servers):
        if settings.queue_size:
            size, timeout = settings.queue_size, _time(settings.queue_timeout)
            instead = [
                f"    # where the dispatcher has it wait in line (queue_size = {size},",
                f"    # queue_timeout = {timeout}) for a slot, else answers 503.",
            ]
        else:
            instead = ["    # where the dispatcher answers 503 (queue_size = 0)."]
        lines += [
            "    # max_in_flight: max_conns on each server, counted over all the",
            "    # workers (the zone). nginx OSS has no queue (the queue directive",
            "    # is nginx Plus only): a request that finds every instance at",
            '    # max_conns gets 502 at once ("no live upstreams" in error.log),',
            *instead,
        ]
        if settings.strategy == "hash" or settings.sticky != "off":
            lines += [
                "    # One whose own instance (by hash or affinity) is at max_conns",
                "    # goes to another, where the dispatcher would wait for its own.",
            ]
    if settings.slow_start:
        lines += [
            "    # nginx OSS has no slow start (slow_start= is nginx Plus only): an",
            "    # instance back in rotation gets its full share at once, not over",
            f"    # slow_start = {_time(settings.slow_start)}.",
        ]
    return lines + [""] if lines else []


def _nginx_method(site: Site) -> tuple[list[str], list[str]]:
    """The balancing lines of the main upstream, and the maps they need."""
    settings = site.settings
    strategy = settings.strategy
    if strategy == "least_connections":
        return ["        least_conn;"], []
    if strategy == "p2c":
        return ["        random two least_conn;"], []
    if strategy != "hash":  # round robin, by weight for weighted_round_robin
        return [], []
    kind, _, name = settings.hash_key.partition(":")
    key = {"client": "$remote_addr", "path": "$uri"}.get(kind)
    maps = []
    if key is None:
        # As in the dispatcher, requests without the key are spread (a
        # random id each) rather than all hashed to one instance.
        var = _nginx_var(kind, name)
        key = "$pyramid_lb_hash_key"
        maps = [f"    map {var} {key} {{", '        "" $request_id;']
        maps += [f"        default {var};", "    }", ""]
    comment = []
    if settings.hash_balance is not None:
        comment = [
            "        # nginx has no bounded loads (hash_balance): a hot key stays on",
            "        # its instance however loaded.",
        ]
    return [*comment, f"        hash {key} consistent;"], maps


def _nginx_sticky(site: Site) -> list[str]:
    """Maps that route a client by its affinity cookie (and set it, for insert)."""
    settings = site.settings
    cookie = _nginx_var("cookie", settings.affinity_cookie)
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
    if settings.sticky == "insert":
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
            f'        default "{settings.affinity_cookie}=$pyramid_lb_pin; '
            'Path=/; HttpOnly; SameSite=Lax";',
            '        "~\\|$" "";',
            '        "~^([^|]+)\\|\\1$" "";',
            "    }",
            "",
        ]
    return lines


def _trust(site: Site) -> tuple[list[str], int | str, frozenset[str]]:
    """The trusted fronts' networks (``*`` for anyone), their count, headers."""
    settings = site.settings
    proxies = settings.trusted_proxies
    networks = ["*"] if proxies.anyone else [str(n) for n in proxies.networks]
    return networks, settings.trusted_proxy_count, settings.trusted_headers


# The nearest (last) value of a list header, read by the maps below.
_NEAREST = "(?:.*,[ \\t]*)?"


def _nginx_forwarded(site: Site) -> tuple[list[str], list[str]]:
    """What the instances are told: the http-level lines working it out, and
    the location's ``proxy_set_header`` lines."""
    networks, count, headers = _trust(site)
    http = [
        "    # What the instances are told, as the dispatcher tells them: the",
        "    # client's own address, scheme and Host, and as X-Forwarded-Port the",
        "    # port of that Host (else the scheme's default), not nginx's own:",
        "    # behind a port mapping the app still builds its clients' URLs.",
    ]
    scheme, host, port, chain = "$scheme", "$http_host", "", "$remote_addr"
    prefix = '""'
    if networks:
        if count not in (1, "auto"):
            raise StartupError(
                f"trusted_proxy_count = {count}: nginx's realip trusts one hop, "
                "or every trusted one (auto); use 1 or auto"
            )
        http += [
            "    # Trusted fronts (trusted_proxies). The nearest value of each",
            "    # header they set is read.",
            *(
                f"    set_real_ip_from {n};"
                for n in (["0.0.0.0/0", "::/0"] if "*" in networks else networks)
            ),
        ]
        client = [_REAL_IP_HEADERS[h] for h in headers if h in _REAL_IP_HEADERS]
        if client:
            http.append(f"    real_ip_header {client[0]};")
            if count == "auto":
                http.append("    real_ip_recursive on;")
        http += [
            "    geo $realip_remote_addr $pyramid_lb_trusted {",
            f"        default {1 if '*' in networks else 0};",
            *(f"        {n} 1;" for n in networks if n != "*"),
            "    }",
            "    # A trusted front's chain goes on, the client it names last.",
            "    map $pyramid_lb_trusted $pyramid_lb_forwarded_for {",
            "        1 $proxy_add_x_forwarded_for;",
            "        default $remote_addr;",
            "    }",
        ]
        chain = "$pyramid_lb_forwarded_for"
        if "x-forwarded-proto" in headers:
            http += [
                '    map "$pyramid_lb_trusted|$http_x_forwarded_proto" '
                "$pyramid_lb_scheme {",
                f'        "~*^1\\|{_NEAREST}https[ \\t]*$" https;',
                f'        "~*^1\\|{_NEAREST}http[ \\t]*$" http;',
                "        default $scheme;",
                "    }",
            ]
            scheme = "$pyramid_lb_scheme"
        for header, pattern, fallback in (
            ("host", "[^, \\t]+", "$http_host"),
            ("port", "[0-9]+", '""'),
            ("prefix", "/[^,]*?", '""'),
        ):
            if f"x-forwarded-{header}" in headers:
                http += [
                    f'    map "$pyramid_lb_trusted|$http_x_forwarded_{header}" '
                    f"$pyramid_lb_{header}_trusted {{",
                    f'        "~^1\\|{_NEAREST}(?<pyramid_lb_{header}_value>{pattern})'
                    f'[ \\t]*$" $pyramid_lb_{header}_value;',
                    f"        default {fallback};",
                    "    }",
                ]
        if "x-forwarded-host" in headers:
            host = "$pyramid_lb_host_trusted"
        if "x-forwarded-port" in headers:
            port = "$pyramid_lb_port_trusted"
        if "x-forwarded-prefix" in headers:
            prefix = "$pyramid_lb_prefix_trusted"
    http += [
        f'    map "{port}|{scheme}|{host}" $pyramid_lb_port {{',
        '        "~^(?<pyramid_lb_forwarded>[0-9]+)\\|" $pyramid_lb_forwarded;',
        '        "~:(?<pyramid_lb_explicit>[0-9]+)$" $pyramid_lb_explicit;',
        '        "~*^\\|https\\|" 443;',
        "        default 80;",
        "    }",
        "",
    ]
    location = [
        "            proxy_http_version 1.1;",
        '            proxy_set_header Connection "";',
        f"            proxy_set_header Host {host};",
        f"            proxy_set_header X-Forwarded-For {chain};",
        f"            proxy_set_header X-Forwarded-Proto {scheme};",
        f"            proxy_set_header X-Forwarded-Host {host};",
        "            proxy_set_header X-Forwarded-Port $pyramid_lb_port;",
        f"            proxy_set_header X-Forwarded-Prefix {prefix};",
        "            # Other forwarding headers a client wrote are not passed on.",
        *(f'            proxy_set_header {name} "";' for name in _CLEARED),
    ]
    return http, location


def _nginx_cache_zone(site: Site) -> list[str]:
    """The http-level lines of cache = memory: where nginx keeps its cache."""
    settings = site.settings
    if settings.cache == "off":
        return []
    lines = [
        "    # cache = memory. nginx keeps the answers in files under cache/ (their",
        "    # keys in a shared memory zone), at most cache_size in all. Unlike",
        "    # the dispatcher, it has no cache_max_object: an answer of any size",
        "    # is stored; and it stores nothing without an explicit freshness",
        "    # (max-age, s-maxage, Expires), where the dispatcher also keeps",
        "    # answers that only have a validator, to revalidate them each time.",
        "    # nginx's worker user (nobody, when nginx starts as root) must be",
        "    # able to write there.",
        "    proxy_cache_path cache levels=1:2 keys_zone=pyramid_lb_cache:10m "
        f"max_size={_size(settings.cache_size)} inactive=1d use_temp_path=off;",
        "    # A client's no-cache or max-age=0: nginx would answer from its cache",
        "    # anyway, so such a request is fetched (and its answer stored) again.",
        "    map $http_cache_control$http_pragma $pyramid_lb_no_cache {",
        '        "~*no-cache|max-age=0" 1;',
        '        default "";',
        "    }",
        "",
    ]
    return lines


def _nginx_cache(site: Site) -> list[str]:
    """The location's lines of cache = memory."""
    settings = site.settings
    if settings.cache == "off":
        return []
    skip = ["$pyramid_lb_no_cache", "$http_authorization"]
    if settings.sticky == "insert":  # a pinned request's answer is not shared
        skip.append(_nginx_var("cookie", settings.affinity_cookie))
    lines = [
        "            proxy_cache pyramid_lb_cache;",
        "            # The dispatcher's key: scheme, Host and request target.",
        "            proxy_cache_key $scheme$http_host$request_uri;",
        "            # Stale entries are revalidated (If-None-Match, If-Modified-",
        "            # Since), and one request fills an entry while the others",
        "            # wait for it.",
        "            proxy_cache_revalidate on;",
        "            proxy_cache_lock on;",
        f"            proxy_cache_lock_timeout {_time(FILL_WAIT)};",
        "            # nginx shares no answer with Set-Cookie, private, no-store,",
        "            # no-cache or Vary: *; unlike the dispatcher, it would share one",
        "            # to a request with Authorization, so those skip the cache (even",
        "            # for public answers, which the dispatcher shares).",
        f"            proxy_cache_bypass {' '.join(skip)};",
        f"            proxy_no_cache {' '.join(skip[1:])};",
        "            # HIT, MISS, EXPIRED, REVALIDATED, STALE, BYPASS...; nginx sends",
        "            # no Age header.",
        "            add_header X-Cache $upstream_cache_status always;",
    ]
    if settings.cache_stale_if_error:
        lines += [
            "            # cache_stale_if_error: unlike the dispatcher, nginx serves a",
            "            # stale entry for as long as it keeps it (inactive), not only",
            f"            # {settings.cache_stale_if_error:g} s past its freshness.",
            "            proxy_cache_use_stale error timeout http_500 http_502 "
            "http_503 http_504;",
        ]
    return lines


def nginx(site: Site) -> str:
    """A complete nginx.conf for the site."""
    settings = site.settings
    run = 'nginx -p "$PWD" -c "$PWD/nginx.conf" -e stderr -g \'daemon off;\''
    lines = _header(site, "nginx", "nginx.conf", run) + _NGINX_MAIN.splitlines()
    method, maps = _nginx_method(site)
    forwarded, headers = _nginx_forwarded(site)
    lines += [""] + forwarded + maps
    target = "pyramid_lb"
    pinned: list[str] = []
    if settings.sticky != "off":
        lines += _nginx_sticky(site)
        target = "$pyramid_lb_upstream"
        for index in range(len(site.servers)):
            pinned += _nginx_upstream(site, f"pyramid_lb_{index}", [], index)
    lines += _nginx_limits(site) + _nginx_cache_zone(site)
    lines += _nginx_upstream(site, "pyramid_lb", method) + pinned
    lines += ["    server {"]
    lines += [f"        listen {host}:{port};" for host, port in site.binds]
    lines += [
        f"        client_max_body_size {_size(settings.max_body_size)};",
        "",
        "        # The dispatcher's own pages: not exposed here.",
        f"        location ^~ {PREFIX}/ {{ return 404; }}",
        f"        location = {PREFIX} {{ return 404; }}",
        "",
        "        location / {",
        f"            proxy_pass http://{target};",
        *headers,
        *_NGINX_PROXY.splitlines(),
        f"            proxy_next_upstream_tries {settings.retries + 1};",
        f"            proxy_connect_timeout {_time(settings.connect_timeout)};",
        f"            proxy_read_timeout {_time(settings.read_timeout)};",
        f"            proxy_send_timeout {_time(settings.read_timeout)};",
        *_nginx_cache(site),
    ]
    if settings.sticky == "insert":
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
    """``name``, if HAProxy reads it as written; StartupError otherwise."""
    if name and not re.fullmatch(r"[\w.-]+", name, re.ASCII):
        raise StartupError(f"{key}: HAProxy cannot take the name {name!r} as written")
    return name


def _haproxy_forwarded(site: Site) -> list[str]:
    """Frontend lines setting what the instances are told (as nginx's do)."""
    networks, count, headers = _trust(site)
    lines = [
        "    # What the instances are told, as the dispatcher tells them: the",
        "    # client's own address, scheme and Host, and as X-Forwarded-Port the",
        "    # port of that Host (else the scheme's default), not HAProxy's own.",
        "    http-request set-var(txn.pyramid_lb_proto) ssl_fc,iif(https,http)",
        "    http-request set-var(txn.pyramid_lb_host) req.hdr(host)",
    ]
    trusted = set()
    if networks:
        if count == "auto":
            raise StartupError(
                "trusted_proxy_count = auto: HAProxy has no equal; give the "
                "number of trusted proxies"
            )
        trusted = set(headers)
        addresses = " ".join("0.0.0.0/0 ::/0" if n == "*" else n for n in networks)
        lines[3:3] = [
            "    # Trusted fronts (trusted_proxies).",
            f"    acl pyramid_lb_trusted src {addresses}",
        ]

    def from_front(header: str, target: str, value: str, test: str = "") -> str:
        test = test or f"req.hdr_cnt({header}) gt 0"
        return f"    http-request {target} {value} if pyramid_lb_trusted {{ {test} }}"

    proto = f"req.hdr(x-forwarded-proto,-{count}),lower"
    if "x-forwarded-proto" in trusted:
        lines.append(
            from_front(
                "", "set-var(txn.pyramid_lb_proto)", proto, f"{proto} -m str http https"
            )
        )
    if "x-forwarded-host" in trusted:
        lines.append(
            from_front(
                "x-forwarded-host",
                "set-var(txn.pyramid_lb_host)",
                f"req.hdr(x-forwarded-host,-{count})",
            )
        )
    port = "set-var(txn.pyramid_lb_port)"
    lines += [
        f"    http-request {port} var(txn.pyramid_lb_host),port_only",
        f"    http-request {port} int(443) if {{ var(txn.pyramid_lb_port) -m int 0 }} "
        "{ var(txn.pyramid_lb_proto) -m str https }",
        f"    http-request {port} int(80) if {{ var(txn.pyramid_lb_port) -m int 0 }}",
    ]
    if "x-forwarded-port" in trusted:
        lines.append(
            from_front("x-forwarded-port", port, f"req.hdr(x-forwarded-port,-{count})")
        )
    client = [h for h in _REAL_IP_HEADERS if h in trusted]
    if client:
        hop = f"-{count}" if client[0] == "x-forwarded-for" else "-1"
        lines.append(from_front(client[0], "set-src", f"hdr_ip({client[0]},{hop})"))
    kept = {"X-Forwarded-For", "X-Forwarded-Prefix"}
    lines += [
        "    # Forwarding headers a client wrote are not passed on; a trusted",
        "    # front's X-Forwarded-For chain and prefix are.",
        *(
            f"    http-request del-header {name}"
            + (" if !pyramid_lb_trusted" if name.lower() in trusted else "")
            for name in sorted(kept)
        ),
        *(
            f"    http-request del-header {name}"
            for name in ("X-Forwarded-Proto", "X-Forwarded-Host", "X-Forwarded-Port")
            + _CLEARED
        ),
        "    # The client goes last in X-Forwarded-For, where instances look.",
        "    option forwardfor",
    ]
    if "x-forwarded-host" in trusted:
        lines.append("    http-request set-header Host %[var(txn.pyramid_lb_host)]")
    return lines + [
        "    http-request set-header X-Forwarded-Proto %[var(txn.pyramid_lb_proto)]",
        "    http-request set-header X-Forwarded-Host %[var(txn.pyramid_lb_host)]",
        "    http-request set-header X-Forwarded-Port %[var(txn.pyramid_lb_port)]",
    ]


def _haproxy_queue(site: Site) -> list[str]:
    """Backend lines for the dispatcher's queue, when some server has a cap
    (``maxconn``); without one HAProxy queues nothing."""
    settings = site.settings
    if all(server.max_in_flight is None for server in site.servers):
        return []
    lines = [
        "    # max_in_flight: each server's maxconn. The requests beyond wait in",
        "    # HAProxy's queue (the backend's, or their server's for those bound",
        "    # to it by affinity or hash), in order, then get 503.",
    ]
    if not settings.queue_size:
        return lines + [
            "    # queue_size = 0: no queue. HAProxy always has one: a request that",
            "    # finds every server at maxconn waits in it 1 ms at most.",
            "    timeout queue 1ms",
        ]
    return lines + [
        f"    timeout queue {_time(settings.queue_timeout)}",
        "    # queue_size: HAProxy's queues have no length limit (a server's",
        "    # maxqueue bounds its own queue only, and sends the next requests",
        "    # to other servers), so a request that finds queue_size waiting is",
        "    # refused here, before a server is chosen: even one whose own",
        "    # instance (by hash or affinity) has room, which the dispatcher",
        "    # would serve.",
        "    http-request deny deny_status 503 hdr Retry-After "
        f"{retry_after(settings)} if {{ queue() ge {settings.queue_size} }}",
    ]


def _haproxy_cache(site: Site) -> tuple[list[str], list[str]]:
    """The cache section of cache = memory, and the backend's lines using it."""
    settings = site.settings
    if settings.cache == "off":
        return [], []
    megabytes = min(4095, max(1, settings.cache_size >> 20))
    # HAProxy refuses objects above half its cache.
    largest = min(settings.cache_max_object, (megabytes << 20) // 2)
    section = [
        "# cache = memory. Unlike the dispatcher, HAProxy stores only 200s, and",
        "# none with a Vary other than Accept-Encoding, Referer or Origin; it",
        "# never revalidates (a stale entry is fetched whole again), has no",
        "# request coalescing and no cache_stale_if_error; it does send Age.",
        "cache pyramid_lb",
        "    # cache_size, in megabytes (HAProxy's unit, 4095 at most)",
        f"    total-max-size {megabytes}",
        "    # cache_max_object, at most half the cache",
        f"    max-object-size {largest}",
        "    # HAProxy caps every answer's freshness at this (60 s by default);",
        "    # the dispatcher has no cap: a day here.",
        "    max-age 86400",
        "    process-vary on",
        "",
    ]
    store = "    http-response cache-store pyramid_lb"
    backend = [
        "    # The cache. A request with Authorization is never answered from",
        "    # it (even for a public answer, which the dispatcher shares), and an",
        "    # answer with Set-Cookie is never stored.",
        "    http-request cache-use pyramid_lb",
    ]
    if settings.sticky == "insert":
        cookie = _haproxy_word("affinity_cookie", settings.affinity_cookie)
        backend += [
            "    # A pinned request's answer is not shared (sticky = insert).",
            f"    http-request set-var(txn.pyramid_lb_pinned) req.cook_cnt({cookie})",
            f"{store} if !{{ res.hdr_cnt(set-cookie) gt 0 }} "
            "!{ var(txn.pyramid_lb_pinned) -m int gt 0 }",
        ]
    else:
        backend.append(f"{store} if !{{ res.hdr_cnt(set-cookie) gt 0 }}")
    return section, backend


def haproxy(site: Site) -> str:
    """A complete HAProxy configuration for the site."""
    settings = site.settings
    lines = _header(site, "haproxy", "haproxy.cfg", "haproxy -db -f haproxy.cfg")
    cache, use_cache = _haproxy_cache(site)
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
        f"    timeout connect {_time(settings.connect_timeout)}",
        f"    timeout server {_time(settings.read_timeout)}",
        "    # as long as waitress keeps an idle client (channel_timeout)",
        "    timeout client 120s",
        "",
        *cache,
        "frontend pyramid_lb",
        *(f"    bind {host.strip('[]')}:{port}" for host, port in site.binds),
        "    # The dispatcher's own pages: not exposed here.",
        f"    http-request deny deny_status 404 if {{ path,url_dec {PREFIX} }} "
        f"|| {{ path,url_dec -m beg {PREFIX}/ }}",
        "    # Bodies announced above max_body_size (a chunked body is not measured).",
        "    http-request deny deny_status 413 if "
        f"{{ req.hdr_val(content-length) gt {settings.max_body_size} }}",
        *_haproxy_forwarded(site),
        *(
            ["    http-response set-header X-Cache %[res.cache_hit,iif(HIT,MISS)]"]
            if use_cache
            else []
        ),
        "    default_backend pyramid_lb",
        "",
        "backend pyramid_lb",
    ]
    if settings.strategy == "hash":
        kind, _, name = settings.hash_key.partition(":")
        _haproxy_word("hash_key", name)
        lines += [
            f"    balance {_HAPROXY_BALANCE[kind].format(name)}",
            "    hash-type consistent",
        ]
        if settings.hash_balance is not None:
            factor = max(101, round(settings.hash_balance * 100))
            lines += [
                "    # bounded loads: an instance takes at most hash_balance times",
                "    # the average, in percent (above 100)",
                f"    hash-balance-factor {factor}",
            ]
    else:
        lines.append(f"    balance {_HAPROXY_BALANCE[settings.strategy]}")
    cookie = _haproxy_word("affinity_cookie", settings.affinity_cookie)
    if settings.sticky == "cookie":
        lines += [
            "    # Passive cookie persistence: the app sets the affinity cookie and",
            "    # HAProxy only reads it; each server's value is the one its",
            "    # instance signs (its id, PYRAMID_LB_INSTANCE). Unlike the",
            "    # dispatcher, a draining instance (down here) loses its clients.",
            f"    cookie {cookie}",
        ]
    elif settings.sticky == "insert":
        lines += [
            "    # HAProxy sets the affinity cookie, with the dispatcher's values.",
            f"    cookie {cookie} insert indirect nocache httponly attr SameSite=Lax",
        ]
    checks = (
        f"check inter {_time(settings.health_check_interval)} "
        f"rise {settings.rise} fall {settings.fall}"
    )
    if settings.eject_after:
        # The dispatcher's ejection: that many connection failures in a row
        # take an instance out, until its health checks pass again. Layer 4
        # only: at layer 7 an app's own 503s would count.
        checks += f" observe layer4 error-limit {settings.eject_after}"
        checks += " on-error mark-down"
    slow = []
    if settings.slow_start:
        checks += f" slowstart {_time(settings.slow_start)}"
        slow = [
            "    # slow_start: an instance back up after HAProxy saw it down ramps",
            "    # its weight (and maxconn) from none to all over slowstart; unlike",
            "    # the dispatcher, not from a tenth, and not one already up when",
            "    # HAProxy starts.",
        ]
    lines += [
        "    # A failed connection is retried on another instance, even past a",
        "    # client's affinity cookie (its instance is down or gone).",
        "    option redispatch 1",
        f"    retries {settings.retries}",
        f"    option httpchk GET {settings.health_check_path}",
        "    http-check expect status 200",
        f"    timeout check {_time(settings.health_check_timeout)}",
        *_haproxy_queue(site),
        "    http-reuse safe",
        *use_cache,
        *slow,
        f"    default-server {checks} pool-max-conn {settings.pool_size}",
    ]
    # HAProxy weights go up to 256: larger ones are scaled down together.
    scale = min(1.0, 256 / max(server.weight for server in site.servers))
    for server in site.servers:
        weight = max(1, round(server.weight * scale))
        options = f" weight {weight}" if weight != 1 else ""
        if server.max_in_flight is not None:
            options += f" maxconn {server.max_in_flight}"
        if server.cookie:
            options += f" cookie {server.cookie}"
        name = re.sub(r"[^\w.:-]", "_", server.name, flags=re.ASCII)
        lines.append(f"    server {name} {server.host}:{server.port}{options}")
    return "\n".join(lines + [""])


# -- systemd -----------------------------------------------------------------

#: Seconds systemd waits beyond the dispatcher's own timeouts: Python's
#: start-up, the ini's loading, the supervisor's last checks.
SYSTEMD_MARGIN = 10


class StopTimes(NamedTuple):
    """What ``TimeoutStopSec`` must leave room for, in seconds."""

    graceful_timeout: float  # the dispatcher finishes the requests in flight
    drain_timeout: float  # an instance a rollout is retiring drains
    stop_timeout: float  # the instances' SIGTERM, before their SIGKILL

    def total(self) -> int:
        return math.ceil(sum(self)) + SYSTEMD_MARGIN


def stop_times(ini: str, settings: DispatcherConfig) -> StopTimes:
    """What a stop of ``pyramid-lb serve ini`` may take, from ``settings`` (its
    ``[app:dispatcher]``) and its ``[server:dispatcher]``."""
    hint = ": `pyramid-lb serve` under systemd serves it"
    conf = load_section(ini, "server:dispatcher", hint=hint).local_conf
    try:
        grace = graceful_timeout(conf)
    except SettingsError as exc:
        raise StartupError(f"{ini} [server:dispatcher] {exc}") from None
    return StopTimes(grace, settings.drain_timeout, settings.stop_timeout)


def _executable() -> str:
    """The absolute path of this installation's ``pyramid-lb``."""
    here = os.path.dirname(os.path.abspath(sys.executable))  # a venv's bin/
    found = shutil.which("pyramid-lb", path=here) or shutil.which("pyramid-lb")
    if found is None:
        raise StartupError(
            "cannot find the pyramid-lb command to run: install pyramid_lb "
            f"(next to {sys.executable})"
        )
    return os.path.abspath(found)


def _unit_value(text: str, what: str) -> str:
    """``text`` as a unit file's value: one line, ``%`` (a specifier) escaped."""
    if not text.isprintable():
        raise StartupError(f"{what} {text!r} cannot be written in a unit file")
    return text.replace("%", "%%")


def _unit_word(text: str, what: str) -> str:
    """``text`` as one word of a unit file's command line: ``$`` escaped too,
    and quoted when it holds blanks, quotes or backslashes."""
    text = _unit_value(text, what).replace("$", "$$")
    if re.search(r"[\s\"'\\;]", text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def systemd(ini: str) -> str:
    """A systemd service unit running ``pyramid-lb serve INI``."""
    path = os.path.abspath(ini)
    settings = _dispatcher(path).config
    times = stop_times(path, settings)
    start = math.ceil(settings.startup_timeout) + SYSTEMD_MARGIN
    command = " ".join(
        (_unit_word(_executable(), "pyramid-lb"), "serve", _unit_word(path, "ini"))
    )
    here = _unit_value(os.path.dirname(path), "directory")
    name = re.sub(r"[^\w.-]", "-", os.path.splitext(os.path.basename(path))[0])
    grace, drain, stop = (f"{t:g}" for t in times)
    lines = [
        "# systemd unit generated by `pyramid-lb export systemd` from",
        f"# {path}.",
        f"# Save it as /etc/systemd/system/{name}.service, then:",
        "#     systemd-analyze verify /etc/systemd/system/" + name + ".service",
        f"#     systemctl daemon-reload && systemctl enable --now {name}",
        f"#     systemctl reload {name}    # a rolling restart, no request dropped",
        "# Export again after changing the timeouts in the ini file.",
        "",
        "[Unit]",
        f"Description=Pyramid app of {os.path.basename(path)} behind pyramid_lb",
        "# [server:dispatcher] may listen on an address that needs the network up.",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "# The dispatcher tells systemd READY=1 once an instance takes requests",
        "# and it serves; STATUS= says how many are ready (systemctl status).",
        "Type=notify",
        "# Only the dispatcher's messages count, not its instances'.",
        "NotifyAccess=main",
        f"ExecStart={command}",
        f"WorkingDirectory={here}",
        "# Log lines reach the journal as they are written.",
        "Environment=PYTHONUNBUFFERED=1",
        "# SIGHUP: a rolling restart, one instance at a time, each new one ready",
        "# before the old one drains; RELOADING=1 then READY=1 around it. (With",
        "# systemd 253 or later, Type=notify-reload without ExecReload makes",
        "# `systemctl reload` wait until the rollout is done.)",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "# SIGTERM to the dispatcher only: it finishes the requests in flight,",
        "# then stops its instances itself. SIGKILL to all only at the timeout.",
        "KillMode=mixed",
        "# The dispatcher's graceful_timeout (its requests in flight), plus",
        "# drain_timeout (an instance a rolling restart is retiring), plus",
        "# stop_timeout (the instances' SIGTERM, before their SIGKILL), plus a",
        f"# margin: {grace} + {drain} + {stop} + {SYSTEMD_MARGIN} = {times.total()}"
        " seconds.",
        f"TimeoutStopSec={times.total()}",
        "# READY=1 comes once the first instance is ready: startup_timeout, plus",
        f"# a margin for Python to start: {settings.startup_timeout:g} + "
        f"{SYSTEMD_MARGIN} = {start} seconds.",
        f"TimeoutStartSec={start}",
        "# A crash, or an app that never got ready, is started again (systemd's",
        "# start limit stops the loop of an ini file that cannot work).",
        "Restart=on-failure",
        "RestartSec=2",
        "# Set an unprivileged account that can read the app and the ini file,",
        "# and write where the app writes; without User= it runs as root.",
        "#User=",
        "#Group=",
        "# Hardening that does not get in the way of the app:",
        "# no setuid binary or file capability raises the app's privileges;",
        "NoNewPrivileges=yes",
        "# /usr, /boot and /etc are read-only, everything else stays as it is",
        "# (strict would make the app's own files read-only, unless listed in",
        "# ReadWritePaths=: a log file, an SQLite database, uploads...);",
        "ProtectSystem=full",
        "# a /tmp and /var/tmp of its own, emptied when it stops.",
        "PrivateTmp=yes",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def check_engine(engine: str, listen: str | None = None) -> None:
    """StartupError unless ``engine`` is one, and takes ``listen`` if given."""
    if engine not in ENGINES:
        raise StartupError(
            f"{engine!r} is not an engine; expected {', '.join(ENGINES)}"
        )
    if engine in _RUNS and listen is not None:
        raise StartupError(f"--listen has no meaning for {engine}: {_RUNS[engine]}")


def export(engine: str, ini: str, listen: str | None = None) -> str:
    """The ``engine`` configuration for ``ini`` (for docker, its two files
    one after the other: see :func:`pyramid_lb.export_docker.joined`)."""
    check_engine(engine, listen)
    if engine == "systemd":
        return systemd(ini)
    if engine == "kubernetes":
        from pyramid_lb.export_kubernetes import kubernetes

        return kubernetes(ini)
    if engine == "docker":
        from pyramid_lb.export_docker import docker, joined

        return joined(docker(ini))
    site = load(ini, listen)
    return nginx(site) if engine == "nginx" else haproxy(site)
