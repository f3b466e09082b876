"""The demo behind the dispatcher, as development.ini runs it: what its page
says a visitor sees is what the visitor sees."""

import os
import re
import signal

import requests

from tests.dispatcher.site import all_up, serve, stats, write_ini
from tests.processes import wait_until

AFFINITY = "pyramid_lb.affinity = session\npyramid_lb.affinity_secret = s3cret"
STICKY = "sticky = cookie\naffinity_secret = s3cret"


def visit(client, url):
    """GET the demo's page: (instance, visits, the sentence under the table)."""
    page = client.get(url + "/", timeout=10).text
    instance = re.search(r'<code id="instance">([^<]+)</code>', page)[1]
    visits = int(re.search(r'<td id="visits">(\d+)</td>', page)[1])
    story = re.search(r'<p id="story">([^<]+)</p>', page)[1]
    return instance, visits, story


def restarted(url, name, pid):
    """Whether instance ``name`` is up again in a process other than ``pid``."""
    return any(
        i["id"] == name and i["state"] == "up" and i["pid"] not in (pid, None)
        for i in stats(url)
    ) and all_up(url, 3)


def test_a_pinned_browser_keeps_its_session_when_its_instance_dies(processes, tmp_path):
    ini = write_ini(tmp_path, app_extra=AFFINITY, dispatcher_extra=STICKY)
    _, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 3), timeout=20)
    with requests.Session() as browser:
        seen = [visit(browser, url) for _ in range(3)]
        home = seen[0][0]
        # Pinned: every reload on one instance, the counter counting.
        assert [(i, v) for i, v, _ in seen] == [(home, 1), (home, 2), (home, 3)]
        assert seen[0][2].startswith(f"This browser is pinned to {home} ")
        pid = browser.get(url + "/whoami", timeout=10).json()["pid"]
        os.kill(pid, signal.SIGKILL)
        instance, visits, story = visit(browser, url)
        assert instance != home
        assert visits == 5  # /whoami counted one too
        assert story == (
            f"You were pinned to {home}, which is gone: {instance} took over and "
            "pinned you here, and the visits counter went on counting."
        )
        # Pinned to the new one now, even once the old one is back.
        wait_until(lambda: restarted(url, home, pid), timeout=20)
        assert [visit(browser, url)[:2] for _ in range(2)] == [
            (instance, 6),
            (instance, 7),
        ]
    # Without cookies, each request goes to the next instance.
    assert len({visit(requests, url)[0] for _ in range(3)}) == 3
