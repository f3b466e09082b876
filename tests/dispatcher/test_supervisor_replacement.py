"""Instances replaced under the dispatcher: reloads, rolling restarts, scaling,
recycling, hung instances (real processes, real signals)."""

import contextlib
import os
import re
import signal
import socket
import time
import types
from concurrent.futures import ThreadPoolExecutor as ThreadPool

import requests

from pyramid_lb.dispatcher.checks import HealthChecker
from pyramid_lb.dispatcher.cluster import UP, Backend, Cluster
from pyramid_lb.dispatcher.operations import Busy, Operations
from pyramid_lb.dispatcher.supervisor import RECYCLE_GAP, Instance, Supervisor
from tests.dispatcher.site import (
    Load,
    alive,
    all_up,
    children,
    free_base_port,
    serve,
    stats,
    subprocess_run,
    write_ini,
)
from tests.processes import BIN, LOGGING_INI, slow_download, wait_until


def test_reload_and_scale_at_once_are_one_after_the_other(processes, tmp_path):
    """`pyramid-lb reload; pyramid-lb scale 2` crashed the rollout; now the
    second waits its turn, told so in one line."""
    ini = write_ini(tmp_path)
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 3), timeout=20)
    # Replacements that take a while to warm up: the rollout lasts seconds.
    ini.write_text(ini.read_text().replace("demo.warmup = 0", "demo.warmup = 1"))
    reload = subprocess_run([BIN / "pyramid-lb", "reload", url])
    assert reload.returncode == 0, reload.stderr
    scale = subprocess_run([BIN / "pyramid-lb", "scale", url, "2"])
    assert scale.returncode == 1
    assert scale.stderr.startswith(
        f"pyramid-lb: error: {url} is busy: rolling restart (POST /_lb/reload) is "
        "under way (started "
    )
    assert scale.stderr.count("\n") == 1
    drain = requests.post(
        url + "/_lb/instances/site-2/drain",
        headers={"X-Requested-With": "test"},
        timeout=10,
    )
    assert drain.status_code == 409
    assert drain.json()["running"] == "rolling restart (POST /_lb/reload)"
    process.signal(signal.SIGHUP)  # SIGHUP's rolling restart waits its turn too
    process.wait_for_output(
        r"WARNING \[pyramid_lb.dispatcher\] SIGHUP: no rolling restart: rolling "
        r"restart \(POST /_lb/reload\) is under way"
    )
    assert stats(url)  # the stats are read as ever meanwhile
    process.wait_for_output(r"rolling restart (\([^)]*\) )?done", timeout=60)
    assert all_up(url, 3)
    scale = subprocess_run([BIN / "pyramid-lb", "scale", url, "2"])
    assert scale.returncode == 0, scale.stderr
    assert scale.stdout == "2 instances (-1)\n"
    process.wait_for_output(r"scale to 2 done in [\d.]+s", timeout=30)
    assert all_up(url, 2)
    output = process.output()
    assert "rolling restart (POST /_lb/reload) started" in output
    assert "scale to 2 started" in output
    assert "Traceback" not in output and "not in list" not in output


def test_rolling_restart_under_load_replaces_every_pid(processes, tmp_path):
    ini = write_ini(tmp_path)
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 3), timeout=20)
    before = {i["pid"] for i in stats(url)}
    with Load(url, path="/slow?ms=20") as load:
        wait_until(lambda: len(load.results) >= 10)
        process.signal(signal.SIGHUP)
        process.wait_for_output(r"rolling restart (\([^)]*\) )?done", timeout=60)
        served = len(load.results)
        wait_until(lambda: len(load.results) >= served + 10)
    after = stats(url)
    assert len(after) == 3 and all(i["state"] == "up" for i in after)
    assert before.isdisjoint(i["pid"] for i in after)
    assert not any(alive(pid) for pid in before)
    assert len(load.results) > 30
    assert load.failures() == []
    served_by = {r[1] for r in load.results}
    assert len(served_by) > 3


def test_rolling_restart_with_a_broken_replacement_keeps_the_old(processes, tmp_path):
    # Short, for the broken replacement; long enough for the first start of
    # an instance on a loaded machine.
    ini = write_ini(tmp_path, startup_timeout=6)
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
        process.wait_for_output(r"rolling restart (\([^)]*\) )?stopped", timeout=30)
    assert {i["pid"] for i in stats(url)} == before
    assert load.failures() == []
    assert len(stats(url)) == 3


