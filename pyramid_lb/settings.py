"""Settings tables: each key's name, converter, default and doc, parsed once."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from pyramid_lb.addresses import AddressSet


class SettingsError(ValueError):
    """A setting has a value that is not allowed (or is not a known key)."""


class Setting(NamedTuple):
    """One configurable key.

    ``default`` is written as it would be in an ini file (or None for unset)
    and goes through ``convert`` like any user value, so the documented
    default and the effective one cannot disagree.
    """

    name: str
    convert: Callable[[Any], Any]
    default: str | None
    doc: str


# -- converters ---------------------------------------------------------------
#
# Each takes the raw value (a string from an ini file, or an already typed
# Python value from code) and returns the typed value, or raises ValueError
# whose message says what is allowed.

_TRUE = frozenset(("true", "yes", "on", "1"))
_FALSE = frozenset(("false", "no", "off", "0"))


def boolean(value: Any) -> bool:
    """Strict boolean: a typo such as ``ture`` is an error, not False."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("expected true/false (also yes/no, on/off, 1/0)")


def integer(minimum: int | None = None, maximum: int | None = None):
    """An integer converter bounded to ``[minimum, maximum]``."""
    if minimum is not None and maximum is not None:
        allowed = f"an integer from {minimum} to {maximum}"
    elif minimum is not None:
        allowed = f"an integer >= {minimum}"
    else:
        allowed = "an integer"

    def convert(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"expected {allowed}")
        if isinstance(value, int):
            number = value
        else:
            text = str(value).strip()
            if not text.lstrip("+-").isdigit() or not text.isascii():
                raise ValueError(f"expected {allowed}")
            number = int(text)
        if (minimum is not None and number < minimum) or (
            maximum is not None and number > maximum
        ):
            raise ValueError(f"expected {allowed}")
        return number

    convert.allowed = allowed
    return convert


def seconds(minimum: float = 0.0, allow_zero: bool = True):
    """A duration in seconds (float); ``ms`` and ``s`` suffixes accepted."""
    allowed = "a number of seconds" + (
        " (0 or more)" if allow_zero else " greater than 0"
    )

    def convert(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"expected {allowed}")
        if isinstance(value, int | float):
            number = float(value)
        else:
            text = str(value).strip().lower()
            scale = 1.0
            if text.endswith("ms"):
                text, scale = text[:-2], 0.001
            elif text.endswith("s"):
                text = text[:-1]
            try:
                number = float(text) * scale
            except ValueError:
                raise ValueError(
                    f"expected {allowed}, e.g. 1.5, 1.5s or 250ms"
                ) from None
        if not math.isfinite(number) or number < minimum:
            raise ValueError(f"expected {allowed}")
        if number == 0 and not allow_zero:
            raise ValueError(f"expected {allowed}")
        return number

    convert.allowed = allowed
    return convert


