"""pyramid_lb.request_head: heads parsed as waitress parses them.

Each head goes through StrictRequestParser (the fast path for plain heads,
the canonical head for the others) and through the parser as it was (the
framing checks, then waitress's parse_header on the head as it came); what
the two leave behind must be the same, on a table of heads, on random
ones, and through real servers on raw sockets.
"""

import hashlib
import inspect
import json
import random
import re
import socket
import threading
import time

import pytest
from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.parser import HTTPRequestParser, ParsingError, get_header_lines
from waitress.rfc7230 import HEADER_FIELD_RE

from pyramid_lb import request_head
from pyramid_lb import server as front

ADJ = Adjustments(max_request_header_size=2000, max_request_body_size=100)


class Reference(front.StrictRequestParser):
    """The parser as it was: every head through the framing checks, made
    with waitress's HEADER_FIELD_RE, then waitress's parse_header."""

    def parse_header(self, header_plus):
        fields = []
        for line in get_header_lines(header_plus.partition(b"\r\n")[2]):
            match = HEADER_FIELD_RE.match(line)
            if match:
                fields.append((match["name"].lower(), match["value"].strip(b" \t")))
        version = front._version(header_plus.partition(b"\r\n")[0])
        problem = front.framing_problem(header_plus, fields, version)
        if problem:
            if version == "1.1":
                self.version = version
            raise ParsingError(problem)
        HTTPRequestParser.parse_header(self, header_plus)


def state(parser) -> dict:
    """Everything a parser holds once it has received what it could."""
    seen = {k: v for k, v in vars(parser).items() if k not in ("adj", "body_rcv")}
    seen["headers"] = list(parser.headers.items())  # in order
    if parser.error is not None:
        seen["error"] = (type(parser.error).__name__, parser.error.body)
    body = parser.body_rcv
    if body is not None:
        error = body.error and (type(body.error).__name__, body.error.body)
        seen["body_rcv"] = (type(body).__name__, body.completed, error)
        seen["body"] = parser.get_body_stream().read()
    return seen


def run(parser_class, data: bytes) -> list:
    """Feed ``data`` as waitress's channel does (HTTPChannel.received): a new
    parser for each request, each given what the one before left."""
    states = []
    request = None
    while data:
        if request is None:
            request = parser_class(ADJ)
        try:
            consumed = request.received(data)
        except Exception as exc:  # what waitress would let through
            states.append(("raised", type(exc).__name__, str(exc)))
            return states
        states.append(consumed)
        if request.completed:
            states.append(state(request))
            request = None
        if consumed >= len(data):
            break
        data = data[consumed:]
    if request is not None:
        states.append(("unfinished", state(request)))
    return states


def is_plain(data: bytes) -> bool:
    """Whether the fast path takes the first head in ``data``."""
    end = data.find(b"\r\n\r\n")
    try:
        return request_head.parse_plain_head(
            HTTPRequestParser(ADJ), data[: end + 4].lstrip()
        )
    except (ParsingError, ValueError):  # decided there: a bad Content-Length
        return True


WRK = b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1:6543\r\nUser-Agent: wrk\r\n\r\n"
BROWSER = (
    b"GET /shop/items?page=2&sort=price HTTP/1.1\r\n"
    b"Host: shop.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Firefox/128.0\r\n"
    b"Accept: text/html,application/xhtml+xml,*/*;q=0.8\r\n"
    b"Accept-Language: en-GB,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Referer: https://shop.example.com/shop/items?page=1\r\n"
    b"Cookie: session=abcdef0123456789; _lb=i1.abcdefgh; theme=dark\r\n"
    b"Connection: keep-alive\r\n"
    b"Upgrade-Insecure-Requests: 1\r\n"
    b"Sec-Fetch-Dest: document\r\n\r\n"
)
NEXT = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"


def get(line: bytes = b"GET /p HTTP/1.1", *fields: bytes, body: bytes = b""):
    return line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body