def test_scale_up_and_down_lets_requests_in_flight_finish(processes, tmp_path):
    ini = write_ini(tmp_path, instances=1, drain_timeout=30)
    # Shorter than the requests below: cut off, were they not waited for.
    ini.write_text(ini.read_text().replace("stop_timeout = 5", "stop_timeout = 1"))
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 1), timeout=20)
    scale = subprocess_run([BIN / "pyramid-lb", "scale", url, "3"])
    assert scale.returncode == 0, scale.stderr
    assert "3 instances (+2)" in scale.stdout
    # The scale is over once its instances are ready (until then another
    # operation would be refused).
    process.wait_for_output(r"scale to 3 done in", timeout=20)
    assert all_up(url, 3)
    with ThreadPool(3) as pool:
        posts = [
            pool.submit(requests.post, url + "/slow?ms=2000", timeout=20)
            for _ in range(3)
        ]
        # One on each instance, the two leaving included.
        wait_until(lambda: [i["in_flight"] for i in stats(url)] == [1, 1, 1])
        reply = requests.post(
            url + "/_lb/scale?instances=1",
            headers={"X-Requested-With": "t"},
            timeout=10,
        )
        assert reply.json() == {"instances": 1, "change": -2}
        answers = [post.result() for post in posts]
    assert [answer.status_code for answer in answers] == [200] * 3
    assert sorted(answer.text.split()[-1] for answer in answers) == [
        "site-1",
        "site-2",
        "site-3",
    ]
    process.wait_for_output(r"scale to 1 done in", timeout=20)
    assert [i["id"] for i in stats(url)] == ["site-1"]
    assert len(children(process.pid)) == 1


def test_reload_command(processes, tmp_path):
    ini = write_ini(tmp_path, instances=1)
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 1), timeout=20)
    before = stats(url)[0]["pid"]
    reload = subprocess_run([BIN / "pyramid-lb", "reload", url])
    assert reload.returncode == 0, reload.stderr
    process.wait_for_output(r"rolling restart (\([^)]*\) )?done", timeout=30)
    assert stats(url)[0]["pid"] != before


def test_hung_instance_is_killed_and_restarted(processes, tmp_path):
    ini = write_ini(tmp_path, instances=1)
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 1), timeout=20)
    hung = stats(url)[0]
    # Frozen, it answers nothing, not even its liveness check. (Slow views
    # filling its threads would not do: its health checks have threads of
    # their own, see tests/test_server.py.)
    os.kill(hung["pid"], signal.SIGSTOP)
    try:
        process.wait_for_output(r"instance site-1 hung: its liveness check failed")
        wait_until(
            lambda: stats(url)[0]["pid"] != hung["pid"] and all_up(url, 1), timeout=15
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung["pid"], signal.SIGCONT)
    assert not alive(hung["pid"])


def test_fall_liveness_failures_in_a_row_kill_fewer_do_not(processes, tmp_path):
    ini = fixture_site(tmp_path, "liveness_app", fall=2, health_check_timeout=2)
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 1), timeout=20)
    (instance,) = stats(url)

    def probes():
        """Its liveness probes so far: (failed, passed); None once it is gone."""
        try:
            seen = requests.get(instance["url"] + "/probes", timeout=10).json()
        except requests.ConnectionError:
            return None
        return seen["failed"], seen["passed"]

    def settled():
        """The failure, the pass held after it and two more (or it is gone)."""
        seen = probes()
        return seen is None or (seen[0] == 1 and seen[1] >= passed + 3)

    passed = wait_until(lambda: probes()[1])  # its liveness is probed now
    # fall - 1 = 1 failure, kept for half a second before the next pass.
    requests.get(instance["url"] + "/fail-liveness?times=1", timeout=10)
    wait_until(settled)
    assert "hung" not in process.output()
    assert [(i["pid"], i["restarts"]) for i in stats(url)] == [(instance["pid"], 0)]
    assert process.output().count("liveness check failed") == 1  # it was seen
    # fall = 2 failures in a row: hung, killed and restarted.
    requests.get(instance["url"] + "/fail-liveness?times=2", timeout=10)
    process.wait_for_output(f"instance {instance['id']} hung: its liveness check")
    wait_until(
        lambda: stats(url)[0]["pid"] != instance["pid"] and all_up(url, 1), timeout=15
    )
    assert not alive(instance["pid"])


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


def fixture_site(tmp_path, app, **dispatcher):
    """An ini file for one spawned instance of ``tests/fixtureapps/APP.py``
    (a plain WSGI app) behind the dispatcher; ``dispatcher`` adds keys."""
    settings = {
        "instances": 1,
        "base_port": free_base_port(),
        "health_check_interval": 0.1,
        "rise": 1,
        "stop_timeout": 5,
        **dispatcher,
    }
    ini = tmp_path / f"{app}.ini"
    ini.write_text(
        f"""
[app:main]
use = call:tests.fixtureapps.{app}:main

[server:main]
use = egg:pyramid_lb#waitress
host = 127.0.0.1

[app:dispatcher]
use = egg:pyramid_lb#dispatcher
"""
        + "".join(f"{key} = {value}\n" for key, value in settings.items())
        + """
[server:dispatcher]
use = egg:pyramid_lb#waitress
listen = 127.0.0.1:0
"""
        + LOGGING_INI
    )
    return ini


