"""Real apps through the dispatcher, nginx and HAProxy, against the same app direct.

A balancer is trusted only when the app behind it cannot tell it is there.
Each request goes once straight to the app and once through each front, with
the same Host header and from the same client address, and what comes back
must be the same: status, the headers that matter, the body and every
absolute URL in it (redirects, pagination links, static assets, an API's
advertised URLs are built from what the app sees of the request).
"""

from __future__ import annotations

import difflib
import http.client
import re
from dataclasses import dataclass, replace

import pytest
import requests

from pyramid_lb import cli
from pyramid_lb.dispatcher.instance import WAITRESS_FORWARDED
from tests.dispatcher.site import SERVING, free_base_port, free_port
from tests.processes import BIN, LOGGING_INI, ROOT, wait_until
from tests.test_export import HAPROXY, NGINX, answers

INI = """
[app:main]
use = call:tests.realapps.{app}:main
{app_settings}

[server:main]
use = egg:waitress#main
host = 127.0.0.1
get port = http_port
{server_settings}

[app:dispatcher]
use = egg:pyramid_lb#dispatcher
instances = 2
base_port = {base_port}
health_check_path = {ready}
liveness_path = {live}
health_check_interval = 0.1
health_check_timeout = 1
rise = 1
fall = 2
stop_timeout = 5
# The client in front (a TLS-terminating proxy on loopback) is trusted.
trusted_proxies = 127.0.0.1 ::1

[server:dispatcher]
use = egg:waitress#main
listen = 127.0.0.1:0
threads = 8

[DEFAULT]
http_port = 6543
"""

APPS = {
    # Without the add-on: waitress applies the headers of the proxy it trusts.
    "shop": dict(
        app_settings="",
        server_settings=f"""\
trusted_proxy = 127.0.0.1
trusted_proxy_count = 1
trusted_proxy_headers = {WAITRESS_FORWARDED}
clear_untrusted_proxy_headers = true""",
        ready="/ping",
        live="/ping",
    ),
    # With the add-on, which does it itself.
    "library": dict(
        app_settings="""\
pyramid.includes = pyramid_lb
pyramid_lb.trusted_proxies = 127.0.0.1 ::1""",
        server_settings="clear_untrusted_proxy_headers = false",
        ready="/readyz",
        live="/healthz",
    ),
}

FRONTS = [
    pytest.param("dispatcher", id="dispatcher"),
    pytest.param(
        "nginx",
        id="nginx",
        marks=pytest.mark.skipif(NGINX is None, reason="nginx is not installed"),
    ),
    pytest.param(
        "haproxy",
        id="haproxy",
        marks=pytest.mark.skipif(HAPROXY is None, reason="HAProxy is not installed"),
    ),
]

#: Compared; the fronts' own Via, X-Request-ID, Server and Date are not.
HEADERS = (
    "Location",
    "Set-Cookie",
    "Vary",
    "ETag",
    "Content-Type",
    "Content-Length",
    "Content-Language",
    "Cache-Control",
    "Last-Modified",
    "Retry-After",
)
ABSOLUTE_URL = re.compile(rb"https?://[^\s\"'<>]+(?<![.,;:])")
FORM = (("Content-Type", "application/x-www-form-urlencoded"),)


@dataclass(frozen=True)
class Case:
    """One request to an app."""

    name: str
    method: str
    path: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    # Send If-None-Match with the ETag the app gave this request directly.
    revalidate: bool = False