HEADS = [
    # -- plain: the fast path's
    pytest.param(WRK, True, id="wrk"),
    pytest.param(BROWSER, True, id="browser"),
    pytest.param(WRK + BROWSER + NEXT, True, id="pipelined"),
    pytest.param(get(b"GET / HTTP/1.1", b"Host: x"), True, id="root"),
    pytest.param(get(b"GET /p HTTP/1.0", b"Host: x"), True, id="1.0 closes"),
    pytest.param(
        get(b"GET /p HTTP/1.0", b"Connection: Keep-Alive"), True, id="1.0 kept"
    ),
    pytest.param(get(b"GET /p HTTP/1.1", b"Connection: CLOSE"), True, id="1.1 close"),
    pytest.param(
        get(b"GET /p HTTP/1.1", b"Connection: close, te"), True, id="close, te"
    ),
    pytest.param(get(b"GET /p HTTP/1.1"), True, id="no host"),
    pytest.param(get(b"GET /p HTTP/1.1", b"Host: a", b"host: b"), True, id="two hosts"),
    pytest.param(get(b"GET /p HTTP/1.1", b"Host: [::1]:80"), True, id="ipv6 host"),
    pytest.param(get(b"FOO /p HTTP/1.1"), True, id="unknown upper-case method"),
    pytest.param(get(b"GET /a%20b%2Fc%zz%C3%A9 HTTP/1.1"), True, id="escapes"),
    pytest.param(get(b"GET /a?b?c=%20&d HTTP/1.1"), True, id="query with ?"),
    pytest.param(get(b"GET /a? HTTP/1.1"), True, id="empty query"),
    pytest.param(get(b"GET /a:b//c/../d;e HTTP/1.1"), True, id="colon, dots"),
    pytest.param(get(b"GET /x://y HTTP/1.1"), True, id="a scheme-like path"),
    pytest.param(get(b"GET / HTTP/1.1", b"A: 1", b"a: 2", b"A: 3"), True, id="joined"),
    pytest.param(
        get(b"GET / HTTP/1.1", b"X_Forwarded_For: 6.6.6.6"), True, id="_ dropped"
    ),
    pytest.param(
        get(b"GET / HTTP/1.1", b"Transfer_Encoding: chunked"), True, id="_ te dropped"
    ),
    pytest.param(
        get(b"GET / HTTP/1.1", b"X:", b"Y:  \t ", b"Z: \t a \t b\t "), True, id="ows"
    ),
    pytest.param(get(b"GET / HTTP/1.1", b"X: caf\xe9 \xff"), True, id="obs-text"),
    pytest.param(get(b"GET / HTTP/1.1", b"!#$%&'*+-.^`|~09azAZ: v"), True, id="tchars"),
    pytest.param(
        get(b"GET / HTTP/1.1", b"Content-Type: text/x"), True, id="content-type"
    ),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Content-Length: 5", body=b"hello" + NEXT),
        True,
        id="body then pipelined",
    ),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Content-Length: 0") + NEXT, True, id="cl 0"
    ),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Content-Length: 007", body=b"1234567"),
        True,
        id="cl 007",
    ),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Content-Length: 10", body=b"half"),
        True,
        id="body unfinished",
    ),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Content-Length: 100"), True, id="cl at limit"
    ),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Content-Length: 99", body=b"x" * 99),
        True,
        id="cl under limit",
    ),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Content-Length: 5", b"Expect: 100-Continue"),
        True,
        id="expect",
    ),
    pytest.param(
        get(b"POST /u HTTP/1.0", b"Expect: 100-continue"), True, id="expect in 1.0"
    ),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Content-Length: abc"), True, id="cl letters"
    ),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Content-Length: -1"), True, id="cl negative"
    ),
    pytest.param(get(b"POST /u HTTP/1.1", b"Content-Length: +5"), True, id="cl plus"),
    pytest.param(get(b"POST /u HTTP/1.1", b"Content-Length:"), True, id="cl empty"),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Content-Length: 5", b"Content-Length: 5"),
        True,
        id="cl twice",
    ),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Content-Length: \xb2"), True, id="cl superscript"
    ),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Content-Length: " + b"9" * 5000), True, id="cl huge"
    ),
    pytest.param(b"\r\n" + WRK, True, id="a leading crlf"),
    pytest.param(b"\r\n\r\n" + WRK, False, id="an empty request first"),
    pytest.param(b"\r\n \t\r\n" + WRK, True, id="whitespace lines first"),
    # -- not plain: the old way, whatever it decides
    pytest.param(get(b"get /p HTTP/1.1"), False, id="lower-case method"),
    pytest.param(get(b"M-SEARCH * HTTP/1.1"), False, id="asterisk"),
    pytest.param(get(b"OPTIONS * HTTP/1.1"), False, id="options asterisk"),
    pytest.param(get(b"CONNECT h:443 HTTP/1.1"), False, id="authority form"),
    pytest.param(
        get(b"GET http://h:8080/p?q HTTP/1.1", b"Host: o"), False, id="absolute"
    ),
    pytest.param(get(b"GET HTTP://H/p HTTP/1.1"), False, id="absolute upper"),
    pytest.param(get(b"GET //double/x?y#z HTTP/1.1"), False, id="double slash"),
    pytest.param(get(b"GET /a#frag HTTP/1.1"), False, id="fragment"),
    pytest.param(get(b"GET /caf\xe9 HTTP/1.1"), False, id="non-ascii target"),
    pytest.param(get(b"GET /a\tb HTTP/1.1"), False, id="tab in target"),
    pytest.param(get(b"GET /a\x00b HTTP/1.1"), False, id="nul in target"),
    pytest.param(get(b"GET /p HTTP/1.2"), False, id="http/1.2"),
    pytest.param(get(b"GET /p HTTP/2.0"), False, id="http/2.0"),
    pytest.param(get(b"GET /p"), False, id="no version"),
    pytest.param(get(b"GET /p HTTP/1.1 "), False, id="trailing space"),
    pytest.param(get(b"GET /p HTTP/1.1\t"), False, id="trailing tab"),
    pytest.param(get(b"GET  /p HTTP/1.1"), False, id="two spaces"),
    pytest.param(get(b"GET /p  HTTP/1.1"), False, id="two spaces before version"),
    pytest.param(get(b"GET /p http/1.1"), False, id="lower-case version"),
    pytest.param(get(b"GET /p\rHTTP/1.1"), False, id="bare cr in request line"),
    pytest.param(b"GET /p HTTP/1.1\nHost: x\r\n\r\n", False, id="bare lf after line"),
    pytest.param(
        get(b"GET /p HTTP/1.1", b"A: 1\nB: 2"), False, id="bare lf in a field"
    ),
    pytest.param(get(b"GET /p HTTP/1.1", b"A: 1\rB"), False, id="bare cr in a field"),
    pytest.param(get(b"GET /p HTTP/1.1", b"A: 1", b" folded"), False, id="folded"),
    pytest.param(get(b"GET /p HTTP/1.1", b"\tfolded", b"A: 1"), False, id="fold first"),
    pytest.param(get(b"GET /p HTTP/1.1", b"A : 1"), False, id="space before colon"),
    pytest.param(get(b"GET /p HTTP/1.1", b": 1"), False, id="no name"),
    pytest.param(get(b"GET /p HTTP/1.1", b"A"), False, id="no colon"),
    pytest.param(get(b"GET /p HTTP/1.1", b"A(b): 1"), False, id="not a token"),
    pytest.param(get(b"GET /p HTTP/1.1", b"A: 1\x01"), False, id="control char"),
    pytest.param(get(b"GET /p HTTP/1.1", b"A: 1\x7f"), False, id="del"),
    pytest.param(get(b"GET /p HTTP/1.1", b"A: 1\x0b2"), False, id="vertical tab"),
    pytest.param(get(b"GET /p HTTP/1.1", b"A\xe9: 1"), False, id="obs-text name"),
    pytest.param(
        get(
            b"POST /u HTTP/1.1",
            b"Transfer-Encoding: chunked",
            body=b"3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\n" + NEXT,
        ),
        False,
        id="chunked, trailer, pipelined",
    ),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"transfer-encoding: Chunked", body=b"0\r\n\r\n"),
        False,
        id="chunked lower-case",
    ),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Transfer-Encoding: chunked", body=b"zz\r\n"),
        False,
        id="bad chunk size",
    ),
    pytest.param(
        get(
            b"POST /u HTTP/1.1",
            b"Transfer-Encoding: chunked",
            body=b"65\r\n" + b"x" * 101,
        ),
        False,
        id="chunked over the limit",
    ),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Transfer-Encoding: gzip, chunked"), False, id="gzip"
    ),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Transfer-Encoding: chunked, "), False, id="te ,"
    ),
    pytest.param(get(b"POST /u HTTP/1.1", b"Transfer-Encoding:"), False, id="te empty"),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Transfer-Encoding: chunked", b"Content-Length: 3"),
        False,
        id="te and cl",
    ),
    pytest.param(
        get(b"POST /u HTTP/1.0", b"Transfer-Encoding: chunked"), False, id="te in 1.0"
    ),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Content-Length: 101"), True, id="cl over limit"
    ),
    pytest.param(
        get(b"GET /p HTTP/1.1", b"X: " + b"x" * 2000), True, id="head too large"
    ),
    pytest.param(b"GET /p HTTP/1.1\r\nX: " + b"x" * 2000, False, id="head never ends"),
]


