"""``pyramid-lb serve --reload``: edits become rolling restarts."""

import os
import re
import signal
import time

import pytest

from pyramid_lb.dispatcher import reloader
from pyramid_lb.dispatcher.operations import Busy
from pyramid_lb.dispatcher.reloader import Reloader, write_module_list
from pyramid_lb.process import MODULES_ENV
from tests.dispatcher.site import SERVING, Load, free_base_port
from tests.processes import BIN, LOGGING_INI, get, wait_until

APP = """\
from pyramid.config import Configurator
from pyramid.response import Response

TEXT = {text!r}


def main(global_config, **settings):
    with Configurator(settings=settings) as config:
        config.include("pyramid_lb")
        config.add_route("text", "/text")
        config.add_view(lambda request: Response(TEXT), route_name="text")
        return config.make_wsgi_app()
"""

INI = """
[app:main]
use = call:reloadme:main
pyramid_lb.trusted_proxies = 127.0.0.1 ::1

[server:main]
use = egg:waitress#main
host = 127.0.0.1
get port = http_port
clear_untrusted_proxy_headers = false

[app:dispatcher]
use = egg:pyramid_lb#dispatcher
instances = 2
base_port = {base_port}
health_check_interval = 0.1
rise = 1
startup_timeout = 15
drain_timeout = 5
stop_timeout = 5
slow_start = 0

[server:dispatcher]
use = egg:waitress#main
listen = 127.0.0.1:0

[DEFAULT]
http_port = 6543
"""


def edit(path, text):
    """Rewrite ``path`` at least a second after its last change: that is the
    resolution of the bytecode cache's check (and a new length changes its
    size, the other thing checked)."""
    if path.exists():
        time.sleep(max(0.0, path.stat().st_mtime + 1 - time.time()))
    path.write_text(text)


class FakeMonitor:
    """A file monitor the test drives: ``change(path)`` is a detected edit."""

    def __init__(self, callback, **kw):
        self.callback = callback
        self.paths = set()
        self.stopped = False

    def add_path(self, path):
        self.paths.add(path)

    def start(self):
        pass

    def stop(self):
        self.stopped = True

    def join(self):
        pass


def touch(path, when):
    path.touch()
    os.utime(path, (when, when))


def test_a_change_is_one_rolling_restart_saying_what_changed(tmp_path):
    calls = []
    monitor = {}

    def factory(callback, **kw):
        monitor["it"] = FakeMonitor(callback, **kw)
        return monitor["it"]

    ini, views = tmp_path / "site.ini", tmp_path / "views.py"
    touch(ini, 1000)
    touch(views, 1000)
    watcher = Reloader([ini, views], calls.append, monitor_factory=factory)
    try:
        watcher.start()
        assert {str(ini), str(views)} <= monitor["it"].paths
        # Reported but not changed (the monitor's first look): nothing.
        monitor["it"].callback(str(ini))
        time.sleep(reloader.SETTLE * 2)
        assert calls == []
        # Two files in one edit: one restart, naming both.
        touch(ini, 2000)
        touch(views, 2000)
        monitor["it"].callback(str(ini))
        monitor["it"].callback(str(views))
        wait_until(lambda: calls, timeout=5)
        time.sleep(reloader.INTERVAL * 1.5)
        assert calls == ["site.ini, views.py changed"]
    finally:
        watcher.stop()
    assert monitor["it"].stopped
    assert not os.path.exists(watcher.modules_dir)


def test_a_change_the_monitor_has_not_seen_yet_counts(tmp_path):
    """A monitor takes its first look at a new file some time after it is
    given: a change before that is still one."""
    calls = []
    views = tmp_path / "views.py"
    touch(views, 1000)
    watcher = Reloader([views], calls.append, monitor_factory=FakeMonitor)
    try:
        watcher.start()
        touch(views, 2000)  # and the monitor says nothing
        wait_until(lambda: calls, timeout=5)
        assert calls == ["views.py changed"]
    finally:
        watcher.stop()


def test_a_change_during_another_operation_waits_for_it(tmp_path):
    calls = []

    def restart(why):
        calls.append(why)
        if len(calls) == 1:
            raise Busy("scale to 3", 1.0)

    app = tmp_path / "app.py"
    touch(app, 1000)
    watcher = Reloader([app], restart, monitor_factory=FakeMonitor)
    try:
        watcher.start()
        touch(app, 2000)
        # Refused once, then tried again (and taken) a second later.
        wait_until(lambda: len(calls) == 2, timeout=5)
        time.sleep(reloader.INTERVAL * 1.5)
        assert calls == ["app.py changed", "app.py changed"]
    finally:
        watcher.stop()


def test_the_files_an_instance_imported_are_watched(tmp_path):
    calls = []
    monitor = {}

    def factory(callback, **kw):
        monitor["it"] = FakeMonitor(callback, **kw)
        return monitor["it"]

    watcher = Reloader([], calls.append, monitor_factory=factory)
    try:
        unchanged, edited = tmp_path / "models.py", tmp_path / "views.py"
        touch(unchanged, 1000)
        touch(edited, 3000)  # after the instance imported it
        listed = os.path.join(watcher.modules_dir, "site-1.files")
        with open(listed, "w") as out:
            out.write(f"{unchanged}\n{edited}\n")
        os.utime(listed, (2000, 2000))
        watcher.start()
        wait_until(lambda: str(unchanged) in monitor["it"].paths, timeout=5)
        wait_until(lambda: calls, timeout=5)
        assert calls == ["views.py changed"]
    finally:
        watcher.stop()


