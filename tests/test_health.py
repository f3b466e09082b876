import re
import threading
import time

import pytest
import webtest
from pyramid import testing
from pyramid.exceptions import ConfigurationError
from pyramid.httpexceptions import HTTPNotFound
from pyramid.response import Response

from pyramid_lb import get_health
from pyramid_lb.health import FAIL, PASS, WARN, HealthCheck

LOOPBACK = {"REMOTE_ADDR": "127.0.0.1"}
OUTSIDER = {"REMOTE_ADDR": "192.0.2.10"}


def make_config(**settings):
    config = testing.setUp(settings=settings)
    config.include("pyramid_lb")
    return config


@pytest.fixture
def config():
    config = make_config(**{"pyramid_lb.check_cache": "0"})
    yield config
    testing.tearDown()


def make_app(config, **kw):
    kw.setdefault("extra_environ", LOOPBACK)
    return webtest.TestApp(config.make_wsgi_app(), **kw)


def failing():
    raise RuntimeError("database is down")


def test_ready_passes_once_configured(config):
    config.add_health_check("ok", lambda: None)
    app = make_app(config)
    response = app.get("/readyz")
    assert response.status_int == 200
    assert response.content_type == "application/health+json"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.json["status"] == PASS
    assert response.json["instance"] == get_health(config.registry).instance
    check = response.json["checks"]["ok"][0]
    assert check["status"] == PASS
    assert check["observedUnit"] == "ms"
    assert "T" in check["time"]


def test_not_ready_before_the_app_is_created(config):
    health = get_health(config.registry)
    assert health.report("readiness").status == FAIL
    config.make_wsgi_app()
    assert health.report("readiness").status == PASS


def test_failing_check_gives_503_and_names_it(config):
    config.add_health_check("db", failing)
    app = make_app(config)
    response = app.get("/readyz", status=503)
    assert response.json["status"] == FAIL
    assert response.json["checks"]["db"][0] == {
        **response.json["checks"]["db"][0],
        "status": FAIL,
        "output": "RuntimeError: database is down",
    }


def test_check_returning_false_fails(config):
    config.add_health_check("flag", lambda: False)
    response = make_app(config).get("/readyz", status=503)
    assert response.json["checks"]["flag"][0]["output"] == "check returned False"


def test_check_details_are_its_output(config):
    config.add_health_check("pool", lambda: {"connections": 3})
    response = make_app(config).get("/readyz")
    assert response.json["checks"]["pool"][0]["output"] == {"connections": 3}


def test_non_critical_failure_warns_with_200(config):
    config.add_health_check("cache", failing, critical=False)
    config.add_health_check("ok", lambda: True)
    response = make_app(config).get("/readyz", status=200)
    assert response.json["status"] == WARN
    assert response.json["checks"]["cache"][0]["status"] == WARN
    assert response.json["checks"]["ok"][0]["status"] == PASS


def test_details_hidden_from_clients_outside_the_allow_list(config):
    config.add_health_check("db", failing)
    get_health(config.registry).drain("maintenance")
    response = make_app(config, extra_environ=OUTSIDER).get("/readyz", status=503)
    assert response.json["checks"]["db"][0]["status"] == FAIL
    assert "output" not in response.json["checks"]["db"][0]
    assert "notes" not in response.json
    assert "maintenance" not in response.text


def test_details_allow_list_is_configurable():
    config = make_config(**{"pyramid_lb.health_details_allow": "192.0.2.0/24"})
    config.add_health_check("db", failing)
    app = make_app(config)
    assert "output" in app.get("/readyz", extra_environ=OUTSIDER, status=503).text
    assert "output" not in app.get("/readyz", status=503).text
    testing.tearDown()


def test_liveness_and_readiness_are_separate(config):
    config.add_health_check("db", failing)
    config.add_health_check("threads", lambda: "ok", kind="liveness")
    app = make_app(config)
    live = app.get("/healthz")
    assert live.json["status"] == PASS
    assert list(live.json["checks"]) == ["threads"]
    assert list(app.get("/readyz", status=503).json["checks"]) == ["db"]


