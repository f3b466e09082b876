"""Session affinity in the dispatcher."""

import os
import signal

import pytest
import requests

from pyramid_lb.affinity_cookie import sign
from pyramid_lb.dispatcher.cluster import DOWN, Backend, Cluster
from pyramid_lb.dispatcher.sticky import Sticky
from tests.dispatcher.site import all_up, serve, stats, write_ini
from tests.processes import wait_until

SECRET = "s3cret-for-tests"


@pytest.fixture
def cluster():
    return Cluster(
        [Backend(f"http://127.0.0.1:{port}", name=f"i{port}") for port in (9, 10)]
    )


def environ(cookie=None, scheme="http"):
    env = {"wsgi.url_scheme": scheme}
    if cookie is not None:
        env["HTTP_COOKIE"] = cookie
    return env


@pytest.mark.parametrize(
    ("cookie", "expected"),
    [
        pytest.param(None, (None, None), id="no cookie header"),
        pytest.param("other=1", (None, None), id="no affinity cookie"),
        pytest.param(f"lb_affinity={sign('i9', SECRET)}", ("i9", "i9"), id="pinned"),
        pytest.param(
            f"a=b c; lb_affinity={sign('i10', SECRET)}",
            ("i10", "i10"),
            id="messy header",
        ),
        pytest.param(f"lb_affinity={sign('i9', 'other')}", (None, None), id="forged"),
        pytest.param(
            "lb_affinity=" + sign("i9", SECRET).replace("aTk", "aTE"),
            (None, None),
            id="id changed",
        ),
        pytest.param("lb_affinity=garbage", (None, None), id="garbage"),
        pytest.param(f"lb_affinity={sign('gone', SECRET)}", (None, "gone"), id="gone"),
    ],
)
def test_pinned(cluster, cookie, expected):
    sticky = Sticky(cluster, "lb_affinity", SECRET)
    backend, pin = sticky.pinned(environ(cookie))
    assert (backend and backend.name, pin) == expected


def test_a_down_or_ejected_instance_does_not_keep_its_clients(cluster):
    sticky = Sticky(cluster, "lb_affinity", SECRET)
    pinned = environ(f"lb_affinity={sign('i9', SECRET)}")
    backend = cluster.get("i9")
    cluster.set_state(backend, DOWN)
    assert sticky.pinned(dict(pinned)) == (None, "i9")


def test_a_draining_instance_keeps_its_clients(cluster):
    sticky = Sticky(cluster, "lb_affinity", SECRET)
    backend = cluster.get("i9")
    cluster.hold(backend)
    assert backend not in cluster.candidates()
    assert sticky.pinned(environ(f"lb_affinity={sign('i9', SECRET)}"))[0] is backend


def test_cookie_mode_leaves_the_cookie_and_never_sets_one(cluster):
    sticky = Sticky(cluster, "lb_affinity", SECRET)
    env = environ(f"x=1; lb_affinity={sign('i9', SECRET)}")
    sticky.pinned(env)
    assert "lb_affinity" in env["HTTP_COOKIE"]
    assert sticky.cookie_for(env, cluster.get("i10"), "i9") is None


def test_insert_mode_takes_the_cookie_out_and_pins(cluster):
    sticky = Sticky(cluster, "lb_affinity", SECRET, insert=True)
    env = environ(f"x=1; lb_affinity={sign('i9', SECRET)}")
    assert sticky.pinned(env)[0].name == "i9"
    assert env["HTTP_COOKIE"] == "x=1"
    alone = environ("lb_affinity=whatever")
    sticky.pinned(alone)
    assert "HTTP_COOKIE" not in alone
    # Already pinned there: nothing to set; moved or new: a cookie.
    assert sticky.cookie_for(env, cluster.get("i9"), "i9") is None
    cookie = sticky.cookie_for(env, cluster.get("i10"), "i9")
    assert (
        cookie == f"lb_affinity={sign('i10', SECRET)}; Path=/; HttpOnly; SameSite=Lax"
    )
    secure = sticky.cookie_for(environ(scheme="https"), cluster.get("i10"), None)
    assert secure.endswith("; Secure")


# -- end to end: the demo's add-on pins, the dispatcher honours ------------------

AFFINITY = dict(
    app_extra="pyramid_lb.affinity = session\npyramid_lb.affinity_secret = " + SECRET,
    dispatcher_extra="sticky = cookie\naffinity_secret = " + SECRET,
)