def test_a_download_in_flight_survives_its_instance_being_replaced(processes, tmp_path):
    """A rolling restart during a 20 MB download to a slow client: the old
    instance is stopped only once all of it is through."""
    ini = fixture_site(
        tmp_path,
        "plain_app",
        health_check_path="/",
        liveness_path="/",
        drain_timeout=30,
    )
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 1), timeout=20)
    (old,) = stats(url)

    def reload():
        process.signal(signal.SIGHUP)
        # Downloading on once the old instance is held for its stop.
        wait_until(lambda: [i["held"] for i in stats(url)] == [True, False])

    port = int(url.rpartition(":")[2])
    assert slow_download(port, "/big?mb=20", 20 << 20, reload) == 20 << 20
    wait_until(lambda: [i["id"] for i in stats(url)] not in ([], [old["id"]]), 20)
    wait_until(lambda: not alive(old["pid"]), 20)
    process.wait_for_output(r"rolling restart (\([^)]*\) )?done")


def test_an_instance_whose_port_is_taken_meanwhile_moves_on(processes, tmp_path):
    """The port is free where the supervisor looks (127.0.0.1) but taken
    where the instance binds (every address): it moves to the next port, and
    that is no failure of the app's."""
    base = free_base_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.3", base))
        squatter.listen()
        ini = write_ini(tmp_path, instances=1, base_port=base)
        ini.write_text(ini.read_text().replace("host = 127.0.0.1", "host = *", 1))
        process, url = serve(processes, ini)
        wait_until(lambda: all_up(url, 1), timeout=20)
    assert [i["url"] for i in stats(url)] == [f"http://127.0.0.1:{base + 1}"]
    output = process.output()
    assert f"port {base} was taken meanwhile; it moves to {base + 1}" in output
    assert "restarting" not in output


def test_without_a_dispatcher_an_instance_keeps_its_port(processes, tmp_path):
    """Under ``--no-dispatcher`` the front's configuration names the ports: a
    port in use is said, and the instance waits for it instead of moving."""
    base = free_base_port()
    squatter = socket.socket()
    squatter.bind(("127.0.0.3", base + 1))
    squatter.listen()
    try:
        ini = write_ini(tmp_path, instances=2, base_port=base)
        ini.write_text(ini.read_text().replace("host = 127.0.0.1", "host = *", 1))
        process = processes.start(
            [BIN / "pyramid-lb", "serve", ini, "--no-dispatcher"], name="instances"
        )
        process.wait_for_output(
            f"could not listen: port {base + 1} is in use by another program", 20
        )
        assert answers(f"http://127.0.0.1:{base}/")
    finally:
        squatter.close()
    wait_until(lambda: answers(f"http://127.0.0.1:{base + 1}/"), 20)
    assert not answers(f"http://127.0.0.1:{base + 2}/")
    assert "moves to" not in process.output()


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def recycles(output):
    """The recycling operations' log lines, as (id, "started" or how it ended)."""
    return re.findall(
        r"\] recycling of (\S+) (started|done|stopped)(?: in [\d.]+s)?$", output, re.M
    )


def one_at_a_time(events):
    """Whether each recycle ended before the next one started."""
    running = None
    for id, event in events:
        if (event == "started") != (running is None):
            return False
        if event != "started" and id != running:
            return False
        running = id if event == "started" else None
    return True


def ready_counts(process, url, until, timeout):
    """How many instances took requests, sampled until ``until()``."""
    counts = []
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, process.output()
        counts.append(sum(i["state"] == "up" for i in stats(url)))
        time.sleep(0.05)
    return counts


def test_max_requests_recycles_every_instance_one_at_a_time(processes, tmp_path):
    ini = write_ini(
        tmp_path, dispatcher_extra="max_requests = 200\nmax_requests_jitter = 20\n"
    )
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 3), timeout=20)
    first = {i["id"]: i["pid"] for i in stats(url)}

    def all_replaced():
        output = process.output()
        return all(f"instance {id} replaced by " in output for id in first)

    with Load(url) as load:
        # Three recycles of about 3 s, and 600-odd requests to set them off,
        # which a loaded machine sends at 50 a second.
        counts = ready_counts(process, url, all_replaced, timeout=45)
    output = process.output()
    assert load.failures() == []
    # The replacement was ready before the old instance was drained.
    assert min(counts) == 3, counts
    assert one_at_a_time(recycles(output)), recycles(output)
    assert not any(alive(pid) for pid in first.values())
    for id in first:
        served = re.search(
            rf"INFO \[pyramid_lb.dispatcher\] instance {id}: recycling it: served "
            r"(\d+) requests \(max_requests = 200"
            r"(, plus (\d+) of max_requests_jitter)?\)",
            output,
        )
        assert served, output
        assert int(served[1]) >= 200 + int(served[3] or 0)
        assert int(served[3] or 0) <= 20


