"""The dispatcher's settings: one table, parsed once into a frozen config.

The config's fields are the keys of ``[app:dispatcher]``, and the keyword
arguments of the constructors they configure bear the same names, so that
nothing is translated on the way. Lists of choices and limits in the docs
come from the code that defines them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

from pyramid_lb.dispatcher.balancer import STRATEGIES, key_function
from pyramid_lb.dispatcher.cache import FILL_WAIT
from pyramid_lb.dispatcher.cluster import MAX_EJECT_TIME, parse_backend_url
from pyramid_lb.dispatcher.proxy import RETRY_FLOOR, RETRY_WINDOW
from pyramid_lb.forwarded import FORWARDED_SETTINGS, check_forwarded
from pyramid_lb.settings import (
    Setting,
    SettingsError,
    addresses,
    cookie_name,
    factor_or_off,
    integer,
    one_of,
    optional,
    or_off,
    parse,
    ratio,
    seconds,
    size,
    text,
    url_path,
    words,
)

#: ``max_in_flight = auto``: a spawned instance's own threads, no cap elsewhere.
AUTO = "auto"

_cap = or_off(integer(1, 100000))


def in_flight_cap(value: Any) -> int | str | None:
    """``auto``, ``off`` (None) or a number of requests >= 1."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        return _cap(value)
    except ValueError:
        raise ValueError("expected auto, off or an integer >= 1") from None


_memory = or_off(size)


def memory_limit(value: Any) -> int | None:
    """``off`` (None) or a size above 0."""
    limit = _memory(value)
    if limit == 0:
        raise ValueError("expected off or a size above 0, e.g. 512M")
    return limit


def cache_size(value: Any) -> int:
    """A size above 0."""
    limit = size(value)
    if limit == 0:
        raise ValueError("expected a size above 0, e.g. 64M")
    return limit


class BackendSpec(NamedTuple):
    """An instance the dispatcher balances over, as configured."""

    url: str
    weight: int = 1
    #: Its own cap (see ``max_in_flight``), where it gives one.
    max_in_flight: int | str | None = AUTO


_BACKEND_OPTIONS = {"weight": integer(1, 1000), "max_in_flight": _cap}


def backend_list(value: Any) -> tuple[BackendSpec, ...]:
    """URLs such as ``http://10.0.0.5:6543``, each optionally followed by
    ``weight=N`` and ``max_in_flight=N``; whitespace or newlines between."""
    if not isinstance(value, str):
        return tuple(value)
    specs: list[BackendSpec] = []
    for word in value.split():
        if "=" in word and "://" not in word:
            option, _, raw = word.partition("=")
            if option not in _BACKEND_OPTIONS or not specs:
                raise ValueError(
                    f"{word!r} is not understood; expected URLs such as "
                    "http://127.0.0.1:6544, each optionally followed by weight=N "
                    "and max_in_flight=N"
                )
            try:
                converted = _BACKEND_OPTIONS[option](raw)
            except ValueError as exc:
                raise ValueError(f"{word!r}: {exc}") from None
            specs[-1] = specs[-1]._replace(**{option: converted})
        else:
            parse_backend_url(word)
            specs.append(BackendSpec(word))
    return tuple(specs)


def hash_key(value: Any) -> str:
    """A request key ``strategy = hash`` understands."""
    spec = str(value).strip()
    key_function(spec)
    return spec