@pytest.fixture
def site(processes, tmp_path):
    ini = write_ini(tmp_path, **AFFINITY)
    process, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 3), timeout=20)
    return process, url


def test_a_pinned_client_stays_and_others_are_balanced(site):
    _, url = site
    with requests.Session() as client:
        first = client.get(url + "/whoami", timeout=10)
        assert "lb_affinity" in first.cookies
        home = first.json()["instance"]
        seen = [client.get(url + "/whoami", timeout=10).json() for _ in range(100)]
    assert {w["instance"] for w in seen} == {home}
    assert [w["visits"] for w in seen] == list(range(2, 102))
    strangers = [requests.get(url + "/whoami", timeout=10).json() for _ in range(6)]
    assert len({w["instance"] for w in strangers}) == 3


def test_killing_the_pinned_instance_moves_the_client(site):
    process, url = site
    with requests.Session() as client:
        home = client.get(url + "/whoami", timeout=10).json()
        pid = next(i["pid"] for i in stats(url) if i["id"] == home["instance"])
        os.kill(pid, signal.SIGKILL)
        moved = client.get(url + "/whoami", timeout=10)
        assert moved.status_code == 200
        landed = moved.json()
        assert landed["instance"] != home["instance"]
        assert landed["moved_from"] == home["instance"]  # the app's event fired
        assert "lb_affinity" in moved.headers["Set-Cookie"]
        assert landed["visits"] == home["visits"] + 1  # the session came along
        after = [client.get(url + "/whoami", timeout=10).json() for _ in range(10)]
    assert {w["instance"] for w in after} == {landed["instance"]}
    assert {w["moved_from"] for w in after} == {None}
    assert f"client pinned to {home['instance']} moved to" in process.output()


def test_draining_the_pinned_instance_keeps_its_client_only(site):
    _, url = site
    with requests.Session() as client:
        home = client.get(url + "/whoami", timeout=10).json()["instance"]
        reply = requests.post(
            f"{url}/_lb/instances/{home}/drain",
            headers={"X-Requested-With": "test"},
            timeout=10,
        )
        assert reply.status_code == 200
        pinned = {
            client.get(url + "/whoami", timeout=10).json()["instance"]
            for _ in range(20)
        }
    strangers = {
        requests.get(url + "/whoami", timeout=10).json()["instance"] for _ in range(20)
    }
    assert pinned == {home}
    assert home not in strangers and len(strangers) == 2


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(sign("site-1", "not-the-secret"), id="other secret"),
        pytest.param(sign("site-1", SECRET)[:-2] + "AA", id="altered mac"),
        pytest.param("c2l0ZS0x.bm9wZQ", id="made up"),
        pytest.param("site-1", id="plain id"),
    ],
)
def test_a_forged_cookie_is_ignored(site, value):
    _, url = site
    responses = [
        requests.get(url + "/whoami", cookies={"lb_affinity": value}, timeout=10)
        for _ in range(6)
    ]
    assert [r.status_code for r in responses] == [200] * 6
    assert len({r.json()["instance"] for r in responses}) == 3


def test_the_demo_session_counter_keeps_counting(site):
    _, url = site
    with requests.Session() as client:
        visits = [
            client.get(url + "/whoami", timeout=10).json()["visits"] for _ in range(50)
        ]
    assert visits == list(range(1, 51))


# -- insert mode: the dispatcher pins, for apps without the add-on -----------------


def test_insert_mode_pins_without_the_add_on(processes):
    instances = [processes.backend(name) for name in ("s1", "s2", "s3")]
    process, url = processes.dispatcher(
        instances,
        sticky="insert",
        affinity_secret=SECRET,
        health_check_interval="0.1",
        rise="1",
        fall="1",
    )
    with requests.Session() as client:
        first = client.get(url + "/echo", timeout=10)
        home = first.json()["name"]
        assert first.headers["Cache-Control"] == "private"
        assert "HttpOnly" in first.headers["Set-Cookie"]
        echoes = [client.get(url + "/echo", timeout=10) for _ in range(20)]
        assert {e.json()["name"] for e in echoes} == {home}
        assert all("Set-Cookie" not in e.headers for e in echoes)
        # The instance never sees the dispatcher's cookie.
        assert all(
            "lb_affinity" not in e.json()["headers"].get("Cookie", "") for e in echoes
        )
        next(i for i in instances if i.name == home).kill()
        moved = client.get(url + "/echo", timeout=10)
        assert moved.status_code == 200
        assert moved.json()["name"] != home
        assert "lb_affinity" in moved.headers["Set-Cookie"]