@pytest.mark.parametrize(("data", "plain"), HEADS)
def test_each_head_leaves_the_parser_as_the_old_way_does(data, plain):
    assert is_plain(data) is plain
    assert run(front.StrictRequestParser, data) == run(Reference, data)


# -- random heads -------------------------------------------------------------------

# The first of each is plain, and chosen most often.
METHODS = [b"GET", b"POST", b"HEAD", b"get", b"M-SEARCH", b"PUT"]
TARGETS = [b"/a/b", b"/", b"/a?b=c", b"/%41%zz", b"//x", b"*", b"http://h/p", b"/a#b"]
VERSIONS = [b" HTTP/1.1", b" HTTP/1.0", b" HTTP/1.2", b"", b" HTTP/1.1 "]
FIELDS = [
    b"Host: x",
    b"Host: a, b",
    b"Content-Length: 3",
    b"Content-Length: 0",
    b"Content-Length: 300",
    b"Transfer-Encoding: chunked",
    b"Connection: close",
    b"Connection: keep-alive",
    b"Expect: 100-continue",
    b"X_Y: z",
    b"X-Empty:",
    b"Cookie: a=1; b=2",
    b"Accept: */*",
    b"X: \t v \t",
]
NOISE = [b"\r", b"\n", b" ", b"\t", b":", b"_", b"-", b"#", b"%", b"?", b"/", b"\r\n"]
NOISE += [b"\x00", b"\x7f", b"\x80", b"\xe9", b"\xff", b"a", b"A", b"0", b"\r\n "]


