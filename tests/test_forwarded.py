import logging
import re

import pytest
import webtest
from paste.deploy import loadfilter
from pyramid import testing
from pyramid.exceptions import ConfigurationError
from pyramid.interfaces import ITweens
from pyramid.response import Response
from webob import Request

from pyramid_lb.addresses import AddressSet
from pyramid_lb.forwarded import (
    ORIGINAL_KEY,
    TWEEN,
    ForwardedMiddleware,
    MalformedHeader,
    ProxyHeaders,
    filter_factory,
    forwarded_tween_factory,
    parse_forwarded,
)
from pyramid_lb.settings import SettingsError

PROXY = "10.0.0.1"
CLIENT = "203.0.113.7"
PATH = "/some/path"
# What the proxy's connection to the app looks like before any rewrite.
BASE = {
    "REMOTE_ADDR": PROXY,
    "REMOTE_PORT": "40000",
    "HTTP_HOST": "backend:8080",
    "SERVER_NAME": "backend",
    "SERVER_PORT": "8080",
}
TRUST = {"trusted_proxies": PROXY}
PREFIX = {
    **TRUST,
    "trusted_headers": "x-forwarded-for x-forwarded-proto x-forwarded-host "
    "x-forwarded-port x-forwarded-prefix",
}
RFC = {"trusted_proxies": PROXY, "trusted_headers": "forwarded"}
AUTO = {"trusted_proxies": "10.0.0.0/8", "trusted_proxy_count": "auto"}
EVERY_HEADER = {
    "Forwarded": "for=6.6.6.6;proto=https",
    "X-Forwarded-For": "6.6.6.6",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Port": "443",
    "X-Forwarded-Prefix": "/evil",
    "X-Forwarded-By": "6.6.6.6",
    "X-Real-IP": "6.6.6.6",
    "CF-Connecting-IP": "6.6.6.6",
}
NO_PROXY_HEADERS = {
    key: None
    for key in (
        "HTTP_FORWARDED",
        "HTTP_X_FORWARDED_FOR",
        "HTTP_X_FORWARDED_PROTO",
        "HTTP_X_FORWARDED_HOST",
        "HTTP_X_FORWARDED_PORT",
        "HTTP_X_FORWARDED_PREFIX",
        "HTTP_X_FORWARDED_BY",
        "HTTP_X_REAL_IP",
        "HTTP_CF_CONNECTING_IP",
    )
}
UNCHANGED = {
    "REMOTE_ADDR": PROXY,
    "REMOTE_PORT": "40000",
    "wsgi.url_scheme": "http",
    "HTTP_HOST": "backend:8080",
    "SERVER_NAME": "backend",
    "SERVER_PORT": "8080",
    "SCRIPT_NAME": "",
}


class Bad:
    """The expected outcome of a case that must answer 400 naming ``header``."""

    def __init__(self, header):
        self.header = header

    def __repr__(self):
        return f"Bad({self.header!r})"


def client(address=CLIENT, port=None, xff=None):
    """Expected keys for a client address taken from X-Forwarded-For."""
    return {
        "REMOTE_ADDR": address,
        "REMOTE_PORT": port,
        "HTTP_X_FORWARDED_FOR": address if xff is None else xff,
    }


def location(scheme, host, name, port):
    return {
        "wsgi.url_scheme": scheme,
        "HTTP_HOST": host,
        "SERVER_NAME": name,
        "SERVER_PORT": port,
    }


def bad(settings, header, value, id):
    """A case where ``header: value`` must answer 400 naming the header."""
    return pytest.param(settings, {header: value}, Bad(header), id=f"400 {id}")


REAL_IP = {**TRUST, "trusted_headers": "x-real-ip x-forwarded-proto"}
CLOUDFLARE = {**TRUST, "trusted_headers": "cf-connecting-ip x-forwarded-proto"}

