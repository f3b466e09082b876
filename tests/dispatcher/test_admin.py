"""The /_lb/ endpoints, in process (a dispatcher over instances that never run)."""

import pytest
import webtest

from pyramid_lb.dispatcher import make_dispatcher

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
