"""The shipped ini files and the health endpoints, served by real pserve."""

import signal
import time

import requests

from tests.processes import LOGGING_INI, ROOT, get, wait_until

FIXTURE_INI = """
[app:main]
use = call:tests.fixtureapps.health_app:main
pyramid.includes = pyramid_lb
{settings}

[server:main]
use = egg:waitress#main
listen = 127.0.0.1:%(http_port)s
"""


def write_ini(tmp_path, **settings):
    lines = "\n".join(f"{key} = {value}" for key, value in settings.items())
    path = tmp_path / "fixture.ini"
    path.write_text(FIXTURE_INI.format(settings=lines) + LOGGING_INI)
    return path


def pserve_fixture(processes, tmp_path, **settings):
    ini = write_ini(tmp_path, **settings)
    return processes.pserve(ini, env={"PYTHONPATH": str(ROOT)})


def ready(url):
    response = get(url + "/readyz")
    return response if response.status_code == 200 else None


def test_development_ini_serves_the_demo(processes):
    process, url = processes.pserve(ROOT / "development.ini")
    # development.ini warms up for 1 s: not ready, then ready.
    first = get(url + "/readyz")
    assert first.headers["Content-Type"] == "application/health+json"
    response = wait_until(lambda: ready(url), timeout=10)
    assert response.json()["status"] == "pass"
    assert response.json()["checks"]["warmup"][0]["output"] == "warm"
    assert get(url + "/healthz").json()["status"] == "pass"
    whoami = get(url + "/whoami").json()
    assert whoami["pid"] == process.pid
    assert whoami["client_addr"] == "127.0.0.1"
    assert whoami["scheme"] == "http"
    home = get(url + "/")
    assert f'<code id="instance">{whoami["instance"]}</code>' in home.text


def test_production_ini_serves_the_demo(processes):
    process, url = processes.pserve(ROOT / "production.ini")
    assert wait_until(lambda: ready(url), timeout=10)
    assert get(url + "/hello").text == "Hello World!\n"


def test_session_counter_counts(processes):
    _, url = processes.pserve(ROOT / "development.ini")
    with requests.Session() as session:
        visits = [session.get(url + "/whoami").json()["visits"] for _ in range(3)]
    assert visits == [1, 2, 3]


def test_failing_check_gives_503_naming_it(processes, tmp_path):
    _, url = pserve_fixture(processes, tmp_path, **{"fixture.failing": "true"})
    response = get(url + "/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail"
    assert body["checks"]["database"][0]["output"] == (
        "RuntimeError: the database is unreachable"
    )


def test_hung_check_fails_within_its_timeout(processes, tmp_path):
    _, url = pserve_fixture(processes, tmp_path, **{"fixture.hang": "1"})
    get(url + "/healthz")  # the server answers
    started = time.monotonic()
    response = get(url + "/readyz")
    elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert response.json()["checks"]["hung"][0]["status"] == "fail"
    assert elapsed < 1 + 0.5


def test_drain_through_the_python_api(processes, tmp_path):
    _, url = pserve_fixture(processes, tmp_path)
    assert ready(url)
    requests.post(url + "/drain", timeout=10).raise_for_status()
    assert get(url + "/readyz").status_code == 503
    assert get(url + "/").status_code == 200


def test_drain_file(processes, tmp_path):
    drain_file = tmp_path / "drain-me"
    _, url = pserve_fixture(
        processes, tmp_path, **{"pyramid_lb.drain_file": drain_file}
    )
    assert ready(url)
    drain_file.touch()
    assert get(url + "/readyz").status_code == 503
    assert get(url + "/").status_code == 200
    drain_file.unlink()
    assert ready(url)


def test_drain_on_sigterm(processes, tmp_path):
    process, url = pserve_fixture(
        processes, tmp_path, **{"pyramid_lb.drain_on_sigterm": "2"}
    )
    assert ready(url)
    with requests.Session() as client:
        client.get(url + "/")  # a kept-alive connection, as a balancer's
        signaled = time.monotonic()
        process.signal(signal.SIGTERM)
        wait_until(lambda: client.get(url + "/readyz").status_code == 503)
        assert client.get(url + "/").status_code == 200
        assert get(url + "/").status_code == 200  # new connections too
        assert process.popen.poll() is None
        # A request still running when the grace period ends completes.
        slow = client.get(url + "/slow?s=2.5")
    assert slow.text == "slept"
    assert process.wait(10) == 0
    assert time.monotonic() - signaled >= 2