CASES = {
    "shop": [
        Case("home-redirect", "GET", "/"),
        Case("products", "GET", "/products"),
        Case("products-page2", "GET", "/products?page=2"),
        Case("products-page3-by-price", "GET", "/products?page=3&sort=price"),
        Case("products-page2-head", "HEAD", "/products?page=2"),
        Case("product", "GET", "/products/7"),
        Case("relative-redirect", "GET", "/catalogue"),
        Case("append-slash-redirect", "GET", "/help"),
        Case("cart-post-redirect", "POST", "/cart", b"item=7", FORM),
        Case("cart", "GET", "/cart", headers=(("Cookie", "cart=7.3"),)),
        Case("about-vary-etag", "GET", "/about"),
        Case("about-fr", "GET", "/about", headers=(("Accept-Language", "fr"),)),
        Case("about-revalidated", "GET", "/about", revalidate=True),
        Case("static-css", "GET", "/static/shop.css"),
        Case("static-js", "GET", "/static/shop.js"),
        # The static view matches any path under it: append_slash redirects.
        Case("static-missing-append-slash", "GET", "/static/missing.css"),
        Case("notfound", "GET", "/nowhere"),
        Case("whoami-json", "GET", "/whoami.json"),
        Case("orders-closed-503", "GET", "/orders"),
    ],
    "library": [
        Case("root", "GET", "/"),
        Case("api-root", "GET", "/api"),
        Case("books", "GET", "/books/"),
        Case("books-noslash", "GET", "/books"),
        Case("book", "GET", "/books/2"),
        Case("book-revalidated", "GET", "/books/2", revalidate=True),
        Case("latest-redirect", "GET", "/books/latest"),
        Case("author-redirect", "GET", "/authors/ada"),
        Case("author", "GET", "/authors/ada/"),
        Case("reserve-post-redirect", "POST", "/books/3/reserve"),
        Case("notfound", "GET", "/books/9"),
    ],
}

HOSTS = [
    ("noport", "example.test"),
    ("port80", "example.test:80"),
    ("port443", "example.test:443"),
    ("port8080", "example.test:8080"),
    ("ipv6", "[2001:db8::1]"),
    ("ipv6-port8080", "[2001:db8::1]:8080"),
]
#: As from a TLS-terminating front on 127.0.0.1, which the apps trust.
HTTPS = (("X-Forwarded-Proto", "https"), ("X-Forwarded-For", "203.0.113.9"))
#: From 127.0.0.2, trusted by nobody: none of it may reach an app.
SPOOFED = (
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Port", "9"),
    ("X-Forwarded-Prefix", "/evil"),
    ("X-Forwarded-For", "1.2.3.4"),
    ("Forwarded", "for=1.2.3.4;host=evil.example;proto=https"),
    ("X-Real-IP", "1.2.3.4"),
)


@dataclass(frozen=True)
class Sent:
    """A case as sent: its Host, extra headers and client address."""

    case: Case
    host: str
    extra: tuple[tuple[str, str], ...] = ()
    source: str = "127.0.0.1"
    label: str = ""

    def headers(self):
        return (("Host", self.host), *self.case.headers, *self.extra)


def cells():
    for app, cases in CASES.items():
        for front in FRONTS:
            for scheme, extra in (("http", ()), ("https", HTTPS)):
                for label, host in HOSTS:
                    for case in cases:
                        sent = Sent(case, host, extra, label=f"{label} {scheme}")
                        yield pytest.param(
                            app,
                            sent,
                            front.values[0],
                            id=f"{app}-{case.name}-host-{label}-{scheme}-{front.id}",
                            marks=front.marks,
                        )
            for case in cases:
                sent = Sent(case, "example.test", SPOOFED, "127.0.0.2", "spoofed")
                yield pytest.param(
                    app,
                    sent,
                    front.values[0],
                    id=f"{app}-{case.name}-spoofed-{front.id}",
                    marks=front.marks,
                )


# -- what comes back -----------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What a client can see of a response, less what fronts may add."""

    status: int
    headers: tuple[tuple[str, tuple[str, ...]], ...]
    body: bytes

    @classmethod
    def of(cls, response: http.client.HTTPResponse, body: bytes) -> Answer:
        headers = tuple(
            (name, tuple(response.msg.get_all(name) or ())) for name in HEADERS
        )
        return cls(response.status, headers, body)

    @property
    def urls(self) -> list[str]:
        return [url.decode("latin-1") for url in ABSOLUTE_URL.findall(self.body)]

    def header(self, name: str) -> str | None:
        values = dict(self.headers)[name]
        return ", ".join(values) if values else None


