import pytest
import webtest
from pyramid import testing
from pyramid.exceptions import ConfigurationError
from pyramid.httpexceptions import (
    HTTPForbidden,
    HTTPNotFound,
    default_exceptionresponse_view,
)
from pyramid.interfaces import IExceptionResponse, ITweens
from pyramid.response import Response
from pyramid.session import SignedCookieSessionFactory

from pyramid_lb.affinity import AffinityMoved, affinity_tween_factory
from pyramid_lb.affinity_cookie import set_cookie, sign

SECRET = "s3cret"
HERE, GONE = "web-1", "web-2"
PINNED_HERE = sign(HERE, SECRET)
PINNED_GONE = sign(GONE, SECRET)
SET_HERE = set_cookie("lb_affinity", PINNED_HERE)
DELETE = set_cookie("lb_affinity", None)


def make_config(monkeypatch, mode="session", secret=SECRET, **settings):
    monkeypatch.setenv("PYRAMID_LB_INSTANCE", HERE)
    settings["pyramid_lb.affinity"] = mode
    if secret is not None:
        settings["pyramid_lb.affinity_secret"] = secret
    config = testing.setUp(settings=settings)
    config.include("pyramid_lb")
    # What a real Configurator registers, and testing.setUp does not.
    config.add_view(default_exceptionresponse_view, context=IExceptionResponse)
    config.set_session_factory(SignedCookieSessionFactory("session secret"))
    return config


@pytest.fixture
def configure(monkeypatch):
    """``configure(mode, **settings)``: an app config with the add-on included."""
    try:
        yield lambda *args, **kw: make_config(monkeypatch, *args, **kw)
    finally:
        testing.tearDown()


def add_views(config, **views):
    for name, view in views.items():
        config.add_route(name, "/" + name)
        config.add_view(view, route_name=name)


def make_app(config, **kw):
    return webtest.TestApp(config.make_wsgi_app(), **kw)


def affinity_cookies(response, name="lb_affinity"):
    return [
        value
        for value in response.headers.getall("Set-Cookie")
        if value.startswith(name + "=")
    ]


def plain(request):
    return Response("ok")


def peek(request):
    """Looks at the session without storing anything."""
    return Response(str(request.session.get("n", 0)))


def count(request):
    request.session["n"] = request.session.get("n", 0) + 1
    return Response(str(request.session["n"]))


def logout(request):
    request.session.invalidate()
    request.lb_unpin()
    return Response("bye")


def login(request):
    request.lb_pin()
    return Response("hi")


# -- the modes ----------------------------------------------------------------


def test_session_mode_pins_once_the_session_holds_data(configure):
    config = configure("session")
    add_views(config, plain=plain, peek=peek, count=count)
    app = make_app(config)  # keeps cookies like a browser
    assert affinity_cookies(app.get("/plain")) == []
    assert affinity_cookies(app.get("/peek")) == []
    assert affinity_cookies(app.get("/count")) == [SET_HERE]
    assert affinity_cookies(app.get("/count")) == []
    assert affinity_cookies(app.get("/plain")) == []
    assert app.get("/peek").text == "2"
    assert app.cookies["lb_affinity"] == PINNED_HERE


def test_session_mode_never_creates_a_session(configure):
    config = configure("session")
    add_views(config, plain=plain)
    response = make_app(config).get("/plain")
    assert response.headers.getall("Set-Cookie") == []


def test_always_mode_pins_every_client_once(configure):
    config = configure("always")
    add_views(config, plain=plain)
    app = make_app(config)
    assert affinity_cookies(app.get("/plain")) == [SET_HERE]
    assert affinity_cookies(app.get("/plain")) == []
    assert affinity_cookies(app.get("/plain")) == []


def test_off_mode_pins_nothing_by_itself(configure):
    config = configure("off")
    add_views(config, plain=plain, count=count)
    app = make_app(config)
    assert affinity_cookies(app.get("/plain")) == []
    assert affinity_cookies(app.get("/count")) == []


