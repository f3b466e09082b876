"""asgiproxy on uvicorn, round robin over upstreams, for the benchmark.

The proxy asgiproxy's README builds (a ``ProxyConfig`` with the base-URL
mixin, a ``ProxyContext``, ``make_simple_proxy_app``), with the upstream
base URL taken in turn from those given.

    python bench/peers/asgiproxy_app.py --port 8083 URL ...
"""

from __future__ import annotations

import argparse
import itertools
from urllib.parse import urljoin

import uvicorn
from asgiproxy.config import BaseURLProxyConfigMixin, ProxyConfig
from asgiproxy.context import ProxyContext
from asgiproxy.simple_proxy import make_simple_proxy_app


class RoundRobinConfig(BaseURLProxyConfigMixin, ProxyConfig):
    def __init__(self, upstreams: list[str]):
        self.turn = itertools.cycle(upstreams)

    def get_upstream_url(self, scope) -> str:
        return urljoin(next(self.turn), scope["path"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("upstreams", nargs="+", metavar="URL")
    args = parser.parse_args()
    app = make_simple_proxy_app(ProxyContext(RoundRobinConfig(args.upstreams)))
    # uvicorn logs "Uvicorn running on ..." once it listens.
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