def differences(front: str, direct: Answer, got: Answer) -> list[str]:
    """One line per thing that differs (a short diff for the body)."""
    lines = []
    if got.status != direct.status:
        lines.append(f"status {got.status} vs direct {direct.status}")
    for name, values in got.headers:
        if values != dict(direct.headers)[name]:
            lines.append(
                f"{name} {got.header(name)!r} vs direct {direct.header(name)!r}"
            )
    if got.urls != direct.urls:
        pairs = [(g, d) for g, d in zip(got.urls, direct.urls, strict=False) if g != d]
        if len(got.urls) != len(direct.urls):
            line = f"{len(got.urls)} URLs in the body vs direct {len(direct.urls)}"
        else:
            line = f"{len(pairs)} of {len(direct.urls)} URLs in the body differ"
        if pairs:
            line += f", first {pairs[0][0]} vs direct {pairs[0][1]}"
        lines.append(line)
    if got.body != direct.body:
        diff = difflib.unified_diff(
            direct.body.decode("utf-8", "replace").splitlines(),
            got.body.decode("utf-8", "replace").splitlines(),
            "direct",
            front,
            n=0,
            lineterm="",
        )
        lines.append("body differs:\n    " + "\n    ".join(list(diff)[:14]))
    return lines


class Client:
    """HTTP/1.1 with keep-alive: one connection per (address, client address)."""

    def __init__(self):
        self.connections: dict[tuple, http.client.HTTPConnection] = {}

    def send(self, address: tuple[str, int], sent: Sent, headers=()) -> Answer:
        try:
            return self._send(address, sent, headers)
        except (http.client.RemoteDisconnected, ConnectionError):
            # An idle keep-alive connection the server had closed: once more.
            self.connections.pop((address, sent.source)).close()
            return self._send(address, sent, headers)

    def _send(self, address, sent, headers) -> Answer:
        key = (address, sent.source)
        if key not in self.connections:
            self.connections[key] = http.client.HTTPConnection(
                *address, timeout=10, source_address=(sent.source, 0)
            )
        connection = self.connections[key]
        case = sent.case
        connection.putrequest(
            case.method, case.path, skip_host=True, skip_accept_encoding=True
        )
        for name, value in (*sent.headers(), *headers):
            connection.putheader(name, value)
        if case.body or case.method == "POST":
            connection.putheader("Content-Length", str(len(case.body)))
        connection.endheaders(case.body or None)
        response = connection.getresponse()
        return Answer.of(response, response.read())

    def close(self):
        for connection in self.connections.values():
            connection.close()
        self.connections.clear()


# -- the processes -------------------------------------------------------------