def test_probes_never_get_the_cookie(configure):
    config = configure("always")
    app = make_app(config, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    assert affinity_cookies(app.get("/healthz")) == []
    assert affinity_cookies(app.get("/readyz")) == []


def test_cookie_name_is_configurable(configure):
    config = configure("always", **{"pyramid_lb.affinity_cookie": "srv"})
    add_views(config, plain=plain)
    response = make_app(config).get("/plain")
    assert affinity_cookies(response, "srv") == [set_cookie("srv", PINNED_HERE)]
    assert affinity_cookies(response) == []


def test_a_pin_among_malformed_cookies_is_still_seen(configure):
    config = configure("always")
    add_views(config, plain=plain)
    cookie = f"tracker=a b c; lb_affinity={PINNED_HERE}; other"
    response = make_app(config).get("/plain", headers={"Cookie": cookie})
    assert affinity_cookies(response) == []


# -- pinning and unpinning explicitly -----------------------------------------


@pytest.mark.parametrize("mode", ["session", "always", "off"])
def test_pin_and_unpin(configure, mode):
    config = configure(mode)
    add_views(config, login=login, logout=logout, plain=plain)
    app = make_app(config)
    assert affinity_cookies(app.get("/login")) == [SET_HERE]
    assert affinity_cookies(app.get("/login")) == []  # pinned here already
    assert affinity_cookies(app.get("/logout")) == [DELETE]
    assert "lb_affinity" not in app.cookies
    assert affinity_cookies(app.get("/logout")) == []  # nothing left to delete


@pytest.mark.parametrize(
    ("mode", "view", "cookie"),
    [
        pytest.param("always", plain, None, id="always"),
        pytest.param("session", count, None, id="session with data"),
        pytest.param("session", plain, PINNED_GONE, id="moved client"),
    ],
)
def test_unpin_beats_automatic_pinning(configure, mode, view, cookie):
    def view_then_unpin(request):
        response = view(request)
        request.lb_unpin()
        return response

    config = configure(mode)
    add_views(config, page=view_then_unpin)
    headers = {"Cookie": f"lb_affinity={cookie}"} if cookie else {}
    response = make_app(config).get("/page", headers=headers)
    assert affinity_cookies(response) == ([DELETE] if cookie else [])


@pytest.mark.parametrize(
    ("calls", "expected"),
    [
        pytest.param(["lb_pin", "lb_unpin"], [], id="pin then unpin"),
        pytest.param(["lb_unpin", "lb_pin"], [SET_HERE], id="unpin then pin"),
    ],
)
def test_the_last_call_wins(configure, calls, expected):
    def view(request):
        for call in calls:
            getattr(request, call)()
        return Response("ok")

    config = configure("off")
    add_views(config, page=view)
    assert affinity_cookies(make_app(config).get("/page")) == expected


def test_unpin_deletes_a_forged_cookie_too(configure):
    config = configure("off")
    add_views(config, logout=logout)
    response = make_app(config).get("/logout", headers={"Cookie": "lb_affinity=x.y"})
    assert affinity_cookies(response) == [DELETE]


# -- cookie attributes ----------------------------------------------------------


def test_secure_on_https(configure):
    config = configure("always")
    add_views(config, plain=plain, logout=logout)
    app = make_app(config, extra_environ={"wsgi.url_scheme": "https"})
    assert affinity_cookies(app.get("/plain")) == [
        set_cookie("lb_affinity", PINNED_HERE, secure=True)
    ]
    headers = {"Cookie": f"lb_affinity={PINNED_HERE}"}
    assert affinity_cookies(app.get("/logout", headers=headers)) == [
        set_cookie("lb_affinity", None, secure=True)
    ]


def test_not_secure_on_http(configure):
    config = configure("always")
    add_views(config, plain=plain)
    (header,) = affinity_cookies(make_app(config).get("/plain"))
    assert "Secure" not in header
    assert "HttpOnly" in header and "SameSite=Lax" in header
    assert "Max-Age" not in header and "Expires" not in header


def test_path_is_the_app_root(configure):
    config = configure("always")
    add_views(config, plain=plain, logout=logout)
    app = make_app(config, extra_environ={"SCRIPT_NAME": "/shop"})
    response = app.get("/shop/plain")
    assert affinity_cookies(response) == [
        set_cookie("lb_affinity", PINNED_HERE, path="/shop")
    ]
    headers = {"Cookie": f"lb_affinity={PINNED_HERE}"}
    assert affinity_cookies(app.get("/shop/logout", headers=headers)) == [
        set_cookie("lb_affinity", None, path="/shop")
    ]


# -- clients whose instance went away -------------------------------------------


def collect_moves(config):
    events = []
    config.add_subscriber(events.append, AffinityMoved)
    return events


@pytest.mark.parametrize(
    ("mode", "repinned"),
    [
        pytest.param("session", True, id="session"),
        pytest.param("always", True, id="always"),
        pytest.param("off", False, id="off: the app decides"),
    ],
)
def test_a_moved_client_fires_the_event_and_is_repinned(configure, mode, repinned):
    config = configure(mode)
    events = collect_moves(config)
    seen_by_view = []

    def view(request):
        seen_by_view.append(list(events))
        return Response("ok")

    add_views(config, page=view)
    response = make_app(config).get(
        "/page", headers={"Cookie": f"a=1; lb_affinity={PINNED_GONE}"}
    )
    assert response.status_int == 200
    (event,) = events
    assert (event.previous, event.current) == (GONE, HERE)
    assert event.request.path_info == "/page"
    assert seen_by_view == [[event]]  # notified before the view ran
    assert affinity_cookies(response) == ([SET_HERE] if repinned else [])


def test_the_event_fires_once_per_move(configure):
    config = configure("session")
    events = collect_moves(config)
    add_views(config, plain=plain)
    app = make_app(config)
    cookie = f"lb_affinity={PINNED_GONE}"
    for _ in range(3):
        response = app.get("/plain", headers={"Cookie": cookie})
        for header in affinity_cookies(response):
            cookie = header.split(";")[0]
    assert len(events) == 1
    assert cookie == f"lb_affinity={PINNED_HERE}"


def test_in_off_mode_a_subscriber_can_repin(configure):
    config = configure("off")
    config.add_subscriber(lambda event: event.request.lb_pin(), AffinityMoved)
    add_views(config, plain=plain)
    response = make_app(config).get(
        "/plain", headers={"Cookie": f"lb_affinity={PINNED_GONE}"}
    )
    assert affinity_cookies(response) == [SET_HERE]


def _tampered_id():
    forged = sign(GONE, "guessed secret").split(".")[0]
    return f"{forged}.{PINNED_HERE.split('.')[1]}"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(sign(GONE, "guessed secret"), id="other secret"),
        pytest.param(_tampered_id(), id="tampered id"),
        pytest.param(PINNED_GONE[:-2] + "AA", id="tampered mac"),
        pytest.param("web-2", id="bare instance id"),
        pytest.param("a.b.c", id="garbage"),
        pytest.param("", id="empty"),
        pytest.param("x" * 5000, id="very long"),
    ],
)
@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        pytest.param("session", [], id="session"),
        pytest.param("always", [SET_HERE], id="always"),
    ],
)
def test_a_forged_cookie_is_ignored(configure, value, mode, expected):
    config = configure(mode)
    events = collect_moves(config)
    add_views(config, plain=plain)
    response = make_app(config).get(
        "/plain", headers={"Cookie": f"lb_affinity={value}"}
    )
    assert response.status_int == 200
    assert events == []
    assert affinity_cookies(response) == expected


