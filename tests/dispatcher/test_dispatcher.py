"""The paste factory of ``egg:pyramid_lb#dispatcher`` and its settings."""

import pytest
from paste.deploy import loadapp

from pyramid_lb.dispatcher import Dispatcher, main
from pyramid_lb.dispatcher.balancer import ConsistentHash, WeightedRoundRobin
from pyramid_lb.dispatcher.config import parse_dispatcher
from pyramid_lb.settings import SettingsError
from tests.processes import BIN


def make(**settings):
    dispatcher = main({}, **settings)
    dispatcher.stop()
    return dispatcher


def test_entry_point_builds_a_dispatcher(tmp_path):
    ini = tmp_path / "lb.ini"
    ini.write_text(
        "[app:dispatcher]\nuse = egg:pyramid_lb#dispatcher\n"
        "backends = http://127.0.0.1:9 http://127.0.0.1:10 weight=3\n"
        "strategy = weighted_round_robin\n"
    )
    dispatcher = loadapp(f"config:{ini}", name="dispatcher")
    dispatcher.stop()
    assert isinstance(dispatcher, Dispatcher)
    assert [(b.port, b.weight) for b in dispatcher.cluster.backends] == [
        (9, 1),
        (10, 3),
    ]
    assert isinstance(dispatcher.strategy, WeightedRoundRobin)


def test_hash_options_reach_the_strategy():
    dispatcher = make(
        backends="http://127.0.0.1:9",
        strategy="hash",
        hash_key="cookie:session",
        hash_balance="1.5",
    )
    assert isinstance(dispatcher.strategy, ConsistentHash)
    assert dispatcher.strategy.balance == 1.5


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        pytest.param({}, "no instances to balance over", id="no backends"),
        pytest.param(
            {"backends": "127.0.0.1:9"},
            "backends = '127.0.0.1:9' is not valid",
            id="no scheme",
        ),
        pytest.param(
            {"backends": "https://127.0.0.1:9"},
            "only http:// instances",
            id="https",
        ),
        pytest.param(
            {"backends": "http://127.0.0.1:9/app"},
            "expected http://host:port with no path",
            id="path",
        ),
        pytest.param(
            {"backends": "http://127.0.0.1:99999"},
            "port is not a number from 1 to 65535",
            id="port",
        ),
        pytest.param(
            {"backends": "weight=2 http://127.0.0.1:9"},
            "'weight=2' is not understood",
            id="weight first",
        ),
        pytest.param(
            {"backends": "http://127.0.0.1:9 weight=0"},
            "an integer from 1 to 1000",
            id="weight zero",
        ),
        pytest.param(
            {"backends": "http://127.0.0.1:9", "strategy": "fastest"},
            "strategy = 'fastest' is not valid: expected one of round_robin",
            id="strategy",
        ),
        pytest.param(
            {"backends": "http://127.0.0.1:9", "hash_key": "ip"},
            "hash_key = 'ip' is not valid",
            id="hash key",
        ),
        pytest.param(
            {"backends": "http://127.0.0.1:9", "retry_budget": "2"},
            "retry_budget = '2' is not valid: expected a fraction",
            id="budget",
        ),
        pytest.param(
            {"backends": "http://127.0.0.1:9", "max_body_size": "lots"},
            "max_body_size = 'lots' is not valid: expected a size",
            id="size",
        ),
        pytest.param(
            {"backends": "http://127.0.0.1:9", "read_timout": "5"},
            "unknown setting 'read_timout'",
            id="typo",
        ),
    ],
)
def test_bad_settings_name_key_and_value(settings, message):
    with pytest.raises(SettingsError, match=r"^\[app:dispatcher\] ") as info:
        make(**settings)
    assert message in str(info.value)


def test_sizes_and_ratios():
    values = parse_dispatcher(
        {"max_body_size": "100M", "retry_budget": "25%", "hash_balance": "2"}
    )
    assert values.max_body_size == 100 << 20
    assert values.retry_budget == 0.25
    assert values.hash_balance == 2.0


def test_bad_key_stops_pserve_with_one_clear_line(processes, tmp_path):
    ini = tmp_path / "bad.ini"
    ini.write_text(
        "[app:main]\nuse = egg:pyramid_lb#dispatcher\n"
        "backends = http://127.0.0.1:9\nstrategy = fastest\n\n"
        "[server:main]\nuse = egg:waitress#main\nport = 0\n"
    )
    process = processes.start([BIN / "pserve", ini], name="pserve")
    assert process.wait(15) != 0
    assert "strategy = 'fastest' is not valid" in process.output()