def test_an_instance_lists_its_own_modules_and_the_failing_one(tmp_path, monkeypatch):
    monkeypatch.setenv(MODULES_ENV, str(tmp_path))
    broken = tmp_path / "broken.py"
    broken.write_text("def oops(:\n")
    try:
        compile(broken.read_text(), str(broken), "exec")
    except SyntaxError as exc:
        failure = exc
    write_module_list("site-7", failure)
    listed = (tmp_path / "site-7.files").read_text().splitlines()
    assert str(broken) in listed
    assert os.path.abspath(__file__) in listed  # imported, outside site-packages
    # The standard library and site-packages are nobody's edit.
    assert os.__file__ not in listed
    assert pytest.__file__ not in listed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_no_list_without_a_directory_to_write_it_in(tmp_path, monkeypatch):
    monkeypatch.delenv(MODULES_ENV, raising=False)
    write_module_list("site-1")
    assert list(tmp_path.iterdir()) == []


def text_served(url):
    try:
        response = get(url + "/text")
    except OSError:
        return None
    return response.text if response.status_code == 200 else None


def rollouts(process, outcome):
    """How many rolling restarts for an edit ended with ``outcome``."""
    return process.output().count(f"rolling restart (reloadme.py changed) {outcome}")


def test_edits_are_served_without_a_failed_request(processes, tmp_path):
    app = tmp_path / "reloadme.py"
    edit(app, APP.format(text="first"))
    ini = tmp_path / "site.ini"
    ini.write_text(INI.format(base_port=free_base_port()) + LOGGING_INI)
    process = processes.start(
        [BIN / "pyramid-lb", "serve", ini, "--reload"],
        name="dispatcher",
        env={"PYTHONPATH": str(tmp_path)},
    )
    url = f"http://127.0.0.1:{process.wait_for_output(SERVING).group(1)}"
    wait_until(lambda: text_served(url) == "first", timeout=20)
    wait_until(lambda: "2/2 instances ready" in process.output(), timeout=20)
    with Load(url, clients=3, path="/text") as load:
        wait_until(lambda: len(load.results) > 20, timeout=10)
        edit(app, APP.format(text="second, edited"))
        wait_until(lambda: text_served(url) == "second, edited", timeout=20)
        wait_until(lambda: rollouts(process, "done") == 1, timeout=20)
        assert text_served(url) == "second, edited"  # every instance by now

        # Broken code: the old instances keep serving, and one line says why.
        edit(app, APP.format(text="third, broken") + "def oops(:\n")
        line = process.wait_for_output(
            r"ERROR .*rolling restart \(reloadme\.py changed\) stopped: (.*)",
            timeout=20,
        ).group(1)
        assert "SyntaxError" in line and "reloadme.py, line 13)" in line, line
        assert "the old instances keep serving" in line
        assert text_served(url) == "second, edited"

        # Fixed: served again.
        edit(app, APP.format(text="fourth, fixed"))
        wait_until(lambda: text_served(url) == "fourth, fixed", timeout=20)
        wait_until(lambda: rollouts(process, "done") == 2, timeout=20)
        assert text_served(url) == "fourth, fixed"

        # The dispatcher's own settings: replaced instances, and a warning.
        edit(ini, ini.read_text().replace("drain_timeout = 5", "drain_timeout = 4"))
        process.wait_for_output(
            r"WARNING .*site\.ini: \[app:dispatcher\] or \[server:dispatcher\] "
            r"changed; the dispatcher's own settings change when pyramid-lb serve "
            r"starts again",
            timeout=20,
        )
        process.wait_for_output(r"rolling restart \(site\.ini changed\) done", 20)
    assert load.failures() == []
    texts = {text for _, text in load.results}
    assert texts <= {"first", "second, edited", "fourth, fixed"}
    assert "third, broken" not in texts
    assert "--reload: a change to site.ini, or to a module" in process.output()
    process.signal(signal.SIGTERM)
    assert process.wait(20) == 0
    # Nothing left behind.
    match = re.search(r"(/\S*pyramid_lb-reload-\w+)", process.output())
    assert match is None or not os.path.exists(match.group(1))


def test_reload_needs_instances_to_replace(processes, tmp_path):
    ini = tmp_path / "site.ini"
    ini.write_text(
        "[app:dispatcher]\nuse = egg:pyramid_lb#dispatcher\n"
        "backends = http://127.0.0.1:9\n\n"
        "[server:dispatcher]\nuse = egg:waitress#main\nlisten = 127.0.0.1:0\n"
    )
    process = processes.start(
        [BIN / "pyramid-lb", "serve", ini, "--reload"],
        name="dispatcher",
    )
    assert process.wait(15) == 1
    assert "--reload replaces the instances the dispatcher spawns" in (process.output())