class Stack:
    """One app reached directly, through the dispatcher, nginx and HAProxy.

    ``start`` only starts processes, ``wait`` waits for them, so that every
    app's processes come up at the same time. A front that does not come up
    fails its own cells, not the others'.
    """

    def __init__(self, processes, tmp_path, app: str):
        self.app = app
        self.processes = processes
        self.dir = tmp_path / app
        self.dir.mkdir()
        options = dict(APPS[app], app=app)
        self.ready = options["ready"]
        # Ranges of their own for the dispatcher's instances and the exports'
        # (whose configurations name their ports).
        self.base_port = free_base_port(2)
        self.ini = self.write(f"{app}.ini", options, free_base_port(2))
        self.export_ini = self.write(f"{app}-export.ini", options, self.base_port)
        self.addresses: dict[str, tuple[str, int]] = {}
        self.broken: dict[str, str] = {}
        self.direct_answers: dict[Sent, Answer] = {}

    def write(self, name, options, base_port):
        path = self.dir / name
        path.write_text(INI.format(**options, base_port=base_port) + LOGGING_INI)
        return path

    def start(self):
        # pserve's sys.path starts with its bin directory, not the working
        # one; the instances run with -m from the repository need no help.
        env = {"PYTHONPATH": str(ROOT)}
        self.direct = self.processes.start(
            [BIN / "pserve", self.ini, "http_port=0"],
            name=f"{self.app}-direct",
            env=env,
        )
        self.dispatcher = self.processes.start(
            [BIN / "pyramid-lb", "serve", self.ini], name=f"{self.app}-dispatcher"
        )
        self.instances = self.processes.start(
            [BIN / "pyramid-lb", "serve", self.export_ini, "--no-dispatcher"],
            name=f"{self.app}-instances",
        )
        self.engines = {}
        for engine, binary in (("nginx", NGINX), ("haproxy", HAPROXY)):
            if binary is None:
                continue
            port = free_port()
            directory = self.dir / engine
            directory.mkdir()
            config = directory / ("nginx.conf" if engine == "nginx" else "haproxy.cfg")
            argv = ["export", engine, str(self.export_ini), "--listen"]
            if cli.main([*argv, f"127.0.0.1:{port}", "-o", str(config)]) != 0:
                self.broken[engine] = f"pyramid-lb export {engine} failed"
                continue
            if engine == "nginx":
                argv = [binary, "-p", directory, "-c", config, "-e", "stderr"]
                argv += ["-g", "daemon off;"]
            else:
                argv = [binary, "-db", "-f", config]
            self.engines[engine] = self.processes.start(
                argv, name=f"{self.app}-{engine}"
            )
            self.addresses[engine] = ("127.0.0.1", port)

    def wait(self):
        self.addresses["direct"] = ("127.0.0.1", self.direct.port(30))
        try:
            port = int(self.dispatcher.wait_for_output(SERVING, 30).group(1))
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: self.dispatcher_up(url), 30)
            self.addresses["dispatcher"] = ("127.0.0.1", port)
        except AssertionError as exc:
            self.broken["dispatcher"] = self.tail(exc, self.dispatcher)
        for port in (self.base_port, self.base_port + 1):
            url = f"http://127.0.0.1:{port}{self.ready}"
            try:
                wait_until(lambda u=url: answers(u), 30)
            except AssertionError as exc:
                for engine in self.engines:
                    self.broken[engine] = self.tail(exc, self.instances)
        for engine, process in self.engines.items():
            if engine in self.broken:
                continue
            host, port = self.addresses[engine]
            url = f"http://{host}:{port}{self.ready}"
            try:
                # Several in a row: every instance is in rotation.
                wait_until(lambda u=url: all(answers(u) for _ in range(4)), 15)
            except AssertionError as exc:
                self.broken[engine] = self.tail(exc, process)

    @staticmethod
    def dispatcher_up(url):
        try:
            stats = requests.get(url + "/_lb/stats.json", timeout=2).json()
        except (requests.RequestException, ValueError):
            return False
        instances = stats["instances"]
        return len(instances) == 2 and all(i["state"] == "up" for i in instances)

    @staticmethod
    def tail(exc, process):
        return f"{exc}\n--- {process.log_path} ---\n{process.output()[-3000:]}"