def pick(rng: random.Random, choices: list[bytes]) -> bytes:
    return choices[0] if rng.random() < 0.6 else rng.choice(choices)


def random_head(rng: random.Random) -> bytes:
    line = pick(rng, METHODS) + b" " + pick(rng, TARGETS) + pick(rng, VERSIONS)
    data = get(line, *rng.choices(FIELDS, k=rng.randrange(6)))
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 3])):
        at = rng.randrange(len(data) - 2)  # the end stays an end
        if rng.random() < 0.7:
            data = data[:at] + rng.choice(NOISE) + data[at:]
        else:
            data = data[:at] + data[at + 1 :]
    return data + rng.choice([b"", b"abc", b"3\r\nabc\r\n0\r\n\r\n", NEXT])


def test_random_heads_leave_the_parser_as_the_old_way_does():
    rng = random.Random(14)
    plain = 0
    for _ in range(5000):
        data = random_head(rng)
        assert run(front.StrictRequestParser, data) == run(Reference, data), data
        plain += is_plain(data.lstrip())
    assert 1000 < plain < 4000, plain  # both ways tried, often


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            get(b"GET /p HTTP/1.1", b"X:" + b" " * 100_000 + b"\x01"), id="ows"
        ),
        pytest.param(
            get(b"GET /p HTTP/1.1", b"X: " + b"a " * 50_000 + b"\x01"), id="words"
        ),
        pytest.param(get(b"GET /p HTTP/1.1", *[b"X: y"] * 20_000, b"\x01"), id="lines"),
        pytest.param(get(b"GET /" + b"a" * 100_000 + b"#"), id="target"),
    ],
)
def test_no_head_takes_long(data):
    """Nothing in the patterns backtracks: large heads fail in linear time."""
    started = time.perf_counter()
    assert not request_head.parse_plain_head(HTTPRequestParser(ADJ), data)
    assert time.perf_counter() - started < 0.05


SPACES = b" " * 200_000  # waitress's HEADER_FIELD_RE: minutes on these lines


