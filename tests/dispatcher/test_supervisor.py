"""Spawned instances under the dispatcher: real processes, real signals."""

import os
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor as ThreadPool

import pytest
import requests

from pyramid_lb.dispatcher.checks import HealthChecker
from pyramid_lb.dispatcher.cluster import Cluster
from pyramid_lb.dispatcher.supervisor import Supervisor
from tests.dispatcher.site import (
    Load,
    alive,
    all_up,
    children,
    cpu_seconds,
    free_base_port,
    free_port,
    from_another_address,
    serve,
    stats,
    subprocess_run,
    write_ini,
)
from tests.processes import BIN, wait_until


@pytest.mark.parametrize("command", ["pyramid-lb", "pserve"])
def test_spawns_instances_that_take_turns(processes, tmp_path, command):
    ini = write_ini(tmp_path)
    process, url = serve(processes, ini, command=command)
    wait_until(lambda: all_up(url, 3), timeout=20)
    seen = [from_another_address(url) for _ in range(6)]
    pids = [w["pid"] for w in seen]
    assert len(set(pids)) == 3
    assert pids[:3] == pids[3:]
    # The client's own address, not the dispatcher's 127.0.0.1.
    assert {w["client_addr"] for w in seen} == {"127.0.0.2"}
    instances = {i["id"]: i for i in stats(url)}
    assert (
        {w["instance"] for w in seen}
        == set(instances)
        == {
            "site-1",
            "site-2",
            "site-3",
        }
    )
    assert {i["pid"] for i in instances.values()} == set(pids)
    output = process.output()
    assert "site-1 | " in output  # instance output, prefixed with its id


def test_command_line_overrides_instances_and_port(processes, tmp_path):
    ini = write_ini(tmp_path)
    port = free_port()
    process = processes.start(
        [BIN / "pyramid-lb", "serve", ini, "--instances", "2", "--port", str(port)]
    )
    url = f"http://127.0.0.1:{process.port()}"
    assert url.endswith(f":{port}")
    wait_until(lambda: all_up(url, 2), timeout=20)


def test_kill_9_under_load_fails_nothing_and_comes_back(processes, tmp_path):
    ini = write_ini(tmp_path)
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 3), timeout=20)
    with ThreadPool(1) as pool:
        # The instance killed is the one running this request.
        held = pool.submit(requests.get, url + "/slow?ms=3000", timeout=20)
        (victim,) = wait_until(lambda: [i for i in stats(url) if i["in_flight"]])
        with Load(url, path="/slow?ms=20") as load:
            wait_until(lambda: len(load.results) >= 10)
            os.kill(victim["pid"], signal.SIGKILL)
            back = wait_until(
                lambda: [
                    i
                    for i in stats(url)
                    if i["id"] == victim["id"]
                    and i["state"] == "up"
                    and i["pid"] != victim["pid"]
                ],
                timeout=10,
            )
            served = len(load.results)
            wait_until(lambda: len(load.results) >= served + 10)
        answer = held.result()
    # In flight when its instance died: sent again to another, and answered.
    assert answer.status_code == 200, answer.text
    assert answer.text.startswith("slept 3000 ms on site-")
    assert victim["id"] not in answer.text, process.output()
    assert len(load.results) > 30
    assert load.failures() == []
    assert back[0]["restarts"] == 1
    assert "restarting it in" in process.output()


def test_a_crash_after_the_first_start_backs_off_then_fails(processes, tmp_path):
    ini = write_ini(tmp_path, instances=1, max_restarts=3)
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 1), timeout=20)
    # A deploy that breaks the app, then a crash: every restart exits at once.
    ini.write_text(ini.read_text().replace("demo.warmup = 0", "demo.warmup = -1"))
    os.kill(stats(url)[0]["pid"], signal.SIGKILL)
    cpu_before = cpu_seconds(process.pid)
    started = time.monotonic()
    process.wait_for_output(r"instance site-1 failed: exited with code 1", timeout=30)
    elapsed = time.monotonic() - started
    output = process.output()
    delays = [float(d) for d in re.findall(r"restarting it in ([\d.]+)s", output)]
    assert len(delays) == 3
    assert delays == sorted(delays)  # backing off
    # The third is 2 s jittered by 25%, logged to a tenth: 1.5 s at least.
    assert delays[-1] >= 1.5
    # Its last words, shown once each time, as they came (never repeated).
    assert output.count("demo.warmup = '-1' is not valid") == 3
    assert "last output" not in output
    assert stats(url)[0]["state"] == "failed"
    # No busy loop: the dispatcher itself used little CPU meanwhile.
    assert cpu_seconds(process.pid) - cpu_before < 0.5 * elapsed
    assert requests.get(url + "/whoami", timeout=10).status_code == 503
    assert process.popen.poll() is None  # later crashes do not stop serve


