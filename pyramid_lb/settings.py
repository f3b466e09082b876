"""Settings: the table mechanism and the converters every table uses.

Each table sits next to what it configures (:mod:`pyramid_lb.forwarded`,
:mod:`pyramid_lb.health`, :mod:`pyramid_lb.affinity`,
:mod:`pyramid_lb.dispatcher.config`); a key's name, converter, default and
one-line doc are written once, there, and parsed once at start-up.
"""

from __future__ import annotations

import math
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


def or_off(convert: Callable[[Any], Any]):
    """Like ``convert``, but ``off`` means None (nothing of the kind)."""
    allowed = getattr(convert, "allowed", "a value")

    def convert_or_off(value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "off":
            return None
        try:
            return convert(value)
        except ValueError:
            raise ValueError(f"expected off or {allowed}") from None

    convert_or_off.allowed = f"off or {allowed}"
    return convert_or_off


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size(value: Any) -> int:
    """A number of bytes; ``k``, ``M`` and ``G`` suffixes (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raw = str(value).strip().lower().removesuffix("b")
    unit = raw[-1:] if raw[-1:] in ("k", "m", "g") else ""
    digits = raw[: len(raw) - len(unit)]
    if not digits.isdigit() or not digits.isascii():
        raise ValueError(f"expected {size.allowed}")
    return int(digits) * _SIZE_UNITS[unit]


size.allowed = "a size in bytes, e.g. 1048576, 512k, 100M or 1G"


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


_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def cookie_name(value: Any) -> str:
    """A cookie name (an HTTP token)."""
    name = str(value).strip()
    if not _COOKIE_NAME.fullmatch(name):
        raise ValueError("expected a cookie name: letters, digits and !#$%&'*+-.^_`|~")
    return name


ADDON_PREFIX = "pyramid_lb."


def write_readme(path: str, blocks: Mapping[str, str]) -> None:
    """Rewrite the settings blocks of the README at ``path``: ``blocks`` maps
    a block's name (``<!-- settings:NAME -->``) to its Markdown."""
    with open(path, encoding="utf-8") as file:
        content = file.read()
    for name, block in blocks.items():
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