def _strategies() -> str:
    # "`round_robin` (each candidate in turn), ...": the classes' own words
    return ", ".join(
        f"`{name}` ({kind.__doc__.splitlines()[0].rstrip('.').lower()})"
        for name, kind in STRATEGIES.items()
    )


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
        "`http://10.0.0.5:6543 weight=2 max_in_flight=8 http://10.0.0.6:6543`.",
    ),
    Setting(
        "strategy",
        one_of(*STRATEGIES),
        "round_robin",
        f"How an instance is chosen: {_strategies()}.",
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
        f"Retries allowed as a share of the requests of the last {RETRY_WINDOW} s "
        f"(at least {RETRY_FLOOR} retries are always allowed), so a failing "
        "cluster is not stormed.",
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
        "max_in_flight",
        in_flight_cap,
        AUTO,
        "Requests in flight at once per instance; the next ones wait in the "
        "dispatcher's queue. `auto`: a spawned instance's own waitress "
        "`threads` (its `[server:main]`, 4 if unset), so that none waits "
        "unseen inside it, and no cap for `backends` (each takes "
        "`max_in_flight=N`); else a number, or `off`.",
    ),
    Setting(
        "queue_size",
        integer(0, 100000),
        "100",
        "Requests that may wait, in order, while every instance they may go "
        "to is at its cap; one more gets 503 with Retry-After at once (0: no "
        "queue).",
    ),
    Setting(
        "queue_timeout",
        seconds(allow_zero=False),
        "10",
        "How long a request may wait in that queue before it gets 503 with "
        "Retry-After.",
    ),
    Setting(
        "slow_start",
        seconds(),
        "3",
        "Time over which an instance that becomes ready (new, restarted, back "
        "from down or an ejection) ramps from a tenth to its full share of new "
        "requests (0: at once).",
    ),
    Setting(
        "max_requests",
        integer(0),
        "0",
        "Requests after which a spawned instance is replaced the way a rolling "
        "restart does it, one instance at a time (0: never).",
    ),
    Setting(
        "max_requests_jitter",
        integer(0),
        "0",
        "Up to this many requests added at random to each instance's "
        "`max_requests`, so that instances started together are not replaced "
        "together.",
    ),
    Setting(
        "max_memory",
        memory_limit,
        "off",
        "Resident memory (e.g. `512M`) above which a spawned instance is "
        "replaced the same way (`off`: never).",
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
        "Connection failures or 5xx answers (but 503) in a row that take an "
        "instance out of rotation for a while (0: never).",
    ),
    Setting(
        "eject_time",
        seconds(allow_zero=False),
        "5",
        "How long the first ejection lasts; each repeat lasts that much longer "
        f"(at most {MAX_EJECT_TIME:g} s).",
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
    Setting(
        "cache",
        one_of("off", "memory"),
        "off",
        "The shared HTTP cache: `memory` keeps, in the dispatcher, the answers "
        "to GET that say they may be shared (RFC 9111: `s-maxage`, `max-age` or "
        "`Expires`, else a validator to revalidate with; never `no-store`, "
        "`private`, a `Set-Cookie`), answers GET and HEAD from them with "
        "`X-Cache` and `Age`, and has requests for an entry being filled wait "
        f"for it (at most {FILL_WAIT:g} s); `off`: none.",
    ),
    Setting(
        "cache_size",
        cache_size,
        "64M",
        "Memory the cache's entries may take (bodies, headers and bookkeeping); "
        "the least recently used go first.",
    ),
    Setting(
        "cache_max_object",
        cache_size,
        "1M",
        "Largest answer stored; a larger one streams through, unstored and "
        "never held whole.",
    ),
    Setting(
        "cache_stale_if_error",
        seconds(),
        "0",
        "How long past its freshness a stored answer may still be served when "
        "no instance answers (or answers 500, 502, 503 or 504), unless it says "
        "`must-revalidate`, `proxy-revalidate`, `s-maxage` or `no-cache` "
        "(0: never).",
    ),
)

#: The parsed settings: one field per key of the table above.
DispatcherConfig = dataclasses.make_dataclass(
    "DispatcherConfig",
    [(setting.name, Any) for setting in DISPATCHER_SETTINGS],
    frozen=True,
)


def retry_after(config: DispatcherConfig) -> int:
    """Seconds a client is told to wait (Retry-After) when no instance is
    there for it: about the time a health check takes to see one back."""
    return max(1, round(config.health_check_interval))


def parse_dispatcher(raw: Mapping[str, Any]) -> DispatcherConfig:
    """The keys of an ``[app:dispatcher]`` section, checked and typed."""
    values = parse(DISPATCHER_SETTINGS, raw)
    check_forwarded(values)
    if values["sticky"] != "off" and not values["affinity_secret"]:
        raise SettingsError(
            f"sticky = {values['sticky']!r} needs affinity_secret (the secret "
            "that signs the affinity cookie)"
        )
    if values["cache_max_object"] > values["cache_size"]:
        raise SettingsError(
            f"cache_max_object = {values['cache_max_object']} is larger than "
            f"cache_size = {values['cache_size']}: no answer that large could "
            "be stored"
        )
    return DispatcherConfig(**values)