# (settings as ini strings, request headers and environ keys, expected environ
# subset with None for "absent", or Bad(header))
CASES = [
    # -- single-address client headers -------------------------------------------
    pytest.param(
        REAL_IP,
        {"X-Real-IP": CLIENT, "X-Forwarded-For": "6.6.6.6"},
        {
            "REMOTE_ADDR": CLIENT,
            "REMOTE_PORT": None,
            "HTTP_X_REAL_IP": CLIENT,
            "HTTP_X_FORWARDED_FOR": None,
        },
        id="x-real-ip names the client; x-forwarded-for not trusted",
    ),
    pytest.param(
        CLOUDFLARE,
        {"CF-Connecting-IP": "2001:db8::7", "X-Forwarded-Proto": "https"},
        {
            "REMOTE_ADDR": "2001:db8::7",
            "REMOTE_PORT": None,
            "HTTP_CF_CONNECTING_IP": "2001:db8::7",
            **location("https", "backend:8080", "backend", "8080"),
        },
        id="cf-connecting-ip ipv6 client with https",
    ),
    pytest.param(
        CLOUDFLARE,
        {"REMOTE_ADDR": "192.0.2.9", "CF-Connecting-IP": CLIENT},
        {"REMOTE_ADDR": "192.0.2.9", "HTTP_CF_CONNECTING_IP": None},
        id="cf-connecting-ip from an untrusted peer: removed",
    ),
    pytest.param(
        REAL_IP,
        {"X-Real-IP": " "},
        {"REMOTE_ADDR": PROXY},
        id="blank x-real-ip: absent",
    ),
    bad(REAL_IP, "X-Real-IP", f"{CLIENT}, 6.6.6.6", id="x-real-ip with two"),
    bad(REAL_IP, "X-Real-IP", f"{CLIENT}:80", id="x-real-ip with a port"),
    bad(CLOUDFLARE, "CF-Connecting-IP", "[2001:db8::7]", id="cf bracketed"),
    bad(CLOUDFLARE, "CF-Connecting-IP", "fe80::1%eth0", id="cf zone id"),
    # -- who is trusted --------------------------------------------------------
    pytest.param(
        {},
        EVERY_HEADER,
        {**UNCHANGED, **NO_PROXY_HEADERS},
        id="nobody trusted by default: headers removed",
    ),
    pytest.param(
        TRUST,
        {"REMOTE_ADDR": "192.0.2.9", **EVERY_HEADER},
        {**UNCHANGED, "REMOTE_ADDR": "192.0.2.9", **NO_PROXY_HEADERS},
        id="untrusted peer: forged headers removed",
    ),
    pytest.param(
        {**TRUST, "clear_untrusted": "false"},
        {"REMOTE_ADDR": "192.0.2.9", "X-Forwarded-For": "6.6.6.6"},
        {"REMOTE_ADDR": "192.0.2.9", "HTTP_X_FORWARDED_FOR": "6.6.6.6"},
        id="untrusted peer, clear_untrusted false: kept, not applied",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-For": CLIENT},
        client(),
        id="ipv4 client, proxy's port removed",
    ),
    pytest.param(
        {"trusted_proxies": "10.0.0.0/8"},
        {"REMOTE_ADDR": "10.200.3.4", "X-Forwarded-For": CLIENT},
        client(),
        id="cidr range",
    ),
    pytest.param(
        {"trusted_proxies": "2001:db8::/32"},
        {"REMOTE_ADDR": "2001:db8:1::2", "X-Forwarded-For": CLIENT},
        client(),
        id="ipv6 cidr range",
    ),
    pytest.param(
        {"trusted_proxies": "::1"},
        {"REMOTE_ADDR": "::1", "X-Forwarded-For": CLIENT},
        client(),
        id="ipv6 peer",
    ),
    pytest.param(
        {"trusted_proxies": "127.0.0.1"},
        {"REMOTE_ADDR": "::ffff:127.0.0.1", "X-Forwarded-For": CLIENT},
        client(),
        id="ipv4-mapped peer",
    ),
    pytest.param(
        {"trusted_proxies": "*"},
        {"REMOTE_ADDR": "198.51.100.77", "X-Forwarded-For": CLIENT},
        client(),
        id="star trusts any peer",
    ),
    pytest.param(
        {"trusted_proxies": "unix"},
        {"REMOTE_ADDR": "localhost", "X-Forwarded-For": CLIENT},
        client(),
        id="unix socket peer (waitress) trusted",
    ),
    pytest.param(
        {"trusted_proxies": "unix"},
        {"REMOTE_ADDR": "", "X-Forwarded-For": CLIENT},
        client(),
        id="unix socket peer (empty address) trusted",
    ),
    pytest.param(
        {"trusted_proxies": "127.0.0.1 ::1"},
        {"REMOTE_ADDR": "localhost", "X-Forwarded-For": CLIENT},
        {"REMOTE_ADDR": "localhost", "HTTP_X_FORWARDED_FOR": None},
        id="unix socket peer not trusted without unix",
    ),
    pytest.param(
        {"trusted_proxies": "unix"},
        {"REMOTE_ADDR": "127.0.0.1", "X-Forwarded-For": CLIENT},
        {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": None},
        id="unix does not trust tcp peers",
    ),
    # -- X-Forwarded-For ---------------------------------------------------------
    pytest.param(
        TRUST,
        {"X-Forwarded-For": f"{CLIENT}:4711"},
        client(port="4711"),
        id="ipv4 with port",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-For": "2001:db8::7"},
        client("2001:db8::7"),
        id="bare ipv6",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-For": "[2001:db8::7]"},
        client("2001:db8::7"),
        id="bracketed ipv6",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-For": "[2001:db8::7]:4711"},
        client("2001:db8::7", port="4711"),
        id="bracketed ipv6 with port",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-For": f"198.51.100.1 ,  {CLIENT}"},
        client(),
        id="count 1 takes the rightmost value",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-For": f"not an address, {CLIENT}"},
        client(),
        id="untrusted values left of the client are not checked",
    ),
    pytest.param(
        {**TRUST, "trusted_proxy_count": "2"},
        {"X-Forwarded-For": f"6.6.6.6, 198.51.100.1, {CLIENT}:80"},
        client("198.51.100.1", xff=f"198.51.100.1, {CLIENT}"),
        id="count 2 takes the second from the right",
    ),
    pytest.param(
        {**TRUST, "trusted_proxy_count": "2"},
        {"X-Forwarded-For": CLIENT},
        {**UNCHANGED, "HTTP_X_FORWARDED_FOR": None},
        id="count 2 with one value: ignored",
    ),
    pytest.param(
        {**TRUST, "trusted_proxy_count": "2", "clear_untrusted": "no"},
        {"X-Forwarded-For": f"6.6.6.6, 198.51.100.1, {CLIENT}"},
        {
            "REMOTE_ADDR": "198.51.100.1",
            "HTTP_X_FORWARDED_FOR": f"6.6.6.6, 198.51.100.1, {CLIENT}",
        },
        id="clear_untrusted false keeps the whole header",
    ),
    pytest.param(
        {**TRUST, "trusted_proxy_count": "2", "clear_untrusted": "off"},
        {"X-Forwarded-Proto": "ftp, https, http", "X-Forwarded-By": "x"},
        {
            "wsgi.url_scheme": "https",
            "HTTP_X_FORWARDED_PROTO": "ftp, https, http",
            "HTTP_X_FORWARDED_BY": "x",
        },
        id="clear_untrusted false keeps proto and x-forwarded-by",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-For": " "},
        {**UNCHANGED, "HTTP_X_FORWARDED_FOR": None},
        id="blank header counts as absent",
    ),
    pytest.param(
        AUTO,
        {"X-Forwarded-For": "6.6.6.6, 198.51.100.1, 10.0.0.3, 10.1.0.2"},
        client("198.51.100.1", xff="198.51.100.1, 10.0.0.3, 10.1.0.2"),
        id="auto skips trusted addresses from the right",
    ),
    pytest.param(
        AUTO,
        {"X-Forwarded-For": "10.0.0.9, [::ffff:10.0.0.3]:99"},
        client("10.0.0.9", xff="10.0.0.9, ::ffff:10.0.0.3"),
        id="auto with every address trusted takes the leftmost",
    ),
    pytest.param(
        AUTO,
        {"X-Forwarded-For": "garbage, 198.51.100.1, 10.0.0.3"},
        client("198.51.100.1", xff="198.51.100.1, 10.0.0.3"),
        id="auto does not read past the client",
    ),
    pytest.param(
        AUTO,
        {
            "X-Forwarded-For": "198.51.100.1, 10.0.0.3",
            "X-Forwarded-Proto": "https, http",
            "Host": "example.com",
        },
        {**client("198.51.100.1", xff="198.51.100.1, 10.0.0.3"), "SERVER_PORT": "443"},
        id="auto reads proto at the client's hop",
    ),
    pytest.param(
        AUTO,
        {"X-Forwarded-Proto": "https, http"},
        {"wsgi.url_scheme": "http", "HTTP_X_FORWARDED_PROTO": "http"},
        id="auto without x-forwarded-for reads hop 1",
    ),
    bad(TRUST, "X-Forwarded-For", "example.com", "host name for address"),
    bad(TRUST, "X-Forwarded-For", "unknown", "unknown in x-forwarded-for"),
    bad(TRUST, "X-Forwarded-For", f"{CLIENT}:0", "port 0"),
    bad(TRUST, "X-Forwarded-For", f"{CLIENT}:65536", "port too big"),
    bad(TRUST, "X-Forwarded-For", f"{CLIENT}:80:81", "two ports"),
    bad(TRUST, "X-Forwarded-For", "[2001:db8::7", "unclosed bracket"),
    bad(TRUST, "X-Forwarded-For", "[2001:db8::7]80", "junk after bracket"),
    bad(TRUST, "X-Forwarded-For", f"[{CLIENT}]", "bracketed ipv4"),
    bad(TRUST, "X-Forwarded-For", "fe80::1%eth0", "zone id"),
    bad(TRUST, "X-Forwarded-For", "_hidden", "obfuscated in x-forwarded-for"),
    bad(TRUST, "X-Forwarded-For", f"{CLIENT},", "empty last value"),
    bad(
        {**TRUST, "trusted_proxy_count": "2"},
        "X-Forwarded-For",
        f"{CLIENT}, bogus",
        "trusted hop not an address",
    ),
    bad(
        AUTO,
        "X-Forwarded-For",
        f"{CLIENT}, 10.0.0.3:x",
        "auto walk meets a non-address",
    ),
    # -- scheme, host, port --------------------------------------------------------
    pytest.param(
        TRUST,
        {"X-Forwarded-Proto": "https"},
        location("https", "backend:8080", "backend", "8080"),
        id="proto keeps the client's explicit port",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-Proto": "HTTPS", "Host": "example.com"},
        location("https", "example.com", "example.com", "443"),
        id="proto https re-derives port 443",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-Proto": "https", "Host": "example.com:443"},
        location("https", "example.com:443", "example.com", "443"),
        id="default port kept in host as the client wrote it",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-Host": "example.com:443", "X-Forwarded-Port": "443"},
        location("http", "example.com:443", "example.com", "443"),
        id="forwarded host and the same port kept as written",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-Host": "example.com:8080", "X-Forwarded-Port": "80"},
        location("http", "example.com", "example.com", "80"),
        id="forwarded port wins over the host's",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-Proto": "https", "HTTP_HOST": None},
        {**location("https", None, "backend", "443")},
        id="proto without any host header",
    ),
    pytest.param(
        {**TRUST, "trusted_proxy_count": "2"},
        {"X-Forwarded-Proto": "https, http", "Host": "example.com"},
        location("https", "example.com", "example.com", "443"),
        id="count 2 takes the oldest of the last two",
    ),
    pytest.param(
        {**TRUST, "trusted_proxy_count": "2"},
        {"X-Forwarded-Proto": "https", "Host": "example.com"},
        location("https", "example.com", "example.com", "443"),
        id="count 2 with one value takes it",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-Proto": "ftp, https", "Host": "example.com"},
        {"wsgi.url_scheme": "https", "HTTP_X_FORWARDED_PROTO": "https"},
        id="proto count 1 takes the last, cut down",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-Host": "example.com"},
        location("http", "example.com", "example.com", "80"),
        id="host without port takes the default",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-Host": "example.com", "X-Forwarded-Proto": "https"},
        location("https", "example.com", "example.com", "443"),
        id="host and proto",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-Host": "example.com:8443", "X-Forwarded-Proto": "https"},
        location("https", "example.com:8443", "example.com", "8443"),
        id="host with port",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-Host": "[2001:db8::5]:8080"},
        location("http", "[2001:db8::5]:8080", "[2001:db8::5]", "8080"),
        id="ipv6 host with port",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-Host": "[2001:db8::5]"},
        location("http", "[2001:db8::5]", "[2001:db8::5]", "80"),
        id="ipv6 host",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-Host": "192.0.2.5:81"},
        location("http", "192.0.2.5:81", "192.0.2.5", "81"),
        id="ipv4 host",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-Host": "xn--bcher-kva.example_1.%41"},
        location(
            "http", "xn--bcher-kva.example_1.%41", "xn--bcher-kva.example_1.%41", "80"
        ),
        id="reg-name with underscore and pct-encoding",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-Host": "example.com:9000", "X-Forwarded-Port": "8443"},
        location("http", "example.com:8443", "example.com", "8443"),
        id="port replaces the host's port",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-Port": "8443", "Host": "example.com"},
        location("http", "example.com:8443", "example.com", "8443"),
        id="port alone applies to the client's host",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-Port": "443", "X-Forwarded-Proto": "https", "Host": "a.test:1"},
        location("https", "a.test", "a.test", "443"),
        id="port equal to the scheme's default",
    ),
    pytest.param(
        {**TRUST, "trusted_headers": "x-forwarded-for"},
        {"X-Forwarded-Proto": "https", "X-Forwarded-For": CLIENT},
        {**client(), "wsgi.url_scheme": "http", "HTTP_X_FORWARDED_PROTO": None},
        id="untrusted kind of header removed from a trusted peer",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-By": "198.51.100.9"},
        {**UNCHANGED, "HTTP_X_FORWARDED_BY": None},
        id="x-forwarded-by always removed",
    ),
    bad(TRUST, "X-Forwarded-Proto", "ftp", "proto ftp"),
    bad(TRUST, "X-Forwarded-Proto", "https;", "proto junk"),
    bad(
        {**TRUST, "trusted_proxy_count": "2"},
        "X-Forwarded-Proto",
        "https, ws",
        "trusted proto hop invalid",
    ),
    bad(TRUST, "X-Forwarded-Host", "exa mple.com", "host with space"),
    bad(TRUST, "X-Forwarded-Host", "user@example.com", "host with userinfo"),
    bad(TRUST, "X-Forwarded-Host", "example.com/x", "host with path"),
    bad(TRUST, "X-Forwarded-Host", "example.com:http", "host port not digits"),
    bad(TRUST, "X-Forwarded-Host", "example.com:", "host empty port"),
    bad(TRUST, "X-Forwarded-Host", "example.com:99999", "host port too big"),
    bad(TRUST, "X-Forwarded-Host", "[::1", "host unclosed bracket"),
    bad(TRUST, "X-Forwarded-Host", "[example.com]", "host brackets no ipv6"),
    bad(TRUST, "X-Forwarded-Host", "[::1]x", "host junk after bracket"),
    bad(TRUST, "X-Forwarded-Host", "a.test,", "host empty value"),
    bad(TRUST, "X-Forwarded-Port", "0", "port 0 forwarded"),
    bad(TRUST, "X-Forwarded-Port", "65536", "port 65536"),
    bad(TRUST, "X-Forwarded-Port", "+80", "port with sign"),
    bad(TRUST, "X-Forwarded-Port", "8o", "port not digits"),
    pytest.param(
        TRUST,
        {"X-Forwarded-Proto": "https", "Host": "bad host"},
        Bad("Host"),
        id="400 client host unusable when re-deriving",
    ),
    # -- X-Forwarded-Prefix ---------------------------------------------------------
    pytest.param(
        PREFIX,
        {"X-Forwarded-Prefix": "/app"},
        {"SCRIPT_NAME": "/app", "PATH_INFO": PATH},
        id="prefix",
    ),
    pytest.param(
        PREFIX,
        {"X-Forwarded-Prefix": "/app/v1/"},
        {"SCRIPT_NAME": "/app/v1", "HTTP_X_FORWARDED_PREFIX": "/app/v1/"},
        id="prefix trailing slash dropped",
    ),
    pytest.param(
        PREFIX,
        {"X-Forwarded-Prefix": "/"},
        {"SCRIPT_NAME": "", "PATH_INFO": PATH},
        id="prefix slash alone is empty",
    ),
    pytest.param(
        PREFIX,
        {"X-Forwarded-Prefix": "/app", "SCRIPT_NAME": "/mounted"},
        {"SCRIPT_NAME": "/app/mounted", "PATH_INFO": PATH},
        id="prefix goes before the current script name",
    ),
    pytest.param(
        TRUST,
        {"X-Forwarded-Prefix": "/app"},
        {"SCRIPT_NAME": "", "HTTP_X_FORWARDED_PREFIX": None},
        id="prefix not trusted by default",
    ),
    bad(PREFIX, "X-Forwarded-Prefix", "app", "prefix relative"),
    bad(PREFIX, "X-Forwarded-Prefix", "//evil.example", "prefix double slash"),
    bad(PREFIX, "X-Forwarded-Prefix", "/a//b", "prefix inner double slash"),
    bad(PREFIX, "X-Forwarded-Prefix", "/a\\b", "prefix backslash"),
    bad(PREFIX, "X-Forwarded-Prefix", "/a/../b", "prefix dot-dot"),
    bad(PREFIX, "X-Forwarded-Prefix", "/a\x7fb", "prefix control char"),
    # -- Forwarded -------------------------------------------------------------------
    pytest.param(
        RFC,
        {
            "Forwarded": f"for={CLIENT};proto=https;host=example.com",
            **{k: v for k, v in EVERY_HEADER.items() if k != "Forwarded"},
        },
        {
            "REMOTE_ADDR": CLIENT,
            "REMOTE_PORT": None,
            **location("https", "example.com", "example.com", "443"),
            **{k: None for k in NO_PROXY_HEADERS if k != "HTTP_FORWARDED"},
            "HTTP_FORWARDED": f"for={CLIENT};proto=https;host=example.com",
        },
        id="forwarded for, proto, host; x-forwarded removed",
    ),
    pytest.param(
        RFC,
        {"Forwarded": f'For="{CLIENT}:4711";PROTO=HTTPS'},
        {"REMOTE_ADDR": CLIENT, "REMOTE_PORT": "4711", "wsgi.url_scheme": "https"},
        id="forwarded names case-insensitive, quoted ipv4 with port",
    ),
    pytest.param(
        RFC,
        {"Forwarded": 'for="[2001:db8:cafe::17]:4711"'},
        {"REMOTE_ADDR": "2001:db8:cafe::17", "REMOTE_PORT": "4711"},
        id="forwarded ipv6 with port",
    ),
    pytest.param(
        RFC,
        {"Forwarded": 'for="[2001:db8:cafe::17]"'},
        {"REMOTE_ADDR": "2001:db8:cafe::17", "REMOTE_PORT": None},
        id="forwarded ipv6",
    ),
    pytest.param(
        RFC,
        {"Forwarded": r'for=192.0.2.60;host="ex\ample.com:8\080"'},
        {
            "REMOTE_ADDR": "192.0.2.60",
            **location("http", "example.com:8080", "example.com", "8080"),
        },
        id="forwarded quoted-pair unescaping",
    ),
    pytest.param(
        RFC,
        {"Forwarded": f'for=192.0.2.1;ext="a, b; c=d\\"", for={CLIENT}'},
        {"REMOTE_ADDR": CLIENT, "HTTP_FORWARDED": f"for={CLIENT}"},
        id="forwarded commas inside quotes, count 1",
    ),
    pytest.param(
        {**RFC, "trusted_proxy_count": "2"},
        {"Forwarded": f'for=192.0.2.1;ext="a, b; c=d\\"", for={CLIENT}'},
        {"REMOTE_ADDR": "192.0.2.1"},
        id="forwarded commas inside quotes, count 2",
    ),
    pytest.param(
        RFC,
        {"Forwarded": f"for={CLIENT} ; by=10.0.0.1;secret=x ;; , "},
        {
            "REMOTE_ADDR": CLIENT,
            "HTTP_FORWARDED": f"for={CLIENT} ; by=10.0.0.1;secret=x ;;",
        },
        id="forwarded unknown params, spaces, empty pairs and elements",
    ),
    pytest.param(
        RFC,
        {"Forwarded": "for=unknown;proto=https", "Host": "example.com"},
        {
            "REMOTE_ADDR": PROXY,
            "REMOTE_PORT": "40000",
            "wsgi.url_scheme": "https",
            "SERVER_PORT": "443",
        },
        id="forwarded for=unknown keeps the peer, applies proto",
    ),
    pytest.param(
        RFC,
        {"Forwarded": 'for="_hidden:_port";proto=https;host=example.com'},
        {
            "REMOTE_ADDR": PROXY,
            **location("https", "example.com", "example.com", "443"),
        },
        id="forwarded obfuscated for keeps the peer",
    ),
    pytest.param(
        RFC,
        {"Forwarded": 'for="unknown:4711"'},
        {"REMOTE_ADDR": PROXY, "REMOTE_PORT": "40000"},
        id="forwarded unknown with port keeps the peer",
    ),
    pytest.param(
        RFC,
        {"Forwarded": f'for="{CLIENT}:_p1"'},
        {"REMOTE_ADDR": CLIENT, "REMOTE_PORT": None},
        id="forwarded obfuscated port",
    ),
    pytest.param(
        RFC,
        {"Forwarded": f"proto=https;host=a.test, for={CLIENT}"},
        {"REMOTE_ADDR": CLIENT, "wsgi.url_scheme": "http", "HTTP_HOST": "backend:8080"},
        id="forwarded count 1 ignores the client's element",
    ),
    pytest.param(
        {**RFC, "trusted_proxy_count": "2"},
        {
            "Forwarded": f"for={CLIENT};proto=https, "
            "for=10.0.0.2;proto=http;host=in.test"
        },
        {"REMOTE_ADDR": CLIENT, **location("https", "in.test", "in.test", "443")},
        id="forwarded count 2: for from hop 2, oldest proto and host",
    ),
    pytest.param(
        {**RFC, "trusted_proxy_count": "2"},
        {"Forwarded": "for=192.0.2.1;proto=https"},
        {"REMOTE_ADDR": PROXY, "wsgi.url_scheme": "https"},
        id="forwarded fewer elements than count: for ignored, proto applied",
    ),
    pytest.param(
        {**RFC, **AUTO},
        {
            "Forwarded": f"for=6.6.6.6, for={CLIENT};proto=https, "
            "for=10.0.0.3, for=10.0.0.2"
        },
        {
            "REMOTE_ADDR": CLIENT,
            "wsgi.url_scheme": "https",
            "HTTP_FORWARDED": f"for={CLIENT};proto=https, for=10.0.0.3, for=10.0.0.2",
        },
        id="forwarded auto",
    ),
    pytest.param(
        {**RFC, **AUTO},
        {"Forwarded": "for=10.0.0.4, for=10.0.0.3"},
        {"REMOTE_ADDR": "10.0.0.4"},
        id="forwarded auto all trusted takes the leftmost",
    ),
    pytest.param(
        {**RFC, **AUTO},
        {"Forwarded": f"for={CLIENT}, for=unknown;proto=https, for=10.0.0.3"},
        {"REMOTE_ADDR": PROXY, "wsgi.url_scheme": "https"},
        id="forwarded auto stops at unknown",
    ),
    pytest.param(
        {**RFC, **AUTO},
        {"Forwarded": f"for={CLIENT}, proto=https, for=10.0.0.3"},
        {"REMOTE_ADDR": PROXY, "wsgi.url_scheme": "https"},
        id="forwarded auto stops at an element without for",
    ),
    pytest.param(
        {**RFC, "clear_untrusted": "0"},
        {"Forwarded": f"for=6.6.6.6, for={CLIENT}", "X-Forwarded-For": "6.6.6.6"},
        {
            "REMOTE_ADDR": CLIENT,
            "HTTP_FORWARDED": f"for=6.6.6.6, for={CLIENT}",
            "HTTP_X_FORWARDED_FOR": "6.6.6.6",
        },
        id="forwarded, clear_untrusted false keeps everything",
    ),
    pytest.param(
        RFC,
        {"Forwarded": ", ,"},
        {**UNCHANGED, "HTTP_FORWARDED": None},
        id="forwarded with no elements counts as absent",
    ),
    bad(
        RFC, "Forwarded", f"for={CLIENT};for=192.0.2.1", "forwarded repeated parameter"
    ),
    bad(
        RFC,
        "Forwarded",
        f"for={CLIENT};FOR=192.0.2.1",
        "forwarded repeated, other case",
    ),
    bad(RFC, "Forwarded", f"for={CLIENT};proto", "forwarded pair without value"),
    pytest.param(
        RFC, {"Forwarded": "for="}, Bad("Forwarded"), id="400 forwarded empty value"
    ),
    bad(RFC, "Forwarded", f"for = {CLIENT}", "forwarded spaces around ="),
    bad(RFC, "Forwarded", f"for={CLIENT} proto=http", "forwarded missing semicolon"),
    bad(RFC, "Forwarded", 'for="[2001:db8::1]', "forwarded unterminated quote"),
    bad(RFC, "Forwarded", f'for="{CLIENT}"x', "forwarded junk after quote"),
    bad(RFC, "Forwarded", "for=2001:db8::1", "forwarded unquoted ipv6"),
    bad(RFC, "Forwarded", 'for="2001:db8::1"', "forwarded ipv6 without brackets"),
    bad(RFC, "Forwarded", 'for="[2001:db8::1]:99999"', "forwarded port too big"),
    bad(RFC, "Forwarded", "for=example.com", "forwarded for not a node"),
    bad(RFC, "Forwarded", f"for={CLIENT};proto=ftp", "forwarded proto"),
    bad(RFC, "Forwarded", f'for={CLIENT};host="a b"', "forwarded host"),
]


# -- running a case through the filter or the add-on ------------------------------


def request_of(request):
    """A GET of PATH from BASE; headers given by name, None removes a key."""
    req = webtest.TestRequest.blank(PATH, dict(BASE))
    for key, value in request.items():
        if not key.isupper():
            key = "HTTP_" + key.upper().replace("-", "_")
        if value is None:
            req.environ.pop(key, None)
        else:
            req.environ[key] = value
    return req


def recorder(seen):
    def app(environ, start_response):
        seen.append(dict(environ))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return app


def through_filter(tmp_path, settings, seen):
    """The app wrapped by ``egg:pyramid_lb#forwarded`` loaded from an ini file."""
    ini = tmp_path / "filter.ini"
    lines = ["[filter:forwarded]", "use = egg:pyramid_lb#forwarded"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    ini.write_text("\n".join(lines) + "\n")
    wrap = loadfilter(f"config:{ini}", name="forwarded")
    return wrap(recorder(seen))


def through_addon(settings, seen):
    """A Pyramid app with ``config.include('pyramid_lb')``."""
    config = testing.setUp(settings={f"pyramid_lb.{k}": v for k, v in settings.items()})
    config.include("pyramid_lb")

    def view(request):
        seen.append(dict(request.environ))
        return Response("ok")

    config.add_route("any", "/*rest")
    config.add_view(view, route_name="any")
    return config.make_wsgi_app()


@pytest.fixture(params=["filter", "addon"])
def make_app(request, tmp_path):
    def make(settings, seen):
        if request.param == "filter":
            return webtest.TestApp(through_filter(tmp_path, settings, seen))
        return webtest.TestApp(through_addon(settings, seen))

    yield make
    testing.tearDown()


ABSENT = "(absent)"


@pytest.mark.parametrize(("settings", "request_", "expected"), CASES)
def test_case(make_app, settings, request_, expected):
    seen = []
    app = make_app(settings, seen)
    response = app.do_request(request_of(request_), expect_errors=True)
    if isinstance(expected, Bad):
        assert response.status_int == 400
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert response.text.startswith(f"Bad Request\n\n{expected.header}: ")
        assert seen == []
        return
    assert response.status_int == 200
    (environ,) = seen
    actual = {key: environ.get(key, ABSENT) for key in expected}
    assert actual == {k: ABSENT if v is None else v for k, v in expected.items()}
    assert environ["PATH_INFO"] == PATH
    if settings.get("clear_untrusted", "true") == "true":
        assert Request(environ).client_addr == environ["REMOTE_ADDR"]


# -- the 400 answer -----------------------------------------------------------------


def test_bad_request_answer_and_warning(make_app, caplog):
    seen = []
    app = make_app(TRUST, seen)
    forged = "<script>\x01" + "x" * 200
    caplog.set_level(logging.WARNING, logger="pyramid_lb.forwarded")
    response = app.do_request(
        request_of({"X-Forwarded-For": forged}), expect_errors=True
    )
    assert response.status == "400 Bad Request"
    assert response.content_type == "text/plain"
    assert response.charset == "utf-8"
    expected = (
        'X-Forwarded-For: "?script??' + "x" * 31 + '..." is not an IP address[:port]'
    )
    assert response.text == f"Bad Request\n\n{expected}\n"
    assert seen == []
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.name == "pyramid_lb.forwarded"
    assert record.getMessage() == f"400 Bad Request for peer '{PROXY}': {expected}"


def test_malformed_header_names_header_and_reason():
    exc = MalformedHeader("Forwarded", 'parameter "for" repeated in one element')
    assert (exc.header, exc.reason) == (
        "Forwarded",
        'parameter "for" repeated in one element',
    )
    assert str(exc) == 'Forwarded: parameter "for" repeated in one element'
    assert isinstance(exc, ValueError)


# -- original values -------------------------------------------------------------


def test_original_values_are_kept():
    proxy = ProxyHeaders(AddressSet.parse(PROXY))
    environ = {
        **BASE,
        "wsgi.url_scheme": "http",
        "HTTP_X_FORWARDED_FOR": f"6.6.6.6, {CLIENT}:4711",
        "HTTP_X_FORWARDED_PROTO": "https",
        "HTTP_X_FORWARDED_BY": "x",
    }
    proxy.rewrite(environ)
    assert environ[ORIGINAL_KEY] == {
        "REMOTE_ADDR": PROXY,
        "REMOTE_PORT": "40000",
        "HTTP_X_FORWARDED_FOR": f"6.6.6.6, {CLIENT}:4711",
        "HTTP_X_FORWARDED_BY": "x",
        "wsgi.url_scheme": "http",
    }
    # A second pass (say the filter and the add-on both configured) keeps the
    # first originals; the client is not a trusted peer, so nothing applies.
    proxy.rewrite(environ)
    assert environ[ORIGINAL_KEY]["REMOTE_ADDR"] == PROXY
    assert environ["REMOTE_ADDR"] == CLIENT


def test_original_values_absent_when_nothing_changes():
    environ = {**BASE, "wsgi.url_scheme": "http"}
    ProxyHeaders(AddressSet.parse(PROXY)).rewrite(environ)
    ProxyHeaders(AddressSet.parse("")).rewrite(environ)
    assert ORIGINAL_KEY not in environ
    assert environ == {**BASE, "wsgi.url_scheme": "http"}


def test_malformed_header_leaves_environ_untouched():
    environ = {
        **BASE,
        "wsgi.url_scheme": "http",
        "HTTP_X_FORWARDED_FOR": CLIENT,
        "HTTP_X_FORWARDED_BY": "x",
        "HTTP_X_FORWARDED_PORT": "0",
    }
    before = dict(environ)
    with pytest.raises(MalformedHeader, match="X-Forwarded-Port"):
        ProxyHeaders(AddressSet.parse(PROXY)).rewrite(environ)
    assert environ == before


# -- settings ------------------------------------------------------------------------

BAD_SETTINGS = [
    pytest.param(
        {"trusted_proxies": "10.0.0.300"},
        "trusted_proxies = '10.0.0.300'",
        id="address",
    ),
    pytest.param(
        {"trusted_proxies": "10.0.0.1", "trusted_proxy_count": "0"},
        "trusted_proxy_count = '0'",
        id="count",
    ),
    pytest.param(
        {"trusted_proxies": "*", "trusted_proxy_count": "auto"},
        "trusted_proxy_count = 'auto'",
        id="auto with star",
    ),
    pytest.param(
        {"trusted_headers": "x-client-ip"},
        "trusted_headers = 'x-client-ip'",
        id="header",
    ),
    pytest.param(
        {"trusted_headers": "x-forwarded-for x-real-ip"},
        "trusted_headers: 'x-forwarded-for' and 'x-real-ip' both name the client",
        id="two client headers",
    ),
    pytest.param(
        {"trusted_headers": "forwarded cf-connecting-ip"},
        "trusted_headers: 'forwarded'",
        id="forwarded with cf-connecting-ip",
    ),
    pytest.param(
        {"trusted_headers": "forwarded x-forwarded-for"},
        "trusted_headers: 'forwarded'",
        id="mixed headers",
    ),
    pytest.param({"clear_untrusted": "ture"}, "clear_untrusted = 'ture'", id="boolean"),
]


@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS)
def test_bad_filter_settings(tmp_path, settings, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        through_filter(tmp_path, settings, [])


@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS)
def test_bad_middleware_arguments(settings, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        ForwardedMiddleware(recorder([]), **settings)


@pytest.mark.parametrize("include", ["pyramid_lb", "pyramid_lb.forwarded"])
@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS)
def test_bad_addon_settings(include, settings, message):
    config = testing.setUp(settings={f"pyramid_lb.{k}": v for k, v in settings.items()})
    try:
        with pytest.raises(
            ConfigurationError, match=re.escape("pyramid_lb." + message)
        ):
            config.include(include)
    finally:
        testing.tearDown()


def test_unknown_filter_setting(tmp_path):
    with pytest.raises(SettingsError, match="unknown setting 'trusted_proxy'"):
        through_filter(tmp_path, {"trusted_proxy": PROXY}, [])


def test_filter_factory_directly():
    seen = []
    app = webtest.TestApp(filter_factory({}, trusted_proxies=PROXY)(recorder(seen)))
    app.do_request(request_of({"X-Forwarded-For": CLIENT}))
    assert seen[0]["REMOTE_ADDR"] == CLIENT


def test_middleware_takes_typed_values():
    seen = []
    app = ForwardedMiddleware(
        recorder(seen),
        trusted_proxies=AddressSet.parse("10.0.0.0/8"),
        trusted_proxy_count=2,
        trusted_headers=frozenset({"x-forwarded-for"}),
        clear_untrusted=False,
    )
    webtest.TestApp(app).do_request(
        request_of(
            {
                "X-Forwarded-For": f"6.6.6.6, {CLIENT}, 10.0.0.9",
                "X-Forwarded-Proto": "https",
            }
        )
    )
    assert seen[0]["REMOTE_ADDR"] == CLIENT
    assert seen[0]["HTTP_X_FORWARDED_PROTO"] == "https"
    assert seen[0]["wsgi.url_scheme"] == "http"


# -- the add-on -----------------------------------------------------------------------


@pytest.fixture
def config():
    config = testing.setUp(settings={"pyramid_lb.trusted_proxies": PROXY})
    yield config
    testing.tearDown()


def tween_names(config):
    config.commit()
    return [name for name, _ in config.registry.getUtility(ITweens).implicit()]


def test_tween_runs_first(config):
    config.include("pyramid_lb")
    names = tween_names(config)
    assert names[0] == TWEEN
    assert names[1] == "pyramid_lb.health.health_tween_factory"


def test_include_forwarded_alone_parses_settings(config):
    config.get_settings()["pyramid_lb.trusted_proxy_count"] = "auto"
    config.include("pyramid_lb.forwarded")
    settings = config.get_settings()
    assert settings["pyramid_lb.trusted_proxies"] == AddressSet.parse(PROXY)
    assert settings["pyramid_lb.trusted_proxy_count"] == "auto"
    assert settings["pyramid_lb.clear_untrusted"] is True
    assert tween_names(config) == [TWEEN, "pyramid.tweens.excview_tween_factory"]


def test_tween_off_costs_nothing(config):
    def handler(request):
        raise AssertionError("not called")

    settings = config.registry.settings
    settings.update(
        {"pyramid_lb.trusted_proxies": "", "pyramid_lb.clear_untrusted": "false"}
    )
    config.include("pyramid_lb.forwarded")  # parses them, once
    assert forwarded_tween_factory(handler, config.registry) is handler
    settings["pyramid_lb.clear_untrusted"] = True
    assert forwarded_tween_factory(handler, config.registry) is not handler


# -- the Forwarded parser ----------------------------------------------------------


def test_parse_forwarded():
    assert parse_forwarded('for=a;By="b\\\\c" , ;, Proto=http') == [
        ({"for": "a", "by": "b\\c"}, 'for=a;By="b\\\\c"'),
        ({"proto": "http"}, "Proto=http"),
    ]
