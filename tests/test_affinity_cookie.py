import pytest

from pyramid_lb import affinity_cookie
from pyramid_lb.affinity_cookie import (
    DEFAULT_NAME,
    cookie_value,
    set_cookie,
    sign,
    verify,
    without_cookie,
)

SECRET = "s3cret"


def _b64(data: bytes) -> str:
    return affinity_cookie._b64(data)


@pytest.mark.parametrize(
    "instance",
    [
        pytest.param("web-1", id="plain"),
        pytest.param("10.0.0.5:6543", id="host and port"),
        pytest.param("ünïcode-ß", id="non-ascii"),
        pytest.param("", id="empty id"),
    ],
)
def test_sign_verify_round_trip(instance):
    value = sign(instance, SECRET)
    assert verify(value, SECRET) == instance
    assert value.count(".") == 1
    assert ";" not in value and " " not in value and '"' not in value


def test_sign_is_deterministic_and_keyed():
    assert sign("web-1", SECRET) == sign("web-1", SECRET)
    assert sign("web-1", SECRET) != sign("web-1", "other")
    assert sign("web-1", SECRET) != sign("web-2", SECRET)


def _forged_non_utf8() -> str:
    raw = b"\xff\xfeweb"
    return f"{_b64(raw)}.{_b64(affinity_cookie._mac(raw, SECRET))}"


def _tampered_id() -> str:
    mac = sign("web-1", SECRET).split(".")[1]
    return f"{_b64(b'web-2')}.{mac}"


def _tampered_mac() -> str:
    encoded, mac = sign("web-1", SECRET).split(".")
    flipped = ("A" if mac[0] != "A" else "B") + mac[1:]
    return f"{encoded}.{flipped}"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(_tampered_id(), id="tampered id"),
        pytest.param(_tampered_mac(), id="tampered mac"),
        pytest.param(sign("web-1", "other"), id="other secret"),
        pytest.param(sign("web-1", SECRET).split(".")[0], id="no dot"),
        pytest.param(sign("web-1", SECRET) + ".x", id="two dots"),
        pytest.param("a.b", id="bad base64 padding"),
        pytest.param("!!!.###", id="not base64 at all"),
        pytest.param("", id="empty"),
        pytest.param(None, id="none"),
        pytest.param(".", id="just a dot"),
        pytest.param(sign("w" * 400, SECRET), id="very long"),
        pytest.param(_forged_non_utf8(), id="non-utf-8 id"),
    ],
)
def test_verify_rejects(value):
    assert verify(value, SECRET) is None


def test_non_utf8_id_is_rejected_only_for_its_encoding():
    # The mac of _forged_non_utf8 is genuine: only the decoding refuses it.
    encoded, mac = _forged_non_utf8().split(".")
    raw = affinity_cookie._unb64(encoded)
    assert affinity_cookie._unb64(mac) == affinity_cookie._mac(raw, SECRET)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param("lb_affinity=abc", "abc", id="alone"),
        pytest.param("a=1; lb_affinity=abc; b=2", "abc", id="among others"),
        pytest.param("a=1;lb_affinity=abc;b=2", "abc", id="no spaces"),
        pytest.param('lb_affinity="abc"', "abc", id="quoted"),
        pytest.param("a=b c; lb_affinity=x", "x", id="malformed neighbour"),
        pytest.param("junk; lb_affinity=x", "x", id="neighbour without equals"),
        pytest.param('a="unclosed; lb_affinity=x', "x", id="unclosed quote before"),
        pytest.param("lb_affinity=first; lb_affinity=second", "first", id="dup"),
        pytest.param("lb_affinity=", "", id="empty value"),
        pytest.param("lb_affinity=a=b", "a=b", id="equals in value"),
        pytest.param("a=1; b=2", None, id="absent"),
        pytest.param("xlb_affinity=1; lb_affinityx=2", None, id="longer names"),
        pytest.param("lb_affinity", None, id="name without equals"),
        pytest.param("a=lb_affinity", None, id="name as a value"),
        pytest.param("", None, id="empty header"),
        pytest.param(None, None, id="no header"),
    ],
)
def test_cookie_value(header, expected):
    assert cookie_value(header, DEFAULT_NAME) == expected


def test_cookie_value_other_name():
    assert cookie_value("lb_affinity=a; srv=b", "srv") == "b"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param("a=1; lb_affinity=x; b=2", "a=1; b=2", id="middle"),
        pytest.param("lb_affinity=x", "", id="only one"),
        pytest.param("lb_affinity=x; lb_affinity=y; a=1", "a=1", id="duplicates"),
        pytest.param("a=b c;lb_affinity=x;;junk", "a=b c; junk", id="malformed kept"),
        pytest.param("a=1; b=2", "a=1; b=2", id="absent"),
    ],
)
def test_without_cookie(header, expected):
    assert without_cookie(header, DEFAULT_NAME) == expected


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param(
            {"value": "v"}, "lb_affinity=v; Path=/; HttpOnly; SameSite=Lax", id="set"
        ),
        pytest.param(
            {"value": "v", "path": "/app", "secure": True},
            "lb_affinity=v; Path=/app; HttpOnly; SameSite=Lax; Secure",
            id="secure under a root",
        ),
        pytest.param(
            {"value": "v", "path": ""},
            "lb_affinity=v; Path=/; HttpOnly; SameSite=Lax",
            id="empty path",
        ),
        pytest.param(
            {"value": None},
            "lb_affinity=; Max-Age=0; Path=/; HttpOnly; SameSite=Lax",
            id="delete",
        ),
        pytest.param(
            {"value": None, "path": "/app", "secure": True},
            "lb_affinity=; Max-Age=0; Path=/app; HttpOnly; SameSite=Lax; Secure",
            id="delete secure under a root",
        ),
    ],
)
def test_set_cookie(kwargs, expected):
    assert set_cookie(DEFAULT_NAME, **kwargs) == expected


def test_set_cookie_round_trips_through_cookie_value():
    header = set_cookie("srv", sign("web-1", SECRET))
    value = cookie_value(header.split(";")[0], "srv")
    assert verify(value, SECRET) == "web-1"
