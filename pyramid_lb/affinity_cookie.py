"""The affinity cookie shared by the add-on and the dispatcher: signed instance ids.

The value is the instance id and an HMAC-SHA256 of it under a secret the
add-on and the dispatcher share, both base64url: ``d2ViLTI.Kj9...``. A client
can neither invent one nor change the id in one without the secret, so it
cannot pick an instance it was never sent to. (It can keep a cookie it was
given for an instance and send it again: that only lands it there again.)
No Pyramid or waitress here: the dispatcher's proxy core uses it too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

#: The default name of the cookie, for the add-on and the dispatcher alike.
DEFAULT_NAME = "lb_affinity"
_CONTEXT = b"pyramid_lb affinity\x00"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(instance: bytes, secret: str) -> bytes:
    return hmac.new(secret.encode(), _CONTEXT + instance, hashlib.sha256).digest()[:16]


def sign(instance: str, secret: str) -> str:
    """The cookie value pinning a client to ``instance``."""
    raw = instance.encode()
    return f"{_b64(raw)}.{_b64(_mac(raw, secret))}"


def verify(value: str | None, secret: str) -> str | None:
    """The instance id in a cookie value, or None if it is not genuine."""
    if not value or value.count(".") != 1 or len(value) > 512:
        return None
    encoded, signature = value.split(".")
    try:
        raw, mac = _unb64(encoded), _unb64(signature)
        instance = raw.decode()
    except (binascii.Error, ValueError):
        return None
    if not hmac.compare_digest(mac, _mac(raw, secret)):
        return None
    return instance


def cookie_value(header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a Cookie header, or None.

    Split by hand: ``http.cookies`` drops every cookie of the header when any
    other one is malformed (a space in some tracker's value), which would
    unpin those clients. With duplicates the first wins: browsers send the
    cookie of the longest path first (RFC 6265 section 5.4).
    """
    if not header or name not in header:
        return None
    for pair in header.split(";"):
        key, equals, value = pair.partition("=")
        if equals and key.strip() == name:
            return value.strip().strip('"')
    return None


def without_cookie(header: str, name: str) -> str:
    """``header`` without cookie ``name`` (so that the instance never sees it)."""
    kept = [
        pair.strip()
        for pair in header.split(";")
        if pair.strip() and pair.partition("=")[0].strip() != name
    ]
    return "; ".join(kept)


def set_cookie(
    name: str, value: str | None, path: str = "/", secure: bool = False
) -> str:
    """A Set-Cookie header value; ``value`` None deletes the cookie."""
    parts = [f"{name}={value or ''}", f"Path={path or '/'}", "HttpOnly", "SameSite=Lax"]
    if value is None:
        parts.insert(1, "Max-Age=0")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)
