"""The /_lb/ endpoints: in process (a dispatcher over instances that never run),
and over real sockets where the Host a browser sends matters."""

import http.client
import json

import pytest
import requests
import webtest

from pyramid_lb.dispatcher import make_dispatcher
from pyramid_lb.settings import SettingsError

ADMIN = {"X-Requested-With": "test"}


@pytest.fixture
def dispatcher():
    dispatcher = make_dispatcher(
        {}, backends="http://127.0.0.1:9 http://127.0.0.1:10 weight=2"
    )
    yield dispatcher
    dispatcher.stop()


@pytest.fixture
def app(dispatcher):
    return webtest.TestApp(dispatcher, extra_environ={"REMOTE_ADDR": "127.0.0.1"})


def test_stats(app):
    stats = app.get("/_lb/stats.json").json
    assert stats["strategy"] == "round_robin"
    assert [(i["id"], i["state"], i["weight"]) for i in stats["instances"]] == [
        ("127.0.0.1:9", "up", 1),
        ("127.0.0.1:10", "up", 2),
    ]


def test_refused_outside_the_allow_list(app):
    app.get("/_lb/stats.json", extra_environ={"REMOTE_ADDR": "192.0.2.8"}, status=403)
    app.post(
        "/_lb/reload",
        headers=ADMIN,
        extra_environ={"REMOTE_ADDR": "10.1.1.1"},
        status=403,
    )


def test_allow_list_is_configurable():
    dispatcher = make_dispatcher(
        {}, backends="http://127.0.0.1:9", admin_allow="192.0.2.0/24"
    )
    app = webtest.TestApp(dispatcher)
    app.get("/_lb/stats.json", extra_environ={"REMOTE_ADDR": "192.0.2.8"})
    app.get("/_lb/stats.json", extra_environ={"REMOTE_ADDR": "127.0.0.1"}, status=403)
    dispatcher.stop()


def test_actions_need_post_and_the_header(app):
    app.get("/_lb/reload", status=405)
    app.post("/_lb/stats.json", headers=ADMIN, status=405)
    response = app.post("/_lb/instances/127.0.0.1:9/drain", status=403)
    assert "X-Requested-With" in response.json["error"]


def test_drain_and_enable(app, dispatcher):
    app.post("/_lb/instances/127.0.0.1:9/drain", headers=ADMIN)
    backend = dispatcher.cluster.get("127.0.0.1:9")
    assert backend.held
    assert backend not in dispatcher.cluster.candidates()
    assert app.get("/_lb/stats.json").json["instances"][0]["state"] == "draining"
    app.post("/_lb/instances/127.0.0.1:9/enable", headers=ADMIN)
    assert backend in dispatcher.cluster.candidates()


@pytest.mark.parametrize(
    ("path", "status", "error"),
    [
        pytest.param("/_lb/instances/nope/drain", 404, "no instance 'nope'", id="id"),
        pytest.param(
            "/_lb/instances/127.0.0.1:9/fly", 404, "no action 'fly'", id="act"
        ),
        pytest.param("/_lb/nothing", 404, "nothing at /nothing", id="path"),
        pytest.param("/_lb/reload", 409, "spawns no instances", id="reload"),
        pytest.param("/_lb/scale?instances=3", 409, "spawns no instances", id="scale"),
    ],
)
def test_action_errors(app, path, status, error):
    response = app.post(path, headers=ADMIN, status=status)
    assert error in response.json["error"]


def test_lb_paths_are_never_forwarded(app):
    assert app.get("/_lb/").content_type == "text/html"  # the dashboard
    app.get("/_lb", status=404)
    app.get("/_lb/anything", status=404)
    app.post("/_lb/", status=405)


def test_restart_needs_a_spawned_instance(app):
    response = app.post("/_lb/instances/127.0.0.1:9/restart", headers=ADMIN, status=409)
    assert "not an instance this dispatcher spawned" in response.json["error"]


