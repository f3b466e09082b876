"""Apply RFC 7239 Forwarded or X-Forwarded-* headers from trusted proxies.

Use this when the app runs behind proxies you control (the dispatcher,
nginx, HAProxy, a cloud balancer): the client's address, scheme, host and
path prefix then reach the app as ``REMOTE_ADDR``, ``wsgi.url_scheme``,
``HTTP_HOST``/``SERVER_NAME``/``SERVER_PORT`` and ``SCRIPT_NAME``.

Security: these headers are plain request headers that anyone can send. They
are applied only when the peer (``REMOTE_ADDR``) is in ``trusted_proxies``,
and only as many hops as ``trusted_proxy_count`` says. Trust a peer only if
it overwrites or appends to every header you list in ``trusted_headers``;
trust more hops than there are proxies and clients can pick their address.
By default (``clear_untrusted``) every such header that is not applied is
removed, so code further down cannot read a forged value by mistake.

Choices where the headers say little:

- ``REMOTE_PORT`` is the forwarded port when the client's entry has one, and
  is removed otherwise: the peer's port belonged to the proxy's connection.
- With ``auto``, the other headers are read at the same hop as the client
  found in X-Forwarded-For (or Forwarded ``for``); without one, at hop 1.
- ``SCRIPT_NAME`` becomes the forwarded prefix followed by the current one.
- ``SERVER_NAME`` keeps the brackets of an IPv6 host, so that URLs rebuilt
  from it as in PEP 3333 stay valid.
- When a scheme or port is forwarded without a host, the client's ``Host``
  (else ``SERVER_NAME``) is kept and its port worked out again: the scheme's
  default if it has none. A ``Host`` that does not parse is then a 400.
- A forwarded port wins over the host's; a host's explicit port is kept as
  written when it is the port (``example.com:443`` stays so over https), as
  the app would see it reached directly.
- X-Real-IP and CF-Connecting-IP name the client alone: one address, no
  port, no chain. Only one header that names the client may be trusted.
- Only the trusted part of a header is validated (and kept); what a client
  wrote further left is neither trusted nor an error.

Every environ key changed or removed has its previous value (None if it was
absent) in the dict ``environ["pyramid_lb.forwarded.original"]``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from pyramid.response import Response
from pyramid.tweens import INGRESS

from pyramid_lb.addresses import AddressSet, is_ip, parse_host, parse_ip, parse_port
from pyramid_lb.settings import (
    ADDON_PREFIX,
    Setting,
    SettingsError,
    addresses,
    boolean,
    integer,
    parse,
    words,
)

log = logging.getLogger(__name__)

# -- settings -----------------------------------------------------------------

FORWARDED_HEADERS = (
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-real-ip",
    "cf-connecting-ip",
)
#: Headers that name the client; a request can have only one source of truth.
CLIENT_HEADERS = ("x-forwarded-for", "x-real-ip", "cf-connecting-ip")


def proxy_count(value: Any) -> int | str:
    """A number of trusted hops, or ``auto`` (walk back over trusted proxies)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return integer(1)(value)
    except ValueError:
        raise ValueError("expected an integer >= 1 or 'auto'") from None


def header_names(value: Any) -> frozenset[str]:
    """Names out of :data:`FORWARDED_HEADERS` (case-insensitive)."""
    names = frozenset(name.lower() for name in words(value))
    unknown = sorted(names - set(FORWARDED_HEADERS))
    if unknown:
        raise ValueError(
            f"{unknown[0]!r} is not a proxy header; expected any of "
            + ", ".join(FORWARDED_HEADERS)
        )
    return names


#: Settings shared by the add-on (``pyramid_lb.`` prefix) and the
#: ``egg:pyramid_lb#forwarded`` filter (no prefix).
FORWARDED_SETTINGS = (
    Setting(
        "trusted_proxies",
        addresses,
        "",
        "Peers whose forwarded headers are applied: IP addresses, CIDR networks, "
        "`unix` (peers on a unix socket) or `*` (anyone). Empty: nobody.",
    ),
    Setting(
        "trusted_proxy_count",
        proxy_count,
        "1",
        "How many proxies in front of the app are trusted, or `auto` to walk back "
        "over every address inside `trusted_proxies`.",
    ),
    Setting(
        "trusted_headers",
        header_names,
        "x-forwarded-for x-forwarded-proto x-forwarded-host x-forwarded-port",
        "Headers applied from trusted proxies: any of "
        + ", ".join(f"`{name}`" for name in FORWARDED_HEADERS)
        + " (`forwarded` cannot be mixed with the others, and only one of "
        + ", ".join(f"`{name}`" for name in CLIENT_HEADERS)
        + " names the client).",
    ),
    Setting(
        "clear_untrusted",
        boolean,
        "true",
        "Remove proxy headers that were not applied, and cut applied ones down to "
        "the trusted values.",
    ),
)


