"""A reverse proxy written the way aiohttp's docs suggest, for the benchmark.

One ``ClientSession`` on a pooled ``TCPConnector`` lives as long as the app
(``cleanup_ctx``); each request goes to the next upstream in turn and its
answer is streamed back through a ``web.StreamResponse``. Hop-by-hop headers
are dropped both ways and the client's address is appended to
X-Forwarded-For.

    python bench/peers/aiohttp_proxy.py --port 8081 http://127.0.0.1:6544 ...
"""

from __future__ import annotations

import argparse
import itertools

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

# RFC 9110 section 7.6.1, plus what a Connection header names.
HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    )
)

SESSION = web.AppKey("session", aiohttp.ClientSession)


def end_to_end(headers) -> CIMultiDict[str]:
    """The headers without hop-by-hop ones; repeated ones (Set-Cookie) kept."""
    named = {
        token.strip().lower() for token in headers.get("Connection", "").split(",")
    }
    return CIMultiDict(
        (name, value)
        for name, value in headers.items()
        if name.lower() not in HOP_BY_HOP and name.lower() not in named
    )


def make_app(upstreams: list[str]) -> web.Application:
    turn = itertools.cycle(upstreams)

    async def session_ctx(app: web.Application):
        # auto_decompress=False: the body goes through as the upstream sent it.
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as session:
            app[SESSION] = session
            yield

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers = end_to_end(request.headers)
        forwarded_for = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = (
            f"{forwarded_for}, {request.remote}" if forwarded_for else request.remote
        )
        async with request.app[SESSION].request(
            request.method,
            next(turn) + request.rel_url.raw_path_qs,
            headers=headers,
            data=request.content if request.body_exists else None,
            allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=end_to_end(upstream.headers),
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("upstreams", nargs="+", metavar="URL")
    args = parser.parse_args()
    web.run_app(
        make_app([url.rstrip("/") for url in args.upstreams]),
        host=args.host,
        port=args.port,
        access_log=None,
        print=lambda _: print(
            f"aiohttp proxy listening on http://{args.host}:{args.port}", flush=True
        ),
    )


if __name__ == "__main__":
    main()