def test_metrics_are_prometheus_text(app):
    response = app.get("/_lb/metrics")
    assert response.content_type == "text/plain"
    assert "pyramid_lb_requests_total" in response.text


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        pytest.param({"Host": "localhost:80"}, True, id="localhost"),
        pytest.param({"Host": "localhost.:80"}, True, id="localhost, dot"),
        pytest.param({"Host": "127.0.0.1"}, True, id="ip, default port"),
        pytest.param({"Origin": "http://[::1]:80"}, True, id="ipv6 origin"),
        pytest.param({"Origin": "http://10.1.2.3"}, True, id="another ip"),
        pytest.param({"Host": "lb.example.com:8443"}, True, id="configured name"),
        pytest.param({"Origin": "https://lb.example.com"}, True, id="configured"),
        pytest.param({"Host": "other.example:9000"}, True, id="configured port"),
        pytest.param({"Host": "other.example:9001"}, False, id="another port"),
        pytest.param(
            {"Host": "evil.example:80", "Origin": "http://evil.example:80"},
            False,
            id="rebound page",
        ),
        pytest.param({"Host": "evil.example:80"}, False, id="rebound host"),
        pytest.param(
            {"Host": "localhost:80", "Origin": "http://evil.example"},
            False,
            id="origin wins over host",
        ),
        pytest.param({"Origin": "http://localhost:81"}, False, id="localhost port"),
        pytest.param({"Origin": "null"}, False, id="opaque origin"),
        pytest.param({"Host": "localhost:x"}, False, id="garbage"),
    ],
)
def test_actions_only_for_the_dispatchers_own_origin(headers, allowed):
    dispatcher = make_dispatcher(
        {},
        backends="http://127.0.0.1:9",
        admin_hosts="lb.example.com other.example:9000",
    )
    app = webtest.TestApp(dispatcher, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    try:
        response = app.post(
            "/_lb/instances/127.0.0.1:9/drain",
            headers={**ADMIN, **headers},
            status=200 if allowed else 403,
        )
    finally:
        dispatcher.stop()
    assert dispatcher.cluster.get("127.0.0.1:9").held is allowed
    if not allowed:
        assert "is not this dispatcher's address" in response.json["error"]
        assert "admin_hosts" in response.json["error"]


def test_admin_hosts_are_checked():
    with pytest.raises(SettingsError) as info:
        make_dispatcher({}, backends="http://127.0.0.1:9", admin_hosts="http://lb")
    assert str(info.value) == (
        "[app:dispatcher] admin_hosts: 'http://lb' is not a host name or name:port "
        "(e.g. lb.example.com or lb.example.com:8080)"
    )


def post_from(url, path, host, origin=None):
    """POST ``path`` with the Host (and Origin) a browser on another site sends."""
    address, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(address, int(port), timeout=10)
    headers = {"Host": host, "X-Requested-With": "XMLHttpRequest"}
    if origin:
        headers["Origin"] = origin
    try:
        conn.request("POST", path, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_a_rebound_page_cannot_act(processes):
    """DNS rebinding, over real sockets: evil.example now resolves to us."""
    backend = processes.backend("a1")
    _, url = processes.dispatcher([backend], admin_hosts="lb.test")
    port = url.rsplit(":", 1)[1]
    drain = f"/_lb/instances/127.0.0.1:{backend.url.rsplit(':', 1)[1]}/drain"
    status, answer = post_from(
        url, drain, f"evil.example:{port}", f"http://evil.example:{port}"
    )
    assert status == 403
    assert "Origin 'http://evil.example:" in answer["error"]
    stats = requests.get(url + "/_lb/stats.json", timeout=10).json()
    assert stats["instances"][0]["state"] == "up"
    # The dispatcher's own address, and a configured name, are obeyed.
    assert post_from(url, drain, f"127.0.0.1:{port}")[0] == 200
    enable = drain.replace("/drain", "/enable")
    assert post_from(url, enable, f"lb.test:{port}", f"http://lb.test:{port}")[0] == 200