def test_a_genuine_but_oddly_encoded_pin_here_is_no_move(configure):
    config = configure("always")
    events = collect_moves(config)
    add_views(config, plain=plain)
    padded = PINNED_HERE + "=="  # same bytes once decoded, same mac
    response = make_app(config).get(
        "/plain", headers={"Cookie": f"lb_affinity={padded}"}
    )
    assert events == []
    assert affinity_cookies(response) == [SET_HERE]  # normalized


# -- error responses --------------------------------------------------------------


def raise_not_found(request):
    raise HTTPNotFound()


def count_then_forbid(request):
    count(request)
    raise HTTPForbidden()


def pin_then_fail(request):
    request.lb_pin()
    raise ValueError("boom")


@pytest.mark.parametrize(
    ("mode", "view", "status"),
    [
        pytest.param("always", raise_not_found, 404, id="raised HTTPNotFound"),
        pytest.param("always", None, 404, id="no such route"),
        pytest.param("session", count_then_forbid, 403, id="session then 403"),
        pytest.param("off", pin_then_fail, 500, id="exception view"),
    ],
)
def test_error_responses_get_the_cookie(configure, mode, view, status):
    config = configure(mode)
    if view is not None:
        add_views(config, page=view)
    config.add_view(
        lambda exc, request: Response("sorry", status=500), context=ValueError
    )
    response = make_app(config).get("/page", status=status)
    assert affinity_cookies(response) == [SET_HERE]