def optional(convert: Callable[[Any], Any]):
    """Like ``convert``, but an empty value means None (unset)."""

    def convert_optional(value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return convert(value)

    return convert_optional


def one_of(*choices: str):
    """One word out of ``choices`` (case-insensitive)."""
    allowed = "one of " + ", ".join(choices)

    def convert(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"expected {allowed}")
        return text

    return convert


def words(value: Any) -> tuple[str, ...]:
    """Whitespace- or comma-separated words, as a tuple."""
    if isinstance(value, str):
        return tuple(value.replace(",", " ").split())
    return tuple(str(item) for item in value)


def url_path(value: Any) -> str:
    """An absolute URL path such as ``/healthz``."""
    text = str(value).strip()
    if (
        not text.startswith("/")
        or text.startswith("//")
        or any(c in text for c in "?#\\ ")
        or not text.isprintable()
    ):
        raise ValueError("expected an absolute path such as /healthz")
    return text


def addresses(value: Any) -> AddressSet:
    """IP addresses and CIDR ranges (see :class:`AddressSet`)."""
    if isinstance(value, AddressSet):
        return value
    return AddressSet.parse(value)


def text(value: Any) -> str:
    return str(value).strip()


def ratio(value: Any) -> float:
    """A fraction from 0 to 1 (``20%`` also accepted)."""
    raw = str(value).strip()
    try:
        number = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        number = -1.0
    if isinstance(value, bool) or not 0.0 <= number <= 1.0:
        raise ValueError("expected a fraction from 0 to 1, e.g. 0.2 or 20%")
    return number


def factor(value: Any) -> float:
    """A number >= 1."""
    try:
        number = float(str(value).strip())
    except ValueError:
        number = 0.0
    if isinstance(value, bool) or not (1.0 <= number < math.inf):
        raise ValueError("expected a number >= 1, e.g. 1.25")
    return number


def factor_or_off(value: Any) -> float | None:
    """``off`` (None), or a number >= 1."""
    if isinstance(value, str) and value.strip().lower() == "off":
        return None
    try:
        return factor(value)
    except ValueError:
        raise ValueError("expected off or a number >= 1, e.g. 1.25") from None


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size(value: Any) -> int:
    """A number of bytes; ``k``, ``M`` and ``G`` suffixes (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raw = str(value).strip().lower().removesuffix("b")
    unit = raw[-1:] if raw[-1:] in ("k", "m", "g") else ""
    digits = raw[: len(raw) - len(unit)]
    if not digits.isdigit() or not digits.isascii():
        raise ValueError("expected a size in bytes, e.g. 1048576, 512k, 100M or 1G")
    return int(digits) * _SIZE_UNITS[unit]


# -- parsing ------------------------------------------------------------------


def parse(
    table: Iterable[Setting],
    raw: Mapping[str, Any],
    prefix: str = "",
    reject_unknown: bool = True,
) -> dict[str, Any]:
    """Convert ``raw`` with ``table``; return ``{prefixed name: value}``.

    Every key of ``table`` is present in the result (defaults filled in).
    Keys of ``raw`` that start with ``prefix`` but are not in the table are
    rejected by name, so a typo never silently falls back to a default.
    """
    table = list(table)
    known = {prefix + setting.name: setting for setting in table}
    if reject_unknown:
        unknown = sorted(k for k in raw if k.startswith(prefix) and k not in known)
        if unknown:
            # Imported here: only a start-up that is about to fail needs it.
            import difflib

            key = unknown[0]
            # Compared without the prefix, which every key shares and which
            # would make any two keys look alike.
            names = [setting.name for setting in table]
            close = difflib.get_close_matches(key[len(prefix) :], names, 1, 0.6)
            if close:
                raise SettingsError(
                    f"unknown setting {key!r}; did you mean {prefix + close[0]!r}?"
                )
            # A list of thirty keys on one line is read by nobody: name a
            # few only when there are few.
            if len(known) <= 8:
                listed = "known settings: " + ", ".join(sorted(known))
            else:
                kind = f"{prefix}* settings" if prefix else "settings"
                listed = (
                    f"it is none of the {len(known)} known {kind} "
                    "(`pyramid-lb serve --help` lists them)"
                )
            raise SettingsError(f"unknown setting {key!r}; {listed}")
    result = {}
    for key, setting in known.items():
        explicit = key in raw
        value = raw[key] if explicit else setting.default
        if value is None:
            result[key] = None
            continue
        try:
            result[key] = setting.convert(value)
        except ValueError as exc:
            shown = value if explicit else f"{value} (the default)"
            raise SettingsError(f"{key} = {shown!r} is not valid: {exc}") from None
    return result


def reference(table: Iterable[Setting], prefix: str = "") -> str:
    """The table as Markdown, for the README's settings reference."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for setting in table:
        default = f"`{setting.default}`" if setting.default else "(unset)"
        lines.append(f"| `{prefix}{setting.name}` | {default} | {setting.doc} |")
    return "\n".join(lines)


# -- the add-on's table -------------------------------------------------------

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

HEALTH_SETTINGS = (
    Setting("health_path", url_path, "/healthz", "Path of the liveness endpoint."),
    Setting("ready_path", url_path, "/readyz", "Path of the readiness endpoint."),
    Setting(
        "check_timeout",
        seconds(allow_zero=False),
        "1",
        "Default time a health check may take before it counts as failed.",
    ),
    Setting(
        "check_cache",
        seconds(),
        "1",
        "How long a check's result is reused, so frequent probes do not multiply "
        "the load on what it checks (0: run on every probe).",
    ),
    Setting(
        "health_details_allow",
        addresses,
        "127.0.0.1 ::1",
        "Clients shown check output (error texts); others see only statuses.",
    ),
    Setting(
        "drain_file",
        optional(text),
        None,
        "While this file exists the instance drains (readiness fails).",
    ),
    Setting(
        "drain_on_sigterm",
        optional(seconds(allow_zero=False)),
        None,
        "On SIGTERM, drain for this many seconds while still serving, then stop "
        "the server. Unset: SIGTERM is left alone.",
    ),
)

_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def cookie_name(value: Any) -> str:
    """A cookie name (an HTTP token)."""
    name = str(value).strip()
    if not _COOKIE_NAME.fullmatch(name):
        raise ValueError("expected a cookie name: letters, digits and !#$%&'*+-.^_`|~")
    return name


AFFINITY_SETTINGS = (
    Setting(
        "affinity",
        one_of("session", "always", "off"),
        "off",
        "When the add-on pins a client to this instance with the affinity "
        "cookie: `session` (once the app's session holds data), `always`, or "
        "`off` (only `request.lb_pin()` does).",
    ),
    Setting(
        "affinity_cookie",
        cookie_name,
        "lb_affinity",
        "Name of the affinity cookie; the same as the dispatcher's.",
    ),
    Setting(
        "affinity_secret",
        optional(text),
        None,
        "Secret that signs the affinity cookie, the same as the dispatcher's "
        "`affinity_secret`. Needed for any pinning.",
    ),
)

ADDON_PREFIX = "pyramid_lb."

#: Every ``pyramid_lb.*`` key of the add-on.
ADDON_SETTINGS = HEALTH_SETTINGS + FORWARDED_SETTINGS + AFFINITY_SETTINGS


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


#: Set by the dispatcher for the instances it spawns: its own address, added
#: to ``pyramid_lb.trusted_proxies`` so they apply its forwarded headers.
TRUSTED_PROXIES_ENV = "PYRAMID_LB_TRUSTED_PROXIES"


def parse_addon(
    raw: Mapping[str, Any], environ: Mapping[str, str] = os.environ
) -> dict[str, Any]:
    """Parse the add-on's ``pyramid_lb.*`` keys out of app settings."""
    values = parse(ADDON_SETTINGS, raw, ADDON_PREFIX)
    extra = environ.get(TRUSTED_PROXIES_ENV)
    if extra:
        key = ADDON_PREFIX + "trusted_proxies"
        try:
            added = AddressSet.parse(extra)
        except ValueError as exc:
            raise SettingsError(
                f"{TRUSTED_PROXIES_ENV} = {extra!r} is not valid: {exc}"
            ) from None
        values[key] = AddressSet.parse(f"{values[key]} {added}")
    check_forwarded(values, ADDON_PREFIX)
    mode = values[ADDON_PREFIX + "affinity"]
    if mode != "off" and not values[ADDON_PREFIX + "affinity_secret"]:
        raise SettingsError(
            f"{ADDON_PREFIX}affinity = {mode!r} needs {ADDON_PREFIX}affinity_secret "
            "(the secret the dispatcher shares, to sign the cookie)"
        )
    return values


# -- the dispatcher's table ----------------------------------------------------


class BackendSpec(NamedTuple):
    """An instance the dispatcher balances over, as configured."""

    url: str
    weight: int = 1


def backend_list(value: Any) -> tuple[BackendSpec, ...]:
    """URLs such as ``http://10.0.0.5:6543``, each optionally followed by
    ``weight=N``; whitespace or newlines between them."""
    from pyramid_lb.dispatcher.cluster import parse_backend_url

    if not isinstance(value, str):
        return tuple(value)
    specs: list[BackendSpec] = []
    for word in value.split():
        if "=" in word and "://" not in word:
            option, _, raw = word.partition("=")
            if option != "weight" or not specs:
                raise ValueError(
                    f"{word!r} is not understood; expected URLs such as "
                    "http://127.0.0.1:6544, each optionally followed by weight=N"
                )
            specs[-1] = specs[-1]._replace(weight=integer(1, 1000)(raw))
        else:
            parse_backend_url(word)
            specs.append(BackendSpec(word))
    return tuple(specs)


def strategy_name(value: Any) -> str:
    from pyramid_lb.dispatcher.balancer import STRATEGIES

    return one_of(*STRATEGIES)(value)


def hash_key(value: Any) -> str:
    from pyramid_lb.dispatcher.balancer import key_function

    spec = str(value).strip()
    key_function(spec)
    return spec


DISPATCHER_SETTINGS = (
    Setting(
        "instances",
        integer(0, 1000),
        "0",
        "How many copies of this file's `[app:main]`/`[server:main]` to spawn "
        "and supervise.",
    ),
    Setting(
        "base_port",
        integer(1, 65535),
        "6544",
        "Port of the first spawned instance; the next ones take the next free ports.",
    ),
    Setting(
        "ini_files",
        words,
        "",
        "Other ini files to spawn one instance each of (paths relative to this file).",
    ),
    Setting(
        "backends",
        backend_list,
        "",
        "Instances to balance over that run elsewhere (not spawned), e.g. "
        "`http://10.0.0.5:6543 weight=2 http://10.0.0.6:6543`.",
    ),
    Setting(
        "strategy",
        strategy_name,
        "round_robin",
        "How an instance is chosen: `round_robin`, `weighted_round_robin`, "
        "`least_connections`, `p2c` (power of two choices) or `hash`.",
    ),
    Setting(
        "hash_key",
        hash_key,
        "client",
        "What `strategy = hash` hashes: `client` (address), `path`, "
        "`cookie:NAME` or `header:NAME`.",
    ),
    Setting(
        "hash_balance",
        factor_or_off,
        "off",
        "With `strategy = hash`: `off` keeps every key on its instance however "
        "loaded; a factor such as `1.25` turns on bounded loads, where an "
        "instance above that many times the average load passes new requests "
        "of its keys to the next one (which lacks any state kept for them).",
    ),
    Setting(
        "retries",
        integer(0, 10),
        "2",
        "How many other instances a failed request may be tried on (only when "
        "it cannot run twice).",
    ),
    Setting(
        "retry_budget",
        ratio,
        "0.2",
        "Retries allowed as a share of the requests of the last 10 s (at least "
        "10 retries are always allowed), so a failing cluster is not stormed.",
    ),
    Setting(
        "connect_timeout",
        seconds(allow_zero=False),
        "2",
        "Time to connect to an instance before trying another.",
    ),
    Setting(
        "read_timeout",
        seconds(allow_zero=False),
        "60",
        "Time an instance may stay silent before the answer is 504 Gateway Timeout.",
    ),
    Setting(
        "max_body_size",
        size,
        "1G",
        "Largest request body forwarded; larger ones get 413.",
    ),
    Setting(
        "pool_size",
        integer(0),
        "32",
        "Idle keep-alive connections kept per instance.",
    ),
    Setting(
        "health_check_path",
        url_path,
        "/readyz",
        "Path probed on each instance (the add-on's readiness by default).",
    ),
    Setting(
        "health_check_interval",
        seconds(allow_zero=False),
        "1",
        "Time between two probes of an instance.",
    ),
    Setting(
        "health_check_timeout",
        seconds(allow_zero=False),
        "2",
        "Time a probe may take before it counts as failed.",
    ),
    Setting(
        "rise",
        integer(1, 100),
        "2",
        "Passed probes in a row that mark an instance up.",
    ),
    Setting(
        "fall",
        integer(1, 100),
        "3",
        "Failed probes in a row that mark an instance down.",
    ),
    Setting(
        "eject_after",
        integer(0),
        "3",
        "Connection failures or 5xx answers in a row that take an instance out "
        "of rotation for a while (0: never).",
    ),
    Setting(
        "eject_time",
        seconds(allow_zero=False),
        "5",
        "How long the first ejection lasts; each repeat lasts that much longer "
        "(at most 5 minutes).",
    ),
    Setting(
        "liveness_path",
        url_path,
        "/healthz",
        "Path probed on spawned instances to find hung ones (the add-on's "
        "liveness by default); `fall` failures in a row kill and restart it.",
    ),
    Setting(
        "startup_timeout",
        seconds(allow_zero=False),
        "30",
        "Time a spawned instance has to become ready before it is killed and "
        "started again.",
    ),
    Setting(
        "max_restarts",
        integer(0),
        "5",
        "Restarts allowed within `restart_window`; one more and the instance is "
        "marked failed instead of restarted again.",
    ),
    Setting(
        "restart_window",
        seconds(allow_zero=False),
        "60",
        "The window `max_restarts` counts in.",
    ),
    Setting(
        "drain_timeout",
        seconds(),
        "30",
        "How long an instance being replaced or removed may finish its requests "
        "in flight before it is stopped.",
    ),
    Setting(
        "stop_timeout",
        seconds(allow_zero=False),
        "10",
        "Time between SIGTERM and SIGKILL when an instance is stopped.",
    ),
    Setting(
        "admin_allow",
        addresses,
        "127.0.0.1 ::1",
        "Clients allowed to use `/_lb/` (stats and admin actions); others get 403.",
    ),
    Setting(
        "sticky",
        one_of("off", "cookie", "insert"),
        "off",
        "Session affinity: `cookie` honours the affinity cookie the add-on "
        "sets; `insert` sets and reads it here, for apps without the add-on.",
    ),
    Setting(
        "affinity_cookie",
        cookie_name,
        "lb_affinity",
        "Name of the affinity cookie; the same as the add-on's.",
    ),
    Setting(
        "affinity_secret",
        optional(text),
        None,
        "Secret that signs the affinity cookie, the same as the add-on's "
        "`pyramid_lb.affinity_secret`.",
    ),
    # Whom the dispatcher trusts in front of it: the add-on's settings,
    # meaning and all (clear_untrusted aside: the dispatcher always writes
    # its own view for the instances).
    *(s for s in FORWARDED_SETTINGS if s.name != "clear_untrusted"),
    Setting(
        "via_name",
        optional(text),
        None,
        "The name this dispatcher adds to Via (default: host name and pid); a "
        "request that already carries it is a loop and gets 508.",
    ),
    Setting(
        "admin_hosts",
        words,
        "",
        "Names (`name`, or `name:port`) the dispatcher is reached by besides "
        "localhost and its IP addresses: an admin action whose Origin (or Host) "
        "names another host is refused, so that no page can act through DNS "
        "rebinding.",
    ),
)


def parse_dispatcher(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Parse the keys of an ``[app:dispatcher]`` section."""
    values = parse(DISPATCHER_SETTINGS, raw)
    check_forwarded(values)
    if values["sticky"] != "off" and not values["affinity_secret"]:
        raise SettingsError(
            f"sticky = {values['sticky']!r} needs affinity_secret (the secret "
            "that signs the affinity cookie)"
        )
    return values


def reference_blocks() -> dict[str, str]:
    """Every settings reference, by the name of its README block."""
    return {
        "addon": reference(ADDON_SETTINGS, ADDON_PREFIX),
        "dispatcher": reference(DISPATCHER_SETTINGS),
    }


def write_readme(path: str) -> None:
    """Regenerate the settings blocks of the README at ``path``."""
    with open(path, encoding="utf-8") as file:
        content = file.read()
    for name, block in reference_blocks().items():
        pattern = re.compile(
            rf"(<!-- settings:{name} -->\n).*?(<!-- /settings:{name} -->)", re.S
        )
        content, found = pattern.subn(
            lambda match, block=block: match[1] + block + "\n" + match[2], content
        )
        if not found:
            raise SystemExit(f"{path} has no <!-- settings:{name} --> block")
    with open(path, "w", encoding="utf-8") as file:
        file.write(content)