def test_max_memory_recycles_then_says_a_limit_is_too_low(processes, tmp_path):
    """Every instance is above 1 MB: the first is recycled, its replacement
    is above it as well, and recycling for memory stops, saying why, rather
    than replace instances for ever."""
    ini = write_ini(tmp_path, instances=2, dispatcher_extra="max_memory = 1M\n")
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 2), timeout=20)
    process.wait_for_output("no more recycling for memory", timeout=20)
    # A second recycle would have started by now (they are RECYCLE_GAP apart).
    time.sleep(RECYCLE_GAP + 1.5)
    process.signal(signal.SIGTERM)
    assert process.wait(15) == 0
    output = process.output()
    assert recycles(output) == [("site-1", "started"), ("site-1", "done")]
    assert re.search(
        r"instance site-1: recycling it: its resident memory is [\d.]+ MB "
        r"\(max_memory = 1\.0 MB\)",
        output,
    ), output
    assert re.search(
        r"max_memory = 1\.0 MB is less than a fresh instance uses \([\d.]+ MB for "
        r"site-\d\): no more recycling for memory; raise it",
        output,
    ), output
    assert "Traceback" not in output


class ClaimedMeanwhile(Operations):
    """Another operation claims them first, once: between the supervisor's
    look (nothing under way) and its claim."""

    def __init__(self):
        super().__init__()
        self.refusals = 1

    def claim(self, what):
        if self.refusals:
            self.refusals -= 1
            raise Busy("scale to 2", 0.0)
        super().claim(what)


def due_for_recycling(monkeypatch, operations=None):
    """A booted supervisor whose one instance, up, has served its
    ``max_requests``; and the list its replacements go to (none is started)."""
    cluster = Cluster()
    supervisor = Supervisor(
        cluster,
        HealthChecker(cluster),
        max_requests=10,
        max_in_flight=None,
        operations=operations,
    )
    backend = Backend("http://127.0.0.1:1", name="site-1", state=UP)
    instance = Instance("site-1", "site.ini", 1, backend)
    instance.process = types.SimpleNamespace(pid=None, poll=lambda: None)
    instance.request_limit = backend.requests = 10
    cluster.add(backend)
    supervisor.spawned.append(instance)
    supervisor._booted = True
    replaced = []
    monkeypatch.setattr(
        supervisor, "_replace", lambda old, what: replaced.append((old, what)) or True
    )
    return supervisor, replaced


def test_an_operation_under_way_postpones_a_recycle(monkeypatch):
    supervisor, replaced = due_for_recycling(monkeypatch)
    supervisor.operations.claim("rolling restart")
    supervisor.check()
    supervisor.check()
    assert supervisor.operations.running == "rolling restart"
    assert replaced == []
    supervisor.operations.release()
    supervisor.check()  # due still: recycled now
    wait_until(lambda: supervisor.operations.running is None)
    assert [what for _, what in replaced] == ["recycling of site-1"]
    assert supervisor.recycled == {"max_requests": 1}


def test_a_recycle_refused_as_busy_is_tried_again(monkeypatch):
    operations = ClaimedMeanwhile()
    supervisor, replaced = due_for_recycling(monkeypatch, operations)
    supervisor.check()
    assert operations.refusals == 0  # it was refused
    assert replaced == []
    supervisor.check()
    wait_until(lambda: operations.running is None)
    assert [what for _, what in replaced] == ["recycling of site-1"]
    assert supervisor.recycled == {"max_requests": 1}


def test_without_a_dispatcher_a_rolling_restart_keeps_ports_and_ids(
    processes, tmp_path
):
    """What the exported front names (ports, affinity cookies by instance id)
    stays true: each instance is replaced in place."""
    base = free_base_port()
    ini = write_ini(tmp_path, instances=2, base_port=base)
    process = processes.start(
        [BIN / "pyramid-lb", "serve", ini, "--no-dispatcher"], name="instances"
    )
    urls = [f"http://127.0.0.1:{port}/whoami" for port in (base, base + 1)]
    wait_until(lambda: all(answers(url) for url in urls), 20)
    before = [requests.get(url, timeout=5).json() for url in urls]
    process.signal(signal.SIGHUP)
    process.wait_for_output(r"rolling restart (\([^)]*\) )?done", 30)
    wait_until(lambda: all(answers(url) for url in urls), 20)
    after = [requests.get(url, timeout=5).json() for url in urls]
    assert [w["instance"] for w in after] == [w["instance"] for w in before]
    assert all(a["pid"] != b["pid"] for a, b in zip(after, before, strict=True))
    assert "replaced in place" in process.output()