def check_forwarded(values: Mapping[str, Any], prefix: str = "") -> None:
    """Reject combinations of forwarded settings that cannot work."""
    headers = values[prefix + "trusted_headers"]
    if "forwarded" in headers and len(headers) > 1:
        raise SettingsError(
            f"{prefix}trusted_headers: 'forwarded' cannot be trusted together with "
            "X-Forwarded-* headers (RFC 7239 section 7.4: their relative order is "
            "unknowable); choose one kind"
        )
    clients = sorted(headers.intersection(CLIENT_HEADERS))
    if len(clients) > 1:
        raise SettingsError(
            f"{prefix}trusted_headers: {clients[0]!r} and {clients[1]!r} both name "
            "the client; trust one of them"
        )
    proxies = values[prefix + "trusted_proxies"]
    if values[prefix + "trusted_proxy_count"] == "auto" and proxies.anyone:
        raise SettingsError(
            f"{prefix}trusted_proxy_count = 'auto' has no meaning with "
            f"{prefix}trusted_proxies = '*': every address would be skipped"
        )


#: The environ key holding the values this module changed or removed.
ORIGINAL_KEY = "pyramid_lb.forwarded.original"

TWEEN = "pyramid_lb.forwarded.forwarded_tween_factory"

DEFAULT_HEADERS = header_names(
    next(s.default for s in FORWARDED_SETTINGS if s.name == "trusted_headers")
)

_FORWARDED = "HTTP_FORWARDED"
_FOR = "HTTP_X_FORWARDED_FOR"
_PROTO = "HTTP_X_FORWARDED_PROTO"
_HOST = "HTTP_X_FORWARDED_HOST"
_PORT = "HTTP_X_FORWARDED_PORT"
_PREFIX = "HTTP_X_FORWARDED_PREFIX"
_BY = "HTTP_X_FORWARDED_BY"
_REAL_IP = "HTTP_X_REAL_IP"
_CF_IP = "HTTP_CF_CONNECTING_IP"

# environ key -> the header's name as users know it
_NAMES = {
    _FORWARDED: "Forwarded",
    _FOR: "X-Forwarded-For",
    _PROTO: "X-Forwarded-Proto",
    _HOST: "X-Forwarded-Host",
    _PORT: "X-Forwarded-Port",
    _PREFIX: "X-Forwarded-Prefix",
    _BY: "X-Forwarded-By",
    _REAL_IP: "X-Real-IP",
    _CF_IP: "CF-Connecting-IP",
}
_KEYS = tuple(_NAMES)
_DEFAULT_PORTS = {"http": "80", "https": "443"}

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_PAIR = re.compile(rf"[ \t]*({_TOKEN})=({_TOKEN}|{_QUOTED})[ \t]*")
_OWS = re.compile(r"[ \t]*")
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)
_OBFUSCATED = re.compile(r"_[\w.-]+", re.A)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class MalformedHeader(ValueError):
    """A trusted header's value cannot be applied; the request gets a 400."""

    def __init__(self, header: str, reason: str):
        super().__init__(f"{header}: {reason}")
        self.header = header
        self.reason = reason


def _shown(value: str, limit: int = 40) -> str:
    """A bounded, harmless excerpt of a client's value for messages and logs."""
    clean = "".join(
        c if " " <= c <= "~" and c not in "\"\\<>&'" else "?" for c in value[:limit]
    )
    return f'"{clean}..."' if len(value) > limit else f'"{clean}"'


# -- values -------------------------------------------------------------------
#
# Each returns the normalised value, or None when it is not valid.


def _proto(text: str) -> str | None:
    text = text.lower()
    return text if text in _DEFAULT_PORTS else None


def _single_ip(text: str) -> str | None:
    return text if is_ip(text) else None


def _prefix(text: str) -> str | None:
    if (
        text.startswith("/")
        and "//" not in text
        and "\\" not in text
        and ".." not in text.split("/")
        and not _CONTROL.search(text)
    ):
        return text.rstrip("/")
    return None