def test_an_unhandled_exception_goes_through(configure):
    config = configure("always")
    add_views(config, page=pin_then_fail)
    with pytest.raises(ValueError, match="boom"):
        make_app(config).get("/page")


# -- configuration ----------------------------------------------------------------


def test_the_tween_sits_under_health_and_over_excview(configure):
    config = configure("always")
    config.commit()
    names = [name for name, _ in config.registry.queryUtility(ITweens).implicit()]
    assert names[-3:] == [
        "pyramid_lb.health.health_tween_factory",
        "pyramid_lb.affinity.affinity_tween_factory",
        "pyramid.tweens.excview_tween_factory",
    ]


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        pytest.param(
            {"mode": "session", "secret": None},
            "pyramid_lb.affinity_secret",
            id="session without secret",
        ),
        pytest.param(
            {"mode": "always", "secret": "  "},
            "pyramid_lb.affinity_secret",
            id="always with a blank secret",
        ),
        pytest.param({"mode": "sometimes"}, "pyramid_lb.affinity", id="bad mode"),
        pytest.param(
            {"pyramid_lb.affinity_cookie": "lb affinity"},
            "pyramid_lb.affinity_cookie",
            id="bad cookie name",
        ),
    ],
)
def test_bad_settings_stop_start_up(configure, settings, key):
    with pytest.raises(ConfigurationError, match=key):
        configure(**settings)


@pytest.mark.parametrize("method", ["lb_pin", "lb_unpin"])
def test_off_without_secret_costs_nothing(configure, method):
    config = configure("off", secret=None)
    events = collect_moves(config)

    def handler(request):
        raise AssertionError("not called")

    assert affinity_tween_factory(handler, config.registry) is handler

    def view(request):
        getattr(request, method)()

    add_views(config, page=view, count=count)
    app = make_app(config)
    cookie = {"Cookie": f"lb_affinity={PINNED_GONE}"}
    assert affinity_cookies(app.get("/count", headers=cookie)) == []
    assert events == []
    with pytest.raises(
        RuntimeError, match=rf"{method}\(\).*pyramid_lb.affinity_secret"
    ):
        app.get("/page")


def test_off_with_a_secret_keeps_the_tween(configure):
    config = configure("off")

    def handler(request):
        raise AssertionError("not called")

    assert affinity_tween_factory(handler, config.registry) is not handler


def test_a_pinning_response_is_private_unless_the_app_said_otherwise(monkeypatch):
    monkeypatch.setenv("PYRAMID_LB_INSTANCE", "web-1")
    config = testing.setUp(
        settings={
            "pyramid_lb.affinity": "always",
            "pyramid_lb.affinity_secret": "s" * 16,
        }
    )
    config.include("pyramid_lb")
    config.add_route("plain", "/plain")
    config.add_view(lambda request: Response("x"), route_name="plain")
    config.add_route("cached", "/cached")

    def cached(request):
        response = Response("x")
        response.cache_control = "public, max-age=60"
        return response

    config.add_view(cached, route_name="cached")
    app = webtest.TestApp(config.make_wsgi_app())
    assert app.get("/plain").headers["Cache-Control"] == "private"
    assert app.get("/cached").headers["Cache-Control"] == "public, max-age=60"
    testing.tearDown()