def test_failing_liveness_check_gives_503(config):
    config.add_health_check("deadlock", failing, kind="liveness")
    assert make_app(config).get("/healthz", status=503).json["status"] == FAIL


def test_hung_check_fails_after_its_timeout(config):
    release = threading.Event()
    config.add_health_check("hung", release.wait, timeout=0.2)
    app = make_app(config)
    try:
        started = time.monotonic()
        response = app.get("/readyz", status=503)
        assert time.monotonic() - started < 0.2 + 0.5
        assert response.json["checks"]["hung"][0]["output"] == "no answer within 0.2s"
        # A second probe does not start a second copy of the hung check.
        threads = threading.active_count()
        app.get("/readyz", status=503)
        assert threading.active_count() == threads
    finally:
        release.set()


def test_checks_run_concurrently(config):
    for name in ("a", "b", "c"):
        config.add_health_check(name, lambda: time.sleep(0.3), timeout=2)
    app = make_app(config)
    started = time.monotonic()
    app.get("/readyz")
    assert time.monotonic() - started < 0.8


def test_results_are_cached_for_check_cache_seconds():
    calls = []
    config = make_config(**{"pyramid_lb.check_cache": "0.3"})
    config.add_health_check("db", lambda: calls.append(1))
    app = make_app(config)
    for _ in range(5):
        app.get("/readyz")
    assert len(calls) == 1
    time.sleep(0.35)
    app.get("/readyz")
    assert len(calls) == 2
    testing.tearDown()


def test_concurrent_probes_share_one_run():
    calls = []

    def slow_check():
        calls.append(1)
        time.sleep(0.2)

    check = HealthCheck("slow", slow_check, timeout=1, cache=0)
    runs = [check.begin() for _ in range(5)]
    results = [check.finish(run) for run in runs]
    assert len(calls) == 1
    assert {result.status for result in results} == {PASS}


def test_drain_api_fails_readiness_but_serves_requests(config):
    config.add_route("home", "/")
    config.add_view(lambda request: Response("hello"), route_name="home")
    app = make_app(config)
    health = get_health(config.registry)
    health.drain("deploying")
    response = app.get("/readyz", status=503)
    assert response.json["notes"] == ["deploying"]
    assert app.get("/").text == "hello"
    assert app.get("/healthz").status_int == 200
    health.resume()
    assert app.get("/readyz").status_int == 200


def test_drain_file(tmp_path):
    drain_file = tmp_path / "drain"
    config = make_config(**{"pyramid_lb.drain_file": str(drain_file)})
    app = make_app(config)
    assert app.get("/readyz").status_int == 200
    drain_file.touch()
    assert "drain file" in app.get("/readyz", status=503).json["output"]
    drain_file.unlink()
    assert app.get("/readyz").status_int == 200
    testing.tearDown()


def test_paths_are_configurable():
    config = make_config(
        **{"pyramid_lb.health_path": "/live", "pyramid_lb.ready_path": "/ops/ready"}
    )
    app = make_app(config)
    assert app.get("/live").json["status"] == PASS
    assert app.get("/ops/ready").json["status"] == PASS
    with pytest.raises(HTTPNotFound):  # an ordinary path now, with no route
        app.get("/healthz")
    testing.tearDown()


def test_endpoints_win_over_app_routes(config):
    config.add_route("catch_all", "/*rest")
    config.add_view(lambda request: Response("app"), route_name="catch_all")
    app = make_app(config)
    assert app.get("/readyz").content_type == "application/health+json"
    assert app.get("/anything").text == "app"


class Root(dict):
    __name__ = ""
    __parent__ = None


def test_endpoints_work_in_a_traversal_app(config):
    config.set_root_factory(lambda request: Root())
    config.add_view(lambda context, request: Response("root"), context=Root)
    app = make_app(config)
    assert app.get("/").text == "root"
    assert app.get("/healthz").json["status"] == PASS
    assert app.get("/readyz").json["status"] == PASS


