"""The common request head, parsed as waitress parses it, in under half the time.

:func:`parse_plain_head` fills a waitress request parser from a head that
needs none of waitress's special cases: an origin-form target without
``#`` or a leading ``//``, HTTP/1.0 or 1.1, header lines that waitress's own
``HEADER_FIELD_RE`` accepts, and no Transfer-Encoding. Any other head
(absolute form, a folded or invalid line, a bare CR or LF, a body framed by
Transfer-Encoding, non-ASCII in the target...) is left to waitress's code
and :class:`pyramid_lb.server.StrictRequestParser`'s checks, untouched:
this module only decides faster what they would decide for the plain
ones, so no refusal can move.

For those others, :func:`canonical_head` hands waitress the same head
without the whitespace around header values, which its HEADER_FIELD_RE
otherwise backtracks on for a time quadratic in its length (a 32 KB line
took 8 s, the GIL held: every connection waited).

``tests/test_request_head.py`` compares the parser with the one before
these, on a table of heads, on random ones and on raw sockets.
"""

from __future__ import annotations

import re

from waitress.buffers import OverflowableBuffer
from waitress.parser import ParsingError, unquote_bytes_to_wsgi
from waitress.receiver import FixedStreamReceiver
from waitress.rfc7230 import ONLY_DIGIT_RE

# RFC 9110 tchar, and field-vchar (VCHAR / obs-text), as waitress.rfc7230
# has them; matched on bytes, or on heads decoded as latin-1 (a character
# a byte).
_TCHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_VCHAR = r"[\x21-\x7e\x80-\xff]"
# A header line as waitress's HEADER_FIELD_RE takes it: a name, a colon, and
# a value with optional whitespace around it (no whitespace inside the
# value at either end). Possessive throughout: linear time on any input.
_VALUE = rf"(?:{_VCHAR}++(?:[ \t]++{_VCHAR}++)*+)?+"
#: The lines after the request line, each one of those, then the empty
#: line: no bare CR or LF, no folding, no line waitress would refuse.
FIELDS_RE = re.compile(rf"(?:{_TCHAR}++:[ \t]*+{_VALUE}[ \t]*+\r\n)*+\r\n")
#: waitress's HEADER_FIELD_RE, for fullmatch(): the same lines, the same
#: groups, in linear time. Waitress's backtracks on whitespace after the
#: colon: ``X:``, 32 KB of spaces and a letter hold the GIL for 4 s, a
#: 256 KB head for minutes.
FIELD_LINE_RE = re.compile(
    rf"(?P<name>{_TCHAR}++):[ \t]*+(?P<value>{_VALUE})[ \t]*+".encode("latin-1")
)
#: What makes HEADER_FIELD_RE slow: two or more SP/HT after a colon (its
#: lazy whitespace before the value, tried against the one after).
SLOW_RE = re.compile(rb":[ \t]{2}")
#: Origin form, HTTP/1.0 or 1.1, a method waitress takes (upper case), no
#: fragment, no trailing space; a target of printable ASCII, which is what
#: urlsplit leaves as it is.
REQUEST_LINE_RE = re.compile(
    r"([A-Z]++) (/(?!/)[\x21\x22\x24-\x7e]*+) HTTP/(1\.[01])\r\n"
)


def parse_plain_head(parser, header_plus: bytes) -> bool:
    """Fill ``parser`` (a waitress ``HTTPRequestParser``) from ``header_plus``
    as its ``parse_header`` would; or, for a head that is not plain, leave
    it untouched and return False. Raises what ``parse_header`` raises for
    a plain head (ParsingError: an invalid Content-Length)."""
    text = header_plus.decode("latin-1")
    line = REQUEST_LINE_RE.match(text)
    if line is None or "transfer-encoding" in text.lower():
        return False  # for a body framed so, StrictRequestParser's rules
    end = line.end()
    if FIELDS_RE.fullmatch(text, end) is None:
        return False
    headers: dict[str, str] = {}
    # Valid lines: the name is what comes before the first colon, the value
    # what strip() leaves of the rest.
    fields = text[end:-4].split("\r\n") if len(text) - end > 2 else ()
    for field in fields:
        name, _, value = field.partition(":")
        if "_" in name:
            continue  # waitress drops these names
        key = name.upper().replace("-", "_")
        value = value.strip(" \t")
        if key in headers:
            headers[key] += ", " + value
        else:
            headers[key] = value
    command, uri, version = line.groups()
    # In waitress's order, so that an error leaves the same attributes set.
    parser.first_line = header_plus[: end - 2]
    parser.headers = headers
    parser.request_uri = uri
    parser.command = command
    parser.version = version
    path, _, query = uri.partition("?")
    parser.proxy_scheme = parser.proxy_netloc = parser.fragment = ""
    parser.path = unquote_bytes_to_wsgi(path) if "%" in path else path
    parser.query = query
    parser.url_scheme = parser.adj.url_scheme
    connection = headers.get("CONNECTION", "")
    if version == "1.0":
        if connection.lower() != "keep-alive":
            parser.connection_close = True
    else:
        expect = headers.get("EXPECT", "").lower()
        parser.expect_continue = expect == "100-continue"
        if connection.lower() == "close":
            parser.connection_close = True
    length = headers.get("CONTENT_LENGTH", "0")
    if not ONLY_DIGIT_RE.match(length.encode("latin-1")):
        raise ParsingError("Content-Length is invalid")
    length = int(length)
    parser.content_length = length
    if length > 0:
        buf = OverflowableBuffer(parser.adj.inbuf_overflow)
        parser.body_rcv = FixedStreamReceiver(length, buf)
    return True


def canonical_head(header_plus: bytes) -> bytes:
    """``header_plus`` as waitress's ``parse_header`` reads it: each header
    line as ``name:value``, without the whitespace around the value, up to
    the first line it refuses, which becomes ``:`` (refused as fast, with
    the same error); the request line as it is.

    For a head without folded lines or a bare CR or LF in its header lines
    (StrictRequestParser has refused those by then), waitress parses this
    one to the same result as the original, but in linear time. A head
    waitress reads in linear time already is returned as it is.
    """
    if SLOW_RE.search(header_plus) is None:
        return header_plus  # nothing for waitress's regex to backtrack on
    first, _, rest = header_plus.partition(b"\r\n")
    lines = [first]
    for line in rest.split(b"\r\n"):
        if not line:
            continue  # waitress skips empty lines
        field = FIELD_LINE_RE.fullmatch(line)
        if field is None:
            lines.append(b":")  # waitress stops at the first line it refuses
            break
        lines.append(field["name"] + b":" + field["value"])
    return b"\r\n".join(lines) + b"\r\n\r\n"
