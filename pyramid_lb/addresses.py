"""Addresses: IPs, CIDR ranges and unix sockets for allow-lists; hosts and ports."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The word that stands for peers connected over a unix socket.
UNIX = "unix"


@lru_cache(maxsize=4096)
def parse_ip(text: str) -> IPAddress | None:
    """``text`` as an IP address (IPv4-mapped IPv6 unwrapped), or None.

    Cached: the same few peers (proxies, the dispatcher) ask again and again.
    """
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id:
            # fe80::1%eth0 is the same host as fe80::1 for an allow-list
            return ipaddress.IPv6Address(text.partition("%")[0])
    return address


def parse_port(text: str) -> str | None:
    """A TCP port from 1 to 65535, normalised (``"080"`` is ``"80"``), or None."""
    if 0 < len(text) <= 5 and text.isascii() and text.isdigit():
        number = int(text)
        if 0 < number < 65536:
            return str(number)
    return None


# RFC 3986 reg-name, without the comma: a Host holding one is two hosts
# joined by a proxy (or a forgery), never one name.
_REG_NAME = re.compile(r"(?:[\w.~!$&'()*+;=-]|%[0-9A-Fa-f]{2})+", re.A)


def parse_host(text: str) -> tuple[str, str | None] | None:
    """``(name, port or None)`` of a ``Host`` value, or None when it is not one.

    The name is a reg-name, an IPv4 address or a bracketed IPv6 one (kept
    with its brackets). Nothing else passes: no whitespace, comma, slash,
    userinfo or empty name.
    """
    if text.startswith("["):
        end = text.find("]") + 1
        name, rest = text[:end], text[end:]
        if not end or ":" not in name or not is_ip(name[1:-1]):
            return None
    else:
        name, colon, port = text.partition(":")
        rest = colon + port
        if not _REG_NAME.fullmatch(name):
            return None
    if not rest:
        return name, None
    port = parse_port(rest[1:])
    return (name, port) if port and rest[0] == ":" else None


def is_ip(text: str) -> bool:
    """Whether ``text`` is an IP address without a zone id (``fe80::1%eth0``
    means nothing outside the sender's host)."""
    return "%" not in text and parse_ip(text) is not None


def is_unix_peer(remote_addr: str | None) -> bool:
    """Whether REMOTE_ADDR comes from a unix socket rather than TCP.

    Waitress reports unix-socket peers as ``localhost``; other servers
    leave REMOTE_ADDR empty or put the socket path there.
    """
    return not remote_addr or remote_addr == "localhost" or remote_addr[0] == "/"


class AddressSet:
    """IP addresses and networks, plus ``*`` (everyone) and ``unix``.

    >>> trusted = AddressSet.parse("127.0.0.1 ::1 10.0.0.0/8")
    >>> "10.1.2.3" in trusted, "192.0.2.1" in trusted
    (True, False)
    """

    __slots__ = ("anyone", "unix", "networks", "_text", "_cache")

    def __init__(
        self,
        networks: Iterable[IPNetwork] = (),
        anyone: bool = False,
        unix: bool = False,
        text: str = "",
    ):
        self.networks = tuple(networks)
        self.anyone = anyone
        self.unix = unix
        self._text = text
        # REMOTE_ADDR -> verdict; bounded so a scan cannot grow it forever
        self._cache: dict[str, bool] = {}

    @classmethod
    def parse(cls, value: str | Iterable[str]) -> AddressSet:
        """Parse words such as ``127.0.0.1 ::1 10.0.0.0/8 unix *``.

        Raises ValueError naming the first word that is not an address,
        a network, ``unix`` or ``*``.
        """
        items = value.replace(",", " ").split() if isinstance(value, str) else value
        items = list(items)
        networks = []
        anyone = unix = False
        for item in items:
            if item == "*":
                anyone = True
            elif item.lower() == UNIX:
                unix = True
            else:
                try:
                    network = ipaddress.ip_network(item.strip("[]"), strict=False)
                except ValueError:
                    raise ValueError(
                        f"{item!r} is not an IP address or CIDR network; expected "
                        "addresses or networks such as 127.0.0.1 ::1 10.0.0.0/8, "
                        "'unix' or '*'"
                    ) from None
                if network.version == 6 and network.prefixlen >= 96:
                    mapped = network.network_address.ipv4_mapped
                    if mapped is not None:
                        network = ipaddress.ip_network(
                            f"{mapped}/{network.prefixlen - 96}", strict=False
                        )
                networks.append(network)
        return cls(networks, anyone=anyone, unix=unix, text=" ".join(items))

    def __contains__(self, remote_addr: str | None) -> bool:
        if self.anyone:
            return True
        try:
            return self._cache[remote_addr]
        except (KeyError, TypeError):
            pass
        verdict = self._decide(remote_addr)
        if len(self._cache) < 1024 and isinstance(remote_addr, str):
            self._cache[remote_addr] = verdict
        return verdict

    def _decide(self, remote_addr: str | None) -> bool:
        if is_unix_peer(remote_addr):
            return self.unix
        address = parse_ip(remote_addr)
        if address is None:
            return False
        return any(address in network for network in self.networks)

    def contains_ip(self, address: IPAddress) -> bool:
        """Membership for an already parsed address (no ``unix`` meaning)."""
        return self.anyone or any(address in network for network in self.networks)

    def __bool__(self) -> bool:
        return self.anyone or self.unix or bool(self.networks)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AddressSet):
            return NotImplemented
        return (self.anyone, self.unix, set(self.networks)) == (
            other.anyone,
            other.unix,
            set(other.networks),
        )

    def __hash__(self) -> int:
        return hash((self.anyone, self.unix, frozenset(self.networks)))

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"AddressSet.parse({self._text!r})"