def _node(text: str, rfc7239: bool = False) -> tuple[str | None, str | None] | None:
    """``(address, port)`` of an X-Forwarded-For value or a Forwarded ``for``.

    Forwarded's ``unknown`` and obfuscated names give no address, and an
    obfuscated port gives no port. Only X-Forwarded-For takes bare IPv6.
    """
    if text.startswith("["):
        end = text.find("]")
        address, rest = text[1:end], text[end + 1 :]
        if end < 0 or ":" not in address or not is_ip(address):
            return None
    elif not rfc7239 and text.count(":") > 1:
        return (text, None) if is_ip(text) else None
    else:
        address, colon, port = text.partition(":")
        rest = colon + port
        if rfc7239 and (address.lower() == "unknown" or _OBFUSCATED.fullmatch(address)):
            address = None
        elif not is_ip(address):
            return None
    if not rest:
        return address, None
    if rest[0] != ":":
        return None
    if rfc7239 and _OBFUSCATED.fullmatch(rest[1:]):
        return address, None
    port = parse_port(rest[1:])
    return (address, port) if port else None


def _split(value: str | None) -> list[str]:
    # a blank header says nothing, so it counts as absent
    if not value or value.isspace():
        return []
    return [item.strip(" \t") for item in value.split(",")]


def parse_forwarded(value: str) -> list[tuple[dict[str, str], str]]:
    """The elements of an RFC 7239 header: ``(params, raw text)`` each.

    Parameter names are lower-cased and quoted values unescaped; elements
    without parameters are dropped. Raises :class:`MalformedHeader`.
    """
    elements = []
    params: dict[str, str] = {}
    start = pos = 0
    while True:
        match = _PAIR.match(value, pos)
        if match:
            name, token = match[1].lower(), match[2]
            if name in params:
                raise MalformedHeader(
                    "Forwarded", f"parameter {_shown(name)} repeated in one element"
                )
            if token[0] == '"':
                token = _QUOTED_PAIR.sub(r"\1", token[1:-1])
            params[name] = token
            pos = match.end()
        else:
            pos = _OWS.match(value, pos).end()
        separator = value[pos : pos + 1]
        if separator == ";":
            pos += 1
        elif separator in (",", ""):
            if params:
                elements.append((params, value[start:pos].strip(" \t")))
            if not separator:
                return elements
            params = {}
            start = pos = pos + 1
        else:
            raise MalformedHeader(
                "Forwarded", f"malformed parameter at {_shown(value[pos:])}"
            )


def _checked(key: str, value: str, check: Callable[[str], Any], what: str) -> Any:
    result = check(value)
    if result is None:
        raise MalformedHeader(_NAMES[key], f"{_shown(value)} is not {what}")
    return result


# -- the rewrite --------------------------------------------------------------


