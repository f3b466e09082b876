"""Benchmark: the dispatcher against nginx and peers over the same two instances.

Starts two demo instances (production.ini), the dispatcher in front of them
(with the default caps, uncapped: ``max_in_flight = off``, and with the
shared cache on: ``cache = memory``) and, when
installed, nginx, HAProxy (with the same cap and queue, and without: what
a cap costs it) and the peer proxies in bench/peers/ (aiohttp, asgiproxy
on uvicorn, WSGIProxy2 under waitress: ``pip install -e '.[bench]'``) in
front of the same two; then drives each with wrk (or,
without wrk, a small threaded Python client) in interleaved rounds, every
target once a round, and prints for each requests/s, p50 and p99 latency,
the ratio to nginx and the proxy's CPU time per request.

    .venv/bin/python bench/dispatcher.py [--rounds 3] [--duration 5] [--no-peers]

Linux only (CPU time is read from /proc). Nothing here is a test: the
numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.metadata
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# "cacheable hello" is hello marked public for a minute: the "cached"
# dispatcher (cache = memory) answers it from its cache, the others cannot.
VIEWS = {
    "hello": "/hello",
    "cacheable hello": "/hello?max_age=60",
    "1ms-cpu": "/cpu?ms=1",
}

# name: (script in bench/peers/, distributions it needs, extra arguments)
PEERS = {
    "aiohttp": ("aiohttp_proxy.py", ("aiohttp",), ()),
    "asgiproxy": ("asgiproxy_app.py", ("asgiproxy", "uvicorn"), ()),
    "wsgiproxy2": (
        "wsgiproxy2_app.py",
        ("WSGIProxy2", "urllib3"),
        ("--threads", "{threads}"),
    ),
}

NGINX_CONF = """
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
daemon off;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    upstream instances {{
        server 127.0.0.1:{a};
        server 127.0.0.1:{b};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://instances;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""

# The same cap as the dispatcher's default (the instances' 4 threads) with
# HAProxy's queue, and none: what a cap costs where it is done in C.
HAPROXY_CFG = """
global
    maxconn 4096
    nbthread 1
    pidfile {tmp}/haproxy.pid
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout queue 10s
    http-reuse always
frontend capped
    bind 127.0.0.1:{capped}
    default_backend capped
frontend uncapped
    bind 127.0.0.1:{uncapped}
    default_backend uncapped
backend capped
    balance roundrobin
    server a 127.0.0.1:{a} maxconn 4
    server b 127.0.0.1:{b} maxconn 4
backend uncapped
    balance roundrobin
    server a 127.0.0.1:{a}
    server b 127.0.0.1:{b}
"""

# production.ini's demo, on waitress with room for the idle keep-alive
# connections every front here keeps to it: at waitress's default
# connection_limit (100) the instance stops accepting in the middle of the
# run, and the fronts measured then wait for it (the direct one gets 0 req/s).
INSTANCE_INI = """
[app:main]
use = config:{production}#main

[server:main]
use = egg:waitress#main
listen = 127.0.0.1:{port}
clear_untrusted_proxy_headers = false
connection_limit = 2000
"""

DISPATCHER_INI = """
[app:dispatcher]
use = egg:pyramid_lb#dispatcher
backends = http://127.0.0.1:{a} http://127.0.0.1:{b}
max_in_flight = {cap}
cache = {cache}

[server:dispatcher]
use = {server}
listen = 127.0.0.1:{port}
threads = {threads}
"""
# --server: the dispatcher's server section.
SERVERS = {
    # as the shipped ini files have it: waitress with pyramid_lb.server's changes
    "pyramid_lb": "egg:pyramid_lb#waitress",
    "waitress": "egg:waitress#main",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout}s")


def wait_for_ready(port: int, timeout: float = 30.0) -> None:
    """Until ten GETs of /readyz in a row answer 200."""
    deadline = time.monotonic() + timeout
    streak = 0
    while streak < 10:
        if time.monotonic() > deadline:
            raise SystemExit(f"port {port} is not ready after {timeout}s")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/readyz")
            ready = conn.getresponse().status == 200
        except OSError:
            ready = False
        finally:
            conn.close()
        streak = streak + 1 if ready else 0
        if not ready:
            time.sleep(0.1)


def cpu_seconds(session: int) -> float:
    """CPU time of every live process in a session (nginx has workers)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # it has just exited
            continue
        if int(fields[3]) == session:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def installed(distributions: tuple[str, ...]) -> str | None:
    """The distributions as "name version, ...", or None if one is missing."""
    try:
        return ", ".join(
            f"{name} {importlib.metadata.version(name)}" for name in distributions
        )
    except importlib.metadata.PackageNotFoundError:
        return None


def run_wrk(url: str, duration: float, connections: int) -> tuple[float, float, float]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration:g}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors:
        print(f"    ! {url}: {errors.group(0)}")

    def percentile(label: str) -> float:
        value, unit = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return rate, percentile("50"), percentile("99")


def run_python(
    url: str, duration: float, connections: int
) -> tuple[float, float, float]:
    """A stand-in for wrk: keep-alive clients in threads (slower, but works)."""
    host, _, rest = url.removeprefix("http://").partition("/")
    address, port = host.split(":")
    latencies: list[float] = []
    stop = time.monotonic() + duration

    def client():
        conn = http.client.HTTPConnection(address, int(port))
        mine = []
        while time.monotonic() < stop:
            started = time.perf_counter()
            conn.request("GET", "/" + rest)
            conn.getresponse().read()
            mine.append((time.perf_counter() - started) * 1000)
        latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    return (
        len(latencies) / duration,
        latencies[len(latencies) // 2],
        latencies[int(len(latencies) * 0.99)],
    )


def report(
    view: str,
    path: str,
    results: dict[str, list[tuple[float, float, float]]],
    cpu: dict[str, list[float]],
) -> None:
    """One table for a view: medians over the rounds, ratios paired by round."""
    print(f"\n{view} ({path})")
    print(
        f"  {'target':<13} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'x nginx':>8} {'CPU µs/req':>11}"
    )
    nginx = results.get("nginx")
    ratios = {
        target: [r[0] / n[0] for r, n in zip(runs, nginx, strict=True)]
        for target, runs in (results.items() if nginx else ())
    }
    for target, runs in results.items():
        rate, p50, p99 = (statistics.median(r[i] for r in runs) for i in range(3))
        ratio = f"{statistics.median(ratios[target]):.2f}" if ratios else "-"
        used = f"{statistics.median(cpu[target]):.0f}" if target in cpu else "-"
        print(f"  {target:<13} {rate:8.0f} {p50:8.2f} {p99:8.2f} {ratio:>8} {used:>11}")
    for capped, uncapped in (("dispatcher", "uncapped"), ("haproxy", "haproxy/nocap")):
        if capped in results and uncapped in results:
            paired = [
                c[0] / u[0]
                for c, u in zip(results[capped], results[uncapped], strict=True)
            ]
            print(
                f"  the cap costs {capped}: {1 - statistics.median(paired):+.1%} "
                f"of its uncapped req/s (rounds: "
                + ", ".join(f"{1 - r:+.1%}" for r in paired)
                + ")"
            )
    for name in ("dispatcher", "cached"):
        if name in ratios:
            rounds = ", ".join(f"{r:.2f}" for r in ratios[name])
            print(
                f"  {name}/nginx: {statistics.median(ratios[name]):.2f}x "
                f"(rounds: {rounds})"
            )
    print(
        f"  dispatcher CPU per request: {statistics.median(cpu['dispatcher']):.0f} µs"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=16, help="dispatcher (and WSGIProxy2) threads"
    )
    parser.add_argument(
        "--no-peers", action="store_true", help="only direct, dispatcher and nginx"
    )
    parser.add_argument(
        "--server",
        choices=SERVERS,
        default="pyramid_lb",
        help="the dispatcher's server (default: pyramid_lb, as the ini files ship)",
    )
    args = parser.parse_args()

    load = run_wrk if shutil.which("wrk") else run_python
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    tmp = Path(tempfile.mkdtemp(prefix="pyramid_lb-bench-"))
    procs: list[subprocess.Popen] = []

    def start(argv, name):
        log = open(tmp / f"{name}.log", "wb")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        procs.append(proc)
        return proc

    try:
        a, b = free_port(), free_port()
        for port in (a, b):
            ini = tmp / f"instance-{port}.ini"
            ini.write_text(
                INSTANCE_INI.format(production=ROOT / "production.ini", port=port)
            )
            start([BIN / "pserve", ini], port)
        upstreams = [f"http://127.0.0.1:{port}" for port in (a, b)]
        # target: (port, session of the proxy's processes; None: no proxy)
        targets: dict[str, tuple[int, int | None]] = {"direct": (a, None)}
        # The cap spawned instances get by default (their waitress threads,
        # 4), the rest waiting in the dispatcher's queue; and without caps.
        # And with the shared cache on.
        for name, cap, cache in (
            ("dispatcher", 4, "off"),
            ("uncapped", "off", "off"),
            ("cached", 4, "memory"),
        ):
            port = free_port()
            ini = tmp / f"{name}.ini"
            ini.write_text(
                DISPATCHER_INI.format(
                    a=a,
                    b=b,
                    cap=cap,
                    cache=cache,
                    port=port,
                    threads=args.threads,
                    server=SERVERS[args.server],
                )
            )
            process = start(
                [BIN / "pserve", f"{ini}#dispatcher", "--server-name", "dispatcher"],
                name,
            )
            targets[name] = (port, process.pid)
        if nginx:
            port = free_port()
            conf = tmp / "nginx.conf"
            conf.write_text(NGINX_CONF.format(tmp=tmp, a=a, b=b, port=port))
            proc = start([nginx, "-c", conf, "-p", tmp], "nginx")
            targets["nginx"] = (port, proc.pid)
        else:
            print("nginx is not installed: no nginx figures, no ratio")
        haproxy = shutil.which("haproxy") or (
            "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
        )
        if haproxy:
            capped, uncapped = free_port(), free_port()
            conf = tmp / "haproxy.cfg"
            conf.write_text(
                HAPROXY_CFG.format(tmp=tmp, a=a, b=b, capped=capped, uncapped=uncapped)
            )
            proc = start([haproxy, "-W", "-db", "-f", conf], "haproxy")
            targets["haproxy"] = (capped, proc.pid)
            targets["haproxy/nocap"] = (uncapped, proc.pid)
        else:
            print("haproxy is not installed: no figure for what a cap costs it")
        for name, (script, distributions, extra) in PEERS.items():
            if args.no_peers:
                break
            versions = installed(distributions)
            if versions is None:
                print(
                    f"{name}: {' and '.join(distributions)} not installed, skipped "
                    "(pip install -e '.[bench]')"
                )
                continue
            print(f"{name}: {versions}")
            port = free_port()
            argv = [sys.executable, Path(__file__).parent / "peers" / script]
            argv += ["--port", str(port), *upstreams]
            argv += [arg.format(threads=args.threads) for arg in extra]
            targets[name] = (port, start(argv, name).pid)
        for port, _ in targets.values():
            wait_for_port(port)
        # production.ini's demo warms up for 2 s, then the dispatcher's
        # health checks must see it ready; through every proxy, /readyz
        # also shows that it answers.
        for port in {b, *(port for port, _ in targets.values())}:
            wait_for_ready(port)
        print(
            f"load: {load.__name__.removeprefix('run_')}, {args.connections} "
            f"connections, {args.rounds} rounds of {args.duration:g}s, "
            f"dispatcher threads={args.threads}, {os.cpu_count()} CPUs"
        )
        for view, path in VIEWS.items():
            results: dict[str, list[tuple[float, float, float]]] = {
                t: [] for t in targets
            }
            cpu: dict[str, list[float]] = {
                t: [] for t, (_, session) in targets.items() if session
            }
            for port, _ in targets.values():
                load(f"http://127.0.0.1:{port}{path}", 1.0, args.connections)
            for _ in range(args.rounds):
                for target, (port, session) in targets.items():
                    before = cpu_seconds(session) if session else 0.0
                    outcome = load(
                        f"http://127.0.0.1:{port}{path}",
                        args.duration,
                        args.connections,
                    )
                    results[target].append(outcome)
                    if session:
                        used = cpu_seconds(session) - before
                        cpu[target].append(used / (outcome[0] * args.duration) * 1e6)
            report(view, path, results, cpu)
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