@pytest.fixture(scope="module")
def stacks(module_processes, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("realapps")
    stacks = {app: Stack(module_processes, tmp_path, app) for app in APPS}
    for stack in stacks.values():
        stack.start()
    for stack in stacks.values():
        stack.wait()
    return stacks


@pytest.fixture(scope="module")
def client():
    client = Client()
    try:
        yield client
    finally:
        client.close()


def direct_answer(stack: Stack, client: Client, sent: Sent) -> Answer:
    """The app's answer to ``sent`` reached directly (the same for each front)."""
    if sent not in stack.direct_answers:
        stack.direct_answers[sent] = client.send(
            stack.addresses["direct"], sent, revalidation(stack, client, sent)
        )
    return stack.direct_answers[sent]


def revalidation(stack: Stack, client: Client, sent: Sent):
    """If-None-Match with the ETag of the same request, directly."""
    if not sent.case.revalidate:
        return ()
    fresh = replace(sent, case=replace(sent.case, revalidate=False))
    etag = direct_answer(stack, client, fresh).header("ETag")
    assert etag, f"{fresh.case.path} has no ETag to revalidate"
    return (("If-None-Match", etag),)


def test_the_direct_answers_are_what_the_apps_mean(stacks, client):
    """The reference itself is right: the apps honour the Host, the trusted
    https front and nothing from an untrusted client."""
    shop, library = stacks["shop"], stacks["library"]
    whoami = Case("whoami", "GET", "/whoami.json")
    seen = {
        label: client.send(shop.addresses["direct"], sent)
        for label, sent in (
            ("http", Sent(whoami, "example.test:8080")),
            ("https", Sent(whoami, "[2001:db8::1]", HTTPS)),
            ("spoofed", Sent(whoami, "example.test", SPOOFED, "127.0.0.2")),
        )
    }
    assert b'"host_url": "http://example.test:8080"' in seen["http"].body
    assert b'"client_addr": "203.0.113.9"' in seen["https"].body
    assert b'"host_url": "https://[2001:db8::1]"' in seen["https"].body
    assert b'"client_addr": "127.0.0.2"' in seen["spoofed"].body
    assert b'"host_url": "http://example.test"' in seen["spoofed"].body

    home = Case("home", "GET", "/")
    redirect = client.send(
        shop.addresses["direct"], Sent(home, "example.test:443", HTTPS)
    )
    assert redirect.status == 302
    assert redirect.header("Location") == "https://example.test/products"

    api = Case("api", "GET", "/api")
    spoofed = client.send(
        library.addresses["direct"], Sent(api, "example.test", SPOOFED, "127.0.0.2")
    )
    assert b'"application_url": "http://example.test"' in spoofed.body
    assert b'"client_addr": "127.0.0.2"' in spoofed.body
    secure = client.send(library.addresses["direct"], Sent(api, "example.test", HTTPS))
    assert b'"application_url": "https://example.test"' in secure.body
    assert b'"client_addr": "203.0.113.9"' in secure.body


@pytest.mark.parametrize(("app", "sent", "front"), list(cells()))
def test_the_app_cannot_tell_the_front_is_there(stacks, client, app, sent, front):
    stack = stacks[app]
    if front in stack.broken:
        pytest.fail(f"{front} in front of {app} did not start: {stack.broken[front]}")
    direct = direct_answer(stack, client, sent)
    got = client.send(stack.addresses[front], sent, revalidation(stack, client, sent))
    diff = differences(front, direct, got)
    if diff:
        case = sent.case
        request = f"{case.method} {case.path}, Host: {sent.host} ({sent.label})"
        pytest.fail(
            f"{app}: {request} through {front}:\n  " + "\n  ".join(diff),
            pytrace=False,
        )


@pytest.mark.parametrize("front", FRONTS)
def test_an_apps_own_503_reaches_its_clients_and_no_other(stacks, client, front):
    """A view answering 503 with Retry-After: its clients get just that, and
    the instances stay in rotation for every other path."""
    stack = stacks["shop"]
    if front in stack.broken:
        pytest.fail(f"{front} in front of shop did not start: {stack.broken[front]}")
    closed = Sent(Case("orders", "GET", "/orders"), "example.test")
    open_ = Sent(Case("products", "GET", "/products"), "example.test")
    for _ in range(3):
        # In a row, so that every instance answers several (round robin).
        for _ in range(8):
            answer = client.send(stack.addresses[front], closed)
            assert (answer.status, answer.header("Retry-After")) == (503, "120")
            assert b"stocktake" in answer.body
        for _ in range(4):
            assert client.send(stack.addresses[front], open_).status == 200