class ProxyHeaders:
    """Rewrites WSGI environs from the headers of trusted proxies.

    Takes the settings of the same names as typed values (see
    :meth:`from_options` for ini strings). Call :meth:`rewrite` on each
    request.
    """

    def __init__(
        self,
        trusted_proxies: AddressSet,
        trusted_proxy_count: int | str = 1,
        trusted_headers: frozenset[str] = DEFAULT_HEADERS,
        clear_untrusted: bool = True,
    ):
        self.trusted_proxies = trusted_proxies
        self.trusted_proxy_count = trusted_proxy_count
        self.trusted_headers = trusted_headers
        self.clear_untrusted = clear_untrusted
        #: False when the rewrite can never change anything.
        self.enabled = bool(trusted_proxies) or clear_untrusted
        self._nobody = not trusted_proxies
        self._auto = trusted_proxy_count == "auto"
        self._count = 1 if self._auto else trusted_proxy_count
        self._rfc7239 = "forwarded" in trusted_headers
        self._trusted_keys = frozenset(
            key for key, name in _NAMES.items() if name.lower() in trusted_headers
        )

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ProxyHeaders:
        """From the settings' keys without prefix, typed or as ini strings;
        a bad value or combination raises SettingsError."""
        values = parse(FORWARDED_SETTINGS, options)
        check_forwarded(values)
        return cls(**values)

    def rewrite(self, environ: MutableMapping[str, Any]) -> None:
        """Apply the trusted headers of ``environ`` to it, in place.

        Raises :class:`MalformedHeader`, leaving ``environ`` as it was, when
        a trusted header cannot be applied.
        """
        if self._nobody or environ.get("REMOTE_ADDR") not in self.trusted_proxies:
            if self.clear_untrusted:
                found = [key for key in _KEYS if key in environ]
                if found:
                    _commit(environ, dict.fromkeys(found))
            return
        # Worked out in full before anything is set, so a 400 changes nothing.
        changes: dict[str, str | None] = {}
        if self.clear_untrusted:
            changes.update((key, None) for key in _KEYS if key in environ)
        if self._rfc7239:
            self._forwarded(environ, changes)
        else:
            self._x_forwarded(environ, changes)
        if changes:
            _commit(environ, changes)

    def _x_forwarded(self, environ, changes) -> None:
        hops = self._count
        for key in (_REAL_IP, _CF_IP):
            if key in self._trusted_keys:
                self._single_client(environ, changes, key)
        values = _split(environ.get(_FOR)) if _FOR in self._trusted_keys else []
        index = None
        if values and self._auto:
            index = len(values) - 1
            while index and self.trusted_proxies.contains_ip(
                parse_ip(self._for(values[index])[0])
            ):
                index -= 1
            hops = len(values) - index
        elif values and len(values) >= hops:
            index = len(values) - hops
        if index is not None:
            nodes = [self._for(value) for value in values[index:]]
            changes["REMOTE_ADDR"], changes["REMOTE_PORT"] = nodes[0]
            if self.clear_untrusted:
                # addresses only: WebOb's client_addr reads the first one as is
                changes[_FOR] = ", ".join(address for address, _ in nodes)
        proto = self._pick(environ, changes, _PROTO, hops, _proto, "http or https")
        host = self._pick(environ, changes, _HOST, hops, parse_host, "a host[:port]")
        port = self._pick(environ, changes, _PORT, hops, parse_port, "a port")
        prefix = self._pick(environ, changes, _PREFIX, hops, _prefix, "a path")
        self._location(environ, changes, proto, host, port)
        if prefix is not None:
            changes["SCRIPT_NAME"] = prefix + environ.get("SCRIPT_NAME", "")

    def _single_client(self, environ, changes, key) -> None:
        """The client named by X-Real-IP or CF-Connecting-IP: one address."""
        value = environ.get(key)
        if not value or value.isspace():
            return
        address = _checked(key, value.strip(" \t"), _single_ip, "one IP address")
        changes["REMOTE_ADDR"], changes["REMOTE_PORT"] = address, None
        if self.clear_untrusted:
            changes[key] = address

    @staticmethod
    def _for(value: str) -> tuple[str, str | None]:
        return _checked(_FOR, value, _node, "an IP address[:port]")

    def _pick(self, environ, changes, key, hops, check, what) -> Any:
        """The oldest of the last ``hops`` values of a list header, checked."""
        if key not in self._trusted_keys:
            return None
        tail = _split(environ.get(key))[-hops:]
        if not tail:
            return None
        if self.clear_untrusted:
            changes[key] = ", ".join(tail)
        for value in tail[1:]:
            _checked(key, value, check, what)
        return _checked(key, tail[0], check, what)

    def _forwarded(self, environ, changes) -> None:
        elements = parse_forwarded(environ.get(_FORWARDED) or "")
        if not elements:
            return
        hops = self._count
        if self._auto:
            hops = 1
            while hops < len(elements):
                node = self._element_for(elements[-hops][0])
                if node is None or node[0] is None:
                    break
                if not self.trusted_proxies.contains_ip(parse_ip(node[0])):
                    break
                hops += 1
        tail = elements[-hops:]
        proto = host = None
        # Newest first, so that the oldest element carrying a value wins and
        # ``node`` ends as the ``for`` of the oldest trusted element.
        for params, _ in reversed(tail):
            node = self._element_for(params)
            if "proto" in params:
                proto = _checked(_FORWARDED, params["proto"], _proto, "http or https")
            if "host" in params:
                host = _checked(_FORWARDED, params["host"], parse_host, "a host[:port]")
        if len(elements) >= hops and node is not None and node[0] is not None:
            changes["REMOTE_ADDR"], changes["REMOTE_PORT"] = node
        if self.clear_untrusted:
            changes[_FORWARDED] = ", ".join(raw for _, raw in tail)
        self._location(environ, changes, proto, host, None)

    @staticmethod
    def _element_for(params: dict[str, str]) -> tuple[str | None, str | None] | None:
        value = params.get("for")
        if value is None:
            return None
        node = _node(value, rfc7239=True)
        if node is None:
            raise MalformedHeader(
                "Forwarded", f"for={_shown(value)} is not a node (RFC 7239 section 6)"
            )
        return node

    @staticmethod
    def _location(environ, changes, proto, host, port) -> None:
        """Set scheme, host and port together, so that they agree."""
        if proto is None and host is None and port is None:
            return
        scheme = proto or environ.get("wsgi.url_scheme", "http")
        if host is None and "HTTP_HOST" in environ:
            host = parse_host(environ["HTTP_HOST"])
            if host is None:
                raise MalformedHeader(
                    "Host", f"{_shown(environ['HTTP_HOST'])} is not a host[:port]"
                )
        default = _DEFAULT_PORTS.get(scheme)
        if host is not None:
            name, host_port = host
            port = port or host_port or default or environ.get("SERVER_PORT")
            if port == host_port:  # as the client wrote it, default port or not
                changes["HTTP_HOST"] = f"{name}:{port}"
            else:
                changes["HTTP_HOST"] = name if port == default else f"{name}:{port}"
        else:
            name = environ.get("SERVER_NAME", "")
            port = port or default or environ.get("SERVER_PORT")
        changes["wsgi.url_scheme"] = scheme
        changes["SERVER_NAME"] = name
        changes["SERVER_PORT"] = port


