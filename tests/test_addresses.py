import pytest

from pyramid_lb.addresses import AddressSet, is_unix_peer, parse_ip


@pytest.mark.parametrize(
    ("spec", "address", "inside"),
    [
        pytest.param("127.0.0.1", "127.0.0.1", True, id="exact v4"),
        pytest.param("127.0.0.1", "127.0.0.2", False, id="other v4"),
        pytest.param("10.0.0.0/8", "10.200.3.4", True, id="v4 network"),
        pytest.param("10.0.0.0/8", "11.0.0.1", False, id="outside v4 network"),
        pytest.param("::1", "::1", True, id="exact v6"),
        pytest.param("::1", "0:0:0:0:0:0:0:1", True, id="v6 long form"),
        pytest.param("[::1]", "::1", True, id="bracketed v6 spec"),
        pytest.param("2001:db8::/32", "2001:db8:1::5", True, id="v6 network"),
        pytest.param("127.0.0.1", "::ffff:127.0.0.1", True, id="v4-mapped"),
        pytest.param("::ffff:10.0.0.0/104", "10.1.1.1", True, id="v4-mapped net"),
        pytest.param("fe80::1", "fe80::1%eth0", True, id="scoped v6"),
        pytest.param("127.0.0.1", "localhost", False, id="unix peer not trusted"),
        pytest.param("unix", "localhost", True, id="unix peer (waitress)"),
        pytest.param("unix", "", True, id="unix peer (empty)"),
        pytest.param("unix", "127.0.0.1", False, id="unix word is not tcp"),
        pytest.param("*", "203.0.113.9", True, id="anyone"),
        pytest.param("*", "localhost", True, id="anyone incl. unix"),
        pytest.param("", "127.0.0.1", False, id="nobody"),
        pytest.param("127.0.0.1", "not-an-ip", False, id="garbage peer"),
    ],
)
def test_membership(spec, address, inside):
    addresses = AddressSet.parse(spec)
    assert (address in addresses) is inside
    assert (address in addresses) is inside  # cached verdict agrees


def test_parse_rejects_non_addresses():
    with pytest.raises(ValueError, match="'example.com' is not an IP address"):
        AddressSet.parse("127.0.0.1 example.com")


def test_value_semantics():
    one = AddressSet.parse("127.0.0.1, ::1")
    assert one == AddressSet.parse(["::1", "127.0.0.1"])
    assert hash(one) == hash(AddressSet.parse("::1 127.0.0.1"))
    assert one != AddressSet.parse("::1")
    assert one != "127.0.0.1 ::1"
    assert str(one) == "127.0.0.1 ::1"
    assert repr(one) == "AddressSet.parse('127.0.0.1 ::1')"
    assert bool(one) and not AddressSet.parse("")
    assert bool(AddressSet.parse("unix"))


def test_contains_ip():
    networks = AddressSet.parse("10.0.0.0/8")
    assert networks.contains_ip(parse_ip("10.0.0.1"))
    assert not networks.contains_ip(parse_ip("192.0.2.1"))


def test_unix_peer_detection():
    assert is_unix_peer("localhost")
    assert is_unix_peer("/run/app.sock")
    assert is_unix_peer(None)
    assert not is_unix_peer("127.0.0.1")