@pytest.mark.parametrize(
    ("line", "header", "outcome"),
    [
        pytest.param(b"GET / HTTP/1.1", b"X:" + SPACES + b"a", "a", id="plain"),
        pytest.param(b"GET http://h/ HTTP/1.1", b"X:" + SPACES + b"a", "a", id="abs"),
        pytest.param(b"GET / HTTP/1.1", b"X: a" + SPACES + b"b", "a b", id="inside"),
        pytest.param(b"GET / HTTP/1.1", b"X:" + SPACES + b"\x01", "400", id="bad"),
        pytest.param(
            b"GET http://h/ HTTP/1.1", b"X:" + SPACES + b"\x01", "400", id="abs bad"
        ),
        pytest.param(
            b"POST / HTTP/1.1",
            b"Transfer-Encoding:" + SPACES + b"chunked",
            "0",
            id="te",
        ),
    ],
)
def test_whitespace_around_a_value_costs_linear_time(line, header, outcome):
    """Waitress's own regex backtracks on whitespace after the colon (a
    200 KB line: minutes with the GIL held); the parser reads the same."""
    parser = front.StrictRequestParser(Adjustments())
    started = time.perf_counter()
    data = get(line, b"Host: h", header, body=b"0\r\n\r\n")
    data = data[parser.received(data) :]
    if not parser.completed:
        parser.received(data)  # the chunked body
    assert time.perf_counter() - started < 0.2
    assert parser.completed
    if parser.error is not None:
        assert (str(parser.error.code), parser.error.body) == (
            outcome,
            "Invalid header",
        )
    elif parser.chunked:
        assert parser.headers["CONTENT_LENGTH"] == outcome
    else:
        assert parser.headers["X"].replace(SPACES.decode(), " ") == outcome