def test_a_restart_that_never_gets_ready_is_killed_after_startup_timeout(
    processes, tmp_path
):
    """Up, then a crash, and its restart never gets ready: the monitor kills
    it once startup_timeout is over, a crash like any other (here the one
    too many: max_restarts = 1)."""
    ini = write_ini(tmp_path, instances=1, startup_timeout=4, max_restarts=1)
    process, url = serve(processes, ini)
    process.wait_for_output("1/1 instances ready", timeout=20)
    (first,) = stats(url)
    ini.write_text(ini.read_text().replace("demo.warmup = 0", "demo.warmup = 600"))
    os.kill(first["pid"], signal.SIGKILL)
    (restarted,) = wait_until(
        lambda: [i for i in stats(url) if i["pid"] != first["pid"]], timeout=10
    )
    assert restarted["state"] == "starting"
    process.wait_for_output(
        r"instance site-1 failed: not ready after 4s \(last check: .*?\); killed, "
        r"2 times within 60s; not restarting it",
        timeout=20,
    )
    assert not alive(restarted["pid"])
    assert children(process.pid) == []
    assert stats(url)[0]["state"] == "failed"
    assert process.popen.poll() is None  # serve goes on, with nothing to serve


@pytest.mark.parametrize(
    ("change", "startup_timeout", "error"),
    [
        pytest.param(
            (
                "use = egg:pyramid_lb#demo_app",
                "use = call:tests.fixtureapps.broken_app:main",
            ),
            15,
            "ModuleNotFoundError: No module named 'no_such_dependency'",
            id="fails to import",
        ),
        pytest.param(
            ("get port = http_port", "listen = 127.0.0.1:99999"),
            15,
            "[server:main] listen = '127.0.0.1:99999' is not valid",
            id="bad port in server:main",
        ),
        pytest.param(
            ("demo.warmup = 0", "demo.warmup = 600"),
            2,
            None,  # it says nothing: the dispatcher tells
            id="never ready",
        ),
    ],
)
def test_an_app_that_cannot_start_stops_serve(
    processes, tmp_path, change, startup_timeout, error
):
    ini = write_ini(tmp_path, startup_timeout=startup_timeout)
    ini.write_text(ini.read_text().replace(*change))
    started = time.monotonic()
    process = processes.start([BIN / "pyramid-lb", "serve", ini], name="dispatcher")
    code = process.wait(timeout=startup_timeout + 10)
    elapsed = time.monotonic() - started
    output = process.output()
    assert code == 1
    assert elapsed < startup_timeout + 5
    lines = output.splitlines()
    assert len(lines) < 60, output
    # The app's error, from the first instance only, once; nothing restarted.
    if error is not None:
        assert output.count(error) == 1, output
    else:
        assert f"site-1 not ready after {startup_timeout}s" in lines[-1]
    assert "site-2 |" not in output and "site-3 |" not in output
    assert "restarting it in" not in output
    assert lines[-1].startswith("pyramid-lb: error: instance site-1 ")
    # (A slow machine may not have let the never-ready app say anything yet.)
    assert re.search(
        r"before any instance was ready, so the app does not start "
        r"\((its output is above|it printed nothing)\); not restarting it$",
        lines[-1],
    )
    assert not [line for line in lines if "Traceback" in line and " | " not in line]
    assert children(process.pid) == []


