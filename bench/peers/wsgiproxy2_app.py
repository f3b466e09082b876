"""WSGIProxy2 under waitress, round robin over upstreams, for the benchmark.

One ``wsgiproxy.HostProxy`` per upstream, all sharing one urllib3 pool (the
pooled client WSGIProxy2 ships), and a few lines choosing the next one for
each request. waitress runs it with as many threads as the dispatcher.

    python bench/peers/wsgiproxy2_app.py --port 8082 --threads 16 URL ...
"""

from __future__ import annotations

import argparse
import itertools

import urllib3
import waitress
from wsgiproxy import HostProxy


def make_app(upstreams: list[str], threads: int):
    # One connection per thread and upstream, kept alive between requests.
    pool = urllib3.PoolManager(num_pools=len(upstreams), maxsize=threads)
    proxies = itertools.cycle(
        [HostProxy(url, client="urllib3", pool=pool) for url in upstreams]
    )

    def round_robin(environ, start_response):
        return next(proxies)(environ, start_response)

    return round_robin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("upstreams", nargs="+", metavar="URL")
    args = parser.parse_args()
    app = make_app(args.upstreams, args.threads)
    server = waitress.create_server(
        app, host=args.host, port=args.port, threads=args.threads
    )
    print(f"WSGIProxy2 listening on http://{args.host}:{args.port}", flush=True)
    server.run()


if __name__ == "__main__":
    main()