@pytest.mark.parametrize("seed", range(4))
def test_the_linear_field_pattern_matches_as_waitresss(seed):
    rng = random.Random(seed)
    alphabet = b'aZ09-_!~:: \t\t\x00\x7f\x80\xff"(,'
    for _ in range(5000):
        line = bytes(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        ours = request_head.FIELD_LINE_RE.fullmatch(line)
        theirs = HEADER_FIELD_RE.match(line)
        assert (ours and ours.group("name", "value")) == (
            theirs and theirs.group("name", "value")
        ), line


def test_a_canonical_head_is_what_waitress_reads():
    head = (
        b"GET http://h/ HTTP/1.1\r\nA:  1 \t\r\nB:\r\nA_b: x \r\nC : 2\r\nD: 3\r\n\r\n"
    )
    assert request_head.canonical_head(head) == (
        b"GET http://h/ HTTP/1.1\r\nA:1\r\nB:\r\nA_b:x\r\n:\r\n\r\n"
    )
    fast = b"GET http://h/ HTTP/1.1\r\nA: 1 \t \r\nC : 2\r\n\r\n"
    assert request_head.canonical_head(fast) is fast


def test_the_waitress_code_this_module_mirrors_is_the_one_it_was_written_for():
    """parse_plain_head does what HTTPRequestParser.parse_header does, for
    the plain heads, and canonical_head relies on how it reads the others:
    if waitress changes it, check the module again (the tests above compare
    the two, on the heads they know)."""
    source = inspect.getsource(HTTPRequestParser.parse_header)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert digest == "c2c093b901782da6", digest


# -- through real servers ------------------------------------------------------------


def echo(environ, start_response):
    """The request as the app sees it, as JSON."""
    body = environ["wsgi.input"].read()
    seen = {k: v for k, v in environ.items() if k.isupper() and isinstance(v, str)}
    for differs in ("REMOTE_PORT", "SERVER_PORT"):
        del seen[differs]
    seen["body"] = body.decode("latin-1")
    answer = json.dumps(seen, sort_keys=True).encode()
    start_response("200 OK", [("Content-Length", str(len(answer)))])
    return [answer]


class ReferenceChannel(front.StrictChannel):
    parser_class = Reference


@pytest.fixture(scope="module")
def servers():
    """Two servers for ``echo`` with the same settings: one with the parser
    as it is, one with the parser as it was."""
    options = {
        "listen": "127.0.0.1:0",
        "max_request_header_size": 2000,
        "max_request_body_size": 100,
        "threads": 2,
    }
    fast = front.create_server(echo, dict(options))
    old = front.create_server(echo, dict(options))
    old.channel_class = ReferenceChannel
    stop = threading.Event()

    def loop(server):
        socket_map = front._map(server)
        while not stop.is_set():
            wasyncore.loop(timeout=0.01, map=socket_map, use_poll=True, count=1)

    threads = [
        threading.Thread(target=loop, args=(s,), daemon=True) for s in (fast, old)
    ]
    for thread in threads:
        thread.start()
    yield fast.effective_port, old.effective_port
    stop.set()
    for thread in threads:
        thread.join(2)
    for server in (fast, old):
        front.finish(server, 1)


LAST = b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def exchange(port: int, data: bytes) -> bytes:
    """What comes back for ``data`` then a last request, until the server
    closes the connection (after the last, or after an error)."""
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        # At once: a server that refuses closes the connection with nothing
        # unread, and the answer is not lost to a reset.
        sock.sendall(data + LAST)
        received = b""
        while True:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            received += piece
    return re.sub(rb"\r\nDate: [^\r]*", b"", received)


WIRE = [
    pytest.param(WRK + BROWSER + NEXT, id="pipelined plain heads"),
    pytest.param(
        get(b"POST /u?q=1 HTTP/1.1", b"Content-Length: 5", body=b"hello")
        + get(
            b"POST /c HTTP/1.1",
            b"Transfer-Encoding: chunked",
            body=b"2\r\nab\r\n0\r\n\r\n",
        )
        + NEXT,
        id="a body, a chunked body, then a plain head",
    ),
    pytest.param(b"\r\n" + WRK + b"\r\n" + NEXT, id="crlf between requests"),
    pytest.param(
        get(b"GET /a%2Fb?x=%2F HTTP/1.1", b"X_Y: dropped", b"A: 1", b"a: 2"),
        id="escapes, joined",
    ),
    pytest.param(get(b"GET /p HTTP/1.0", b"Host: x") + NEXT, id="1.0 closes"),
    pytest.param(get(b"GET /p HTTP/1.1", b"Connection: close") + NEXT, id="close"),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Content-Length: 101") + b"x" * 101, id="413"
    ),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Content-Length: x5") + NEXT, id="bad length"
    ),
    pytest.param(get(b"GET /p HTTP/1.1", b"X: " + b"x" * 2000) + NEXT, id="431"),
    pytest.param(get(b"GET /p HTTP/1.1", b"A : 1") + NEXT, id="invalid field"),
    pytest.param(get(b"GET /p HTTP/1.1", b"A: 1", b" 2") + NEXT, id="folded"),
    pytest.param(b"GET /p HTTP/1.1\r\nA: 1\n\r\n" + NEXT, id="bare lf"),
    pytest.param(get(b"get /p HTTP/1.1") + NEXT, id="lower-case method"),
    pytest.param(
        get(b"POST /u HTTP/1.1", b"Transfer-Encoding: chunked", b"Content-Length: 3")
        + NEXT,
        id="te and cl",
    ),
    pytest.param(
        get(b"GET http://h:1/p HTTP/1.1", b"Host: o", b"A:  1 \t", b"A: 2") + NEXT,
        id="absolute",
    ),
    pytest.param(
        get(b"GET http://h:1/p HTTP/1.0", b"Connection: keep-alive", b"B :x") + NEXT,
        id="absolute, refused, kept alive",
    ),
]


@pytest.mark.parametrize("data", WIRE)
def test_the_wire_answers_are_the_old_ones(servers, data):
    fast, old = servers
    answer = exchange(fast, data)
    assert answer == exchange(old, data)
    assert answer.startswith(b"HTTP/1.")


def test_the_echo_shows_what_the_fast_path_parsed(servers):
    fast, _ = servers
    data = get(
        b"POST /a%20b?x=1 HTTP/1.1",
        b"Host: h",
        b"A: 1",
        b"a: 2",
        b"X_Y: z",
        b"Content-Length: 2",
        body=b"hi",
    )
    assert is_plain(data)
    head, _, rest = exchange(fast, data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head)[1])
    seen = json.loads(rest[:length])
    assert seen["PATH_INFO"] == "/a b"
    assert seen["QUERY_STRING"] == "x=1"
    assert seen["REQUEST_URI"] == "/a%20b?x=1"
    assert seen["HTTP_A"] == "1, 2"
    assert "HTTP_X_Y" not in seen
    assert (seen["CONTENT_LENGTH"], seen["body"]) == ("2", "hi")