def test_ports_in_use_readiness_and_ctrl_c_are_told_once(processes, tmp_path):
    base = free_base_port()
    ini = write_ini(tmp_path, instances=2, base_port=base)
    with socket.socket() as first, socket.socket() as second:
        first.bind(("127.0.0.1", base))
        second.bind(("127.0.0.1", base + 1))
        first.listen()
        second.listen()
        process, url = serve(processes, ini)
        process.wait_for_output(r"2/2 instances ready", timeout=20)
        process.signal(signal.SIGHUP)
        process.wait_for_output(r"rolling restart (\([^)]*\) )?done", timeout=30)
    process.signal(signal.SIGINT)
    assert process.wait(15) == 0
    output = process.output()
    assert output.count("in use") == 1
    # The first start is a canary: one instance, then the other.
    assert (
        f"INFO [pyramid_lb.dispatcher] ports {base}, {base + 1} are in use: the "
        f"instances listen on {base + 2}\n"
    ) in output
    assert "WARNING" not in output
    assert (
        f"INFO [pyramid_lb.dispatcher] 1/1 instances ready: {url}/ takes requests "
        "from now on\n"
    ) in output
    assert f"INFO [pyramid_lb.dispatcher] 2/2 instances ready: {url}/\n" in output
    # Ctrl-C says what SIGTERM says.
    assert "INFO [pyramid_lb.dispatcher] SIGINT: stopping\n" in output
    # The second instance's start-up lines, once.
    assert output.count("site-2 | INFO [waitress] Serving on") == 1


def test_sigterm_lets_a_slow_request_finish_then_stops_everything(processes, tmp_path):
    ini = write_ini(tmp_path, instances=2)
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 2), timeout=20)
    instances = children(process.pid)
    assert len(instances) == 2
    with ThreadPool() as pool:
        slow = pool.submit(requests.get, url + "/slow?ms=1500", timeout=10)
        wait_until(lambda: sum(i["in_flight"] for i in stats(url)) == 1)
        process.signal(signal.SIGTERM)
        response = slow.result()
    assert response.status_code == 200
    assert process.wait(15) == 0
    wait_until(lambda: not any(alive(pid) for pid in instances), timeout=10)


def test_sigkill_leaves_no_instance_behind(processes, tmp_path):
    ini = write_ini(tmp_path, instances=2)
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 2), timeout=20)
    instances = children(process.pid)
    assert len(instances) == 2
    process.signal(signal.SIGKILL)
    wait_until(lambda: not any(alive(pid) for pid in instances), timeout=5)


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        pytest.param(
            lambda ini: ["missing.ini"], "missing.ini: no such file", id="file"
        ),
        pytest.param(
            lambda ini: [
                ini.write_text(ini.read_text().replace("rise = 1", "rise = lots"))
                and ini
            ],
            "rise = 'lots' is not valid",
            id="bad key",
        ),
        pytest.param(
            lambda ini: [
                ini.write_text(
                    re.sub(r"base_port = \d+", "base_port = 65535", ini.read_text())
                )
                and ini
            ],
            "base_port = 65535 leaves no room for 3 instances: they need ports up "
            "to 65537, and the last TCP port is 65535",
            id="ports beyond 65535",
        ),
    ],
)
def test_errors_are_one_clear_line(processes, tmp_path, make_args, message):
    ini = write_ini(tmp_path)
    result = subprocess_run([BIN / "pyramid-lb", "serve", *make_args(ini)])
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_port_in_use_is_one_clear_line(tmp_path):
    ini = write_ini(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess_run([BIN / "pyramid-lb", "serve", ini, "--port", str(port)])
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("max_in_flight", "cap"),
    [
        pytest.param("auto", 7, id="auto: its threads"),
        pytest.param(2, 2, id="a number"),
        pytest.param(None, None, id="off"),
    ],
)
def test_spawned_instances_are_capped(tmp_path, max_in_flight, cap):
    ini = write_ini(tmp_path)
    ini.write_text(ini.read_text().replace("get port", "threads = 7\nget port", 1))
    cluster = Cluster()
    supervisor = Supervisor(
        cluster,
        HealthChecker(cluster),
        instances=1,
        main_ini=str(ini),
        base_port=free_base_port(),
        max_in_flight=max_in_flight,
    )
    assert supervisor._new_instance(str(ini)).backend.max_in_flight == cap