def test_only_get_and_head(config):
    app = make_app(config)
    assert app.head("/readyz").body == b""
    response = app.post("/readyz", status=405)
    assert response.headers["Allow"] == "GET, HEAD"


def test_request_lb_instance(config, monkeypatch):
    config.add_route("me", "/me")
    config.add_view(lambda request: Response(request.lb_instance), route_name="me")
    app = make_app(config)
    assert app.get("/me").text == get_health(config.registry).instance


def test_instance_id_from_environment(monkeypatch):
    monkeypatch.setenv("PYRAMID_LB_INSTANCE", "web-3")
    config = make_config()
    assert make_app(config).get("/readyz").json["instance"] == "web-3"
    testing.tearDown()


def test_including_twice_is_harmless(config):
    config.include("pyramid_lb")
    assert make_app(config).get("/readyz").status_int == 200


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"kind": "startup"}, "kind = 'startup'", id="kind"),
        pytest.param({"timeout": 0}, "timeout = 0", id="zero timeout"),
        pytest.param({"timeout": "1"}, "timeout = '1'", id="string timeout"),
        pytest.param({"check": 42}, "check = 42 is not callable", id="not callable"),
        pytest.param(
            {"critical": "no"},
            "add_health_check('x'): critical = 'no' is not valid: expected True or "
            "False",
            id="critical as a string",
        ),
        pytest.param({"critical": 0}, "critical = 0 is not valid", id="critical 0"),
        pytest.param({"critical": None}, "critical = None", id="critical None"),
        pytest.param({"name": ""}, "name = '' is not valid", id="empty name"),
        pytest.param({"name": 7}, "name = 7 is not valid", id="name not a string"),
    ],
)
def test_add_health_check_rejects_bad_arguments(config, kwargs, message):
    kwargs = {"name": "x", "check": lambda: None, **kwargs}
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        config.add_health_check(**kwargs)


def test_dotted_name_check(config):
    config.add_health_check("dotted", "tests.test_health.failing")
    assert "database is down" in make_app(config).get("/readyz", status=503).text


def test_duplicate_check_name_conflicts():
    config = testing.setUp(autocommit=False)
    config.include("pyramid_lb")
    config.add_health_check("db", lambda: None)
    config.add_health_check("db", failing)
    with pytest.raises(ConfigurationError, match="db"):
        config.commit()
    testing.tearDown()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        pytest.param(
            "check_cache", "soon", "'soon' is not valid: expected a number", id="cache"
        ),
        pytest.param(
            "check_timeout", "0", "'0' is not valid: expected a number", id="timeout"
        ),
        pytest.param(
            "ready_path", "readyz", "expected an absolute path", id="relative path"
        ),
        pytest.param(
            "health_details_allow", "localhost", "'localhost' is not an IP", id="allow"
        ),
        pytest.param(
            "drain_on_sigterm", "-1", "'-1' is not valid", id="negative sigterm drain"
        ),
        pytest.param(
            "trusted_proxy_count", "ture", "'ture' is not valid", id="proxy count"
        ),
        pytest.param(
            "clear_untrusted",
            "ture",
            "'ture' is not valid: expected true/false",
            id="bool",
        ),
        pytest.param("check_cahce", "1", "unknown setting", id="unknown key"),
    ],
)
def test_bad_settings_stop_start_up(key, value, message):
    with pytest.raises(ConfigurationError, match=message) as info:
        make_config(**{f"pyramid_lb.{key}": value})
    assert f"pyramid_lb.{key}" in str(info.value)
    testing.tearDown()


def test_settings_are_written_back_typed(config):
    settings = config.get_settings()
    assert settings["pyramid_lb.check_cache"] == 0.0
    assert settings["pyramid_lb.ready_path"] == "/readyz"
    assert "127.0.0.1" in settings["pyramid_lb.health_details_allow"]
