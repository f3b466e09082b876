"""A site for dispatcher tests: an ini file with instances of the demo, served."""

import http.client
import json
import os
import random
import re
import socket
import subprocess
import threading
from pathlib import Path

import requests

from tests.processes import BIN, LOGGING_INI

SERVING = re.compile(r"^INFO \[waitress\] Serving on http://127\.0\.0\.1:(\d+)", re.M)

INI = """
[app:main]
use = egg:pyramid_lb#demo_app
pyramid.includes = pyramid_lb
pyramid_lb.trusted_proxies = 127.0.0.1 ::1
demo.session_secret = test-secret
demo.warmup = {warmup}
{app_extra}

[server:main]
use = egg:waitress#main
host = 127.0.0.1
get port = http_port
clear_untrusted_proxy_headers = false

[app:dispatcher]
use = egg:pyramid_lb#dispatcher
instances = {instances}
base_port = {base_port}
health_check_interval = 0.1
health_check_timeout = 1
rise = 1
fall = 2
startup_timeout = {startup_timeout}
max_restarts = {max_restarts}
drain_timeout = {drain_timeout}
stop_timeout = 5
# Tests counting where requests go right after start-up want even shares.
slow_start = {slow_start}
{dispatcher_extra}

[server:dispatcher]
use = egg:waitress#main
listen = 127.0.0.1:0

[DEFAULT]
http_port = 6543
"""


def _own_ports() -> range:
    """Ports for this test process to pick from: below the range the kernel
    hands out to outgoing connections (so that no client socket takes one
    between the pick and the bind), a slice of it per xdist worker."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            ephemeral = int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    low = 10000
    size = (ephemeral - low) // max(workers, 1)
    return range(low + index * size, low + (index + 1) * size)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` right now, out of the way of client sockets."""
    return free_base_port(1, host)


def free_base_port(count: int = 12, host: str = "127.0.0.1") -> int:
    """The first of ``count`` ports in a row that are free right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ports = _own_ports()
    for _ in range(200):
        base = random.randrange(ports.start, ports.stop - count)
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(family)
                sockets.append(sock)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no free range of ports")


def write_ini(tmp_path: Path, **options) -> Path:
    values = dict(
        warmup=0,
        instances=3,
        startup_timeout=15,
        max_restarts=5,
        base_port=0,
        drain_timeout=5,
        slow_start=0,
        app_extra="",
        dispatcher_extra="",
    )
    values.update(options)
    if not values["base_port"]:
        values["base_port"] = free_base_port()
    path = tmp_path / "site.ini"
    path.write_text(INI.format(**values) + LOGGING_INI)
    return path


def serve(processes, ini, *args, command="pyramid-lb"):
    """Start the dispatcher; wait until all its instances take requests."""
    if command == "pyramid-lb":
        argv = [BIN / "pyramid-lb", "serve", ini, *args]
    else:
        argv = [BIN / "pserve", f"{ini}#dispatcher", "--server-name", "dispatcher"]
    process = processes.start(argv, name="dispatcher")
    # The dispatcher's own line, not an instance's ("site-1 | INFO ...").
    port = process.wait_for_output(SERVING).group(1)
    return process, f"http://127.0.0.1:{port}"


def stats(url):
    return requests.get(url + "/_lb/stats.json", timeout=10).json()["instances"]


def all_up(url, count):
    instances = stats(url)
    return len(instances) == count and all(i["state"] == "up" for i in instances)


def who(url, count, session=None):
    session = session or requests
    return [session.get(url + "/whoami", timeout=10).json() for _ in range(count)]


def from_another_address(url):
    """GET /whoami from 127.0.0.2, so only forwarded headers can tell it."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), source_address=("127.0.0.2", 0))
    try:
        conn.request("GET", "/whoami")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def children(pid):
    """Processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().rpartition(")")[2].split()[0] != "Z"


def steady(url, stop, results, path="/whoami", method="GET", client=0):
    """Requests one after the other until ``stop``; records (status, what).

    A POST carries ``id=<client>-<n>`` in its query, and ``what`` is that id
    (for counting how often each ran); for a GET ``what`` is the body.
    """
    number = 0
    with requests.Session() as session:
        while not stop.is_set():
            number += 1
            key = f"{client}-{number}"
            try:
                if method == "POST":
                    separator = "&" if "?" in path else "?"
                    response = session.post(
                        f"{url}{path}{separator}id={key}", timeout=10
                    )
                    results.append((response.status_code, key))
                else:
                    response = session.get(url + path, timeout=10)
                    results.append((response.status_code, response.text))
            except requests.RequestException as exc:
                results.append((type(exc).__name__, key))


class Load:
    """A few clients sending requests until stopped."""

    def __init__(self, url, clients=3, path="/whoami", method="GET"):
        self.stop = threading.Event()
        self.results = []
        self.threads = [
            threading.Thread(
                target=steady,
                args=(url, self.stop, self.results, path, method, client),
            )
            for client in range(clients)
        ]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(15)

    def failures(self):
        return [r for r in self.results if r[0] != 200]


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def subprocess_run(argv):
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=60
    )
