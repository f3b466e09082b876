"""Spawned instances under the dispatcher: real processes, real signals."""

import os
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor as ThreadPool

import pytest
import requests

from tests.dispatcher.site import (
    Load,
    alive,
    all_up,
    children,
    cpu_seconds,
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
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
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
    victim = stats(url)[0]
    with Load(url, path="/slow?ms=20") as load:
        time.sleep(0.3)
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
        time.sleep(0.3)
    assert len(load.results) > 30
    assert load.failures() == []
    assert back[0]["restarts"] == 1
    assert "restarting it in" in process.output()


def test_instance_exiting_at_once_backs_off_then_fails(processes, tmp_path):
    ini = write_ini(tmp_path, instances=1, max_restarts=3)
    ini.write_text(ini.read_text().replace("demo.warmup = 0", "demo.warmup = -1"))
    process, url = serve(processes, ini)
    cpu_before = cpu_seconds(process.pid)
    started = time.monotonic()
    process.wait_for_output(r"instance site-1 failed: exited with code 1", timeout=30)
    elapsed = time.monotonic() - started
    output = process.output()
    delays = [float(d) for d in re.findall(r"restarting it in ([\d.]+)s", output)]
    assert len(delays) == 3
    assert delays == sorted(delays)  # backing off
    assert delays[-1] > 1.5
    assert "demo.warmup = '-1' is not valid" in output  # its last words
    assert stats(url)[0]["state"] == "failed"
    # No busy loop: the dispatcher itself used little CPU meanwhile.
    assert cpu_seconds(process.pid) - cpu_before < 0.5 * elapsed
    assert requests.get(url + "/whoami", timeout=10).status_code == 503


def test_rolling_restart_under_load_replaces_every_pid(processes, tmp_path):
    ini = write_ini(tmp_path)
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 3), timeout=20)
    before = {i["pid"] for i in stats(url)}
    with Load(url, path="/slow?ms=20") as load:
        time.sleep(0.2)
        process.signal(signal.SIGHUP)
        process.wait_for_output("rolling restart done", timeout=60)
        time.sleep(0.2)
    after = stats(url)
    assert len(after) == 3 and all(i["state"] == "up" for i in after)
    assert before.isdisjoint(i["pid"] for i in after)
    assert not any(alive(pid) for pid in before)
    assert len(load.results) > 30
    assert load.failures() == []
    served_by = {r[1] for r in load.results}
    assert len(served_by) > 3


def test_rolling_restart_with_a_broken_replacement_keeps_the_old(processes, tmp_path):
    ini = write_ini(tmp_path, startup_timeout=3)
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 3), timeout=20)
    before = {i["pid"] for i in stats(url)}
    # A deploy of code that never gets ready.
    ini.write_text(ini.read_text().replace("demo.warmup = 0", "demo.warmup = 600"))
    with Load(url) as load:
        reply = requests.post(
            url + "/_lb/reload", headers={"X-Requested-With": "test"}, timeout=10
        )
        assert reply.status_code == 202
        process.wait_for_output("rolling restart stopped", timeout=30)
    assert {i["pid"] for i in stats(url)} == before
    assert load.failures() == []
    assert len(stats(url)) == 3


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


def test_scale_up_and_down(processes, tmp_path):
    ini = write_ini(tmp_path, instances=1)
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 1), timeout=20)
    scale = subprocess_run([BIN / "pyramid-lb", "scale", url, "3"])
    assert scale.returncode == 0, scale.stderr
    assert "3 instances (+2)" in scale.stdout
    wait_until(lambda: all_up(url, 3), timeout=20)
    reply = requests.post(
        url + "/_lb/scale?instances=1", headers={"X-Requested-With": "t"}, timeout=10
    )
    assert reply.json() == {"instances": 1, "change": -2}
    wait_until(lambda: len(stats(url)) == 1, timeout=20)
    assert len(children(process.pid)) == 1


def test_reload_command(processes, tmp_path):
    ini = write_ini(tmp_path, instances=1)
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 1), timeout=20)
    before = stats(url)[0]["pid"]
    reload = subprocess_run([BIN / "pyramid-lb", "reload", url])
    assert reload.returncode == 0, reload.stderr
    process.wait_for_output("rolling restart done", timeout=30)
    assert stats(url)[0]["pid"] != before


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


def test_hung_instance_is_killed_and_restarted(processes, tmp_path):
    ini = write_ini(tmp_path, instances=1)
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 1), timeout=20)
    hung = stats(url)[0]
    port = hung["url"].rsplit(":", 1)[1]
    # Every one of its 4 waitress threads busy for a minute: it answers
    # nothing, not even its liveness check.
    blockers = ThreadPool(6)
    for _ in range(6):
        blockers.submit(
            lambda: requests.get(f"http://127.0.0.1:{port}/slow?ms=60000", timeout=70)
        )
    try:
        process.wait_for_output(r"instance site-1 hung: its liveness check failed")
        wait_until(
            lambda: stats(url)[0]["pid"] != hung["pid"] and all_up(url, 1), timeout=15
        )
    finally:
        blockers.shutdown(wait=False, cancel_futures=True)
    assert not alive(hung["pid"])


def test_restart_one_instance_from_the_admin(processes, tmp_path):
    ini = write_ini(tmp_path, instances=2)
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 2), timeout=20)
    first, second = stats(url)
    reply = requests.post(
        f"{url}/_lb/instances/{first['id']}/restart",
        headers={"X-Requested-With": "test"},
        timeout=10,
    )
    assert reply.status_code == 200
    process.wait_for_output(f"instance {first['id']} replaced by site-3")
    after = {i["id"]: i for i in stats(url)}
    assert set(after) == {second["id"], "site-3"}
    assert after[second["id"]]["pid"] == second["pid"]
    assert not alive(first["pid"])