def _commit(environ: MutableMapping[str, Any], changes: dict[str, str | None]) -> None:
    """Apply ``changes`` (None removes a key), keeping the first original values."""
    original = None
    for key, value in changes.items():
        old = environ.get(key)
        if old == value:
            continue
        if original is None:
            original = environ.setdefault(ORIGINAL_KEY, {})
        original.setdefault(key, old)
        if value is None:
            del environ[key]
        else:
            environ[key] = value


def _reject(exc: MalformedHeader, environ: Mapping[str, Any]) -> bytes:
    log.warning("400 Bad Request for peer %r: %s", environ.get("REMOTE_ADDR"), exc)
    return f"Bad Request\n\n{exc}\n".encode()


# -- WSGI ---------------------------------------------------------------------


class ForwardedMiddleware:
    """WSGI middleware applying trusted proxy headers (see the module doc).

    Keyword arguments are the settings' (``trusted_proxies``,
    ``trusted_proxy_count``, ``trusted_headers``, ``clear_untrusted``), typed
    or as ini strings, a bad one raising
    :class:`~pyramid_lb.settings.SettingsError`; or a ready
    :class:`ProxyHeaders`.
    """

    def __init__(
        self, app: Callable, proxy_headers: ProxyHeaders | None = None, **options: Any
    ):
        self.app = app
        self.proxy_headers = proxy_headers or ProxyHeaders.from_options(options)

    def __call__(self, environ, start_response):
        try:
            self.proxy_headers.rewrite(environ)
        except MalformedHeader as exc:
            body = _reject(exc, environ)
            start_response(
                "400 Bad Request",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(body))),
                ],
            )
            return [body]
        return self.app(environ, start_response)


def filter_factory(global_conf: Mapping[str, Any], **local_conf: str):
    """PasteDeploy filter ``egg:pyramid_lb#forwarded``, with unprefixed keys."""
    proxy_headers = ProxyHeaders.from_options(local_conf)

    def forwarded_filter(app):
        return ForwardedMiddleware(app, proxy_headers)

    return forwarded_filter


# -- Pyramid ------------------------------------------------------------------


def includeme(config: Configurator) -> None:
    """Apply trusted proxy headers before any other tween sees the request.

    Reads ``pyramid_lb.trusted_proxies``, ``pyramid_lb.trusted_proxy_count``,
    ``pyramid_lb.trusted_headers`` and ``pyramid_lb.clear_untrusted``, writes
    the typed values back, and registers the tween (see :func:`register`).
    ``config.include("pyramid_lb")`` parses them with the add-on's other keys.
    """
    settings = config.get_settings()
    try:
        values = parse(FORWARDED_SETTINGS, settings, ADDON_PREFIX, reject_unknown=False)
        check_forwarded(values, ADDON_PREFIX)
    except SettingsError as exc:
        raise ConfigurationError(str(exc)) from None
    settings.update(values)
    register(config)


def register(config: Configurator) -> None:
    """Register :func:`forwarded_tween_factory` right under INGRESS, over the
    typed settings (already parsed)."""
    config.add_tween(TWEEN, under=INGRESS)


def forwarded_tween_factory(handler, registry):
    """The tween of :func:`includeme`; a 400 Response for malformed headers."""
    settings = registry.settings
    proxy_headers = ProxyHeaders(
        **{s.name: settings[ADDON_PREFIX + s.name] for s in FORWARDED_SETTINGS}
    )
    if not proxy_headers.enabled:
        return handler

    def forwarded_tween(request):
        try:
            proxy_headers.rewrite(request.environ)
        except MalformedHeader as exc:
            return Response(
                _reject(exc, request.environ),
                status=400,
                content_type="text/plain",
                charset="utf-8",
            )
        return handler(request)

    return forwarded_tween
