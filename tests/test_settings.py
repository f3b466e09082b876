import re
from pathlib import Path

import pytest

from pyramid_lb import ADDON_SETTINGS, forwarded, parse_addon, reference, settings
from pyramid_lb.dispatcher.config import DISPATCHER_SETTINGS, parse_dispatcher
from pyramid_lb.settings import ADDON_PREFIX, Setting, SettingsError, parse

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize(
    ("convert", "raw", "expected"),
    [
        pytest.param(settings.boolean, "true", True, id="bool true"),
        pytest.param(settings.boolean, " Off ", False, id="bool off"),
        pytest.param(settings.boolean, False, False, id="bool typed"),
        pytest.param(settings.integer(1), "3", 3, id="int"),
        pytest.param(settings.integer(1), 7, 7, id="int typed"),
        pytest.param(settings.integer(1, 9), "+9", 9, id="int upper bound"),
        pytest.param(settings.seconds(), "1.5", 1.5, id="seconds"),
        pytest.param(settings.seconds(), "250ms", 0.25, id="milliseconds"),
        pytest.param(settings.seconds(), "2s", 2.0, id="seconds suffix"),
        pytest.param(settings.seconds(), 3, 3.0, id="seconds typed"),
        pytest.param(settings.optional(settings.integer()), " ", None, id="optional"),
        pytest.param(settings.one_of("a", "b"), "B", "b", id="one of"),
        pytest.param(settings.words, "a, b c", ("a", "b", "c"), id="words"),
        pytest.param(settings.words, ["a", 1], ("a", "1"), id="words typed"),
        pytest.param(settings.url_path, "/ops/ready", "/ops/ready", id="path"),
        pytest.param(forwarded.proxy_count, "AUTO", "auto", id="auto"),
        pytest.param(forwarded.proxy_count, "2", 2, id="count"),
        pytest.param(
            forwarded.header_names,
            "Forwarded",
            frozenset({"forwarded"}),
            id="header names",
        ),
    ],
)
def test_converters(convert, raw, expected):
    assert convert(raw) == expected


@pytest.mark.parametrize(
    ("convert", "raw", "message"),
    [
        pytest.param(settings.boolean, "ture", "expected true/false", id="bool typo"),
        pytest.param(settings.boolean, "", "expected true/false", id="bool empty"),
        pytest.param(settings.integer(1), "0", "integer >= 1", id="int too small"),
        pytest.param(settings.integer(1, 9), "10", "from 1 to 9", id="int too big"),
        pytest.param(settings.integer(), "1.5", "an integer", id="int float"),
        pytest.param(settings.integer(), True, "an integer", id="int bool"),
        pytest.param(settings.integer(), "١", "an integer", id="int non-ascii"),
        pytest.param(settings.seconds(), "soon", "e.g. 1.5", id="seconds word"),
        pytest.param(settings.seconds(), "-1", "0 or more", id="negative"),
        pytest.param(settings.seconds(), "nan", "0 or more", id="nan"),
        pytest.param(settings.seconds(), True, "seconds", id="seconds bool"),
        pytest.param(
            settings.seconds(allow_zero=False), "0", "greater than 0", id="zero"
        ),
        pytest.param(settings.one_of("a", "b"), "c", "one of a, b", id="one of"),
        pytest.param(settings.url_path, "//x", "absolute path", id="path"),
        pytest.param(settings.url_path, "/a b", "absolute path", id="path space"),
        pytest.param(forwarded.proxy_count, "0", "or 'auto'", id="count"),
        pytest.param(
            forwarded.header_names, "x-client-ip", "'x-client-ip'", id="header"
        ),
        pytest.param(settings.addresses, "10.0.0.300", "'10.0.0.300'", id="address"),
    ],
)
def test_converters_reject(convert, raw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        convert(raw)


TABLE = (
    Setting("size", settings.integer(1), "3", "A size."),
    Setting("name", settings.optional(settings.text), None, "A name."),
)


def test_parse_fills_defaults_and_converts():
    assert parse(TABLE, {"x.size": "5", "other": "kept"}, "x.") == {
        "x.size": 5,
        "x.name": None,
    }


def test_parse_names_key_and_value():
    with pytest.raises(SettingsError) as info:
        parse(TABLE, {"x.size": "many"}, "x.")
    assert str(info.value) == ("x.size = 'many' is not valid: expected an integer >= 1")


def test_parse_rejects_unknown_keys_by_name():
    with pytest.raises(SettingsError) as info:
        parse(TABLE, {"x.szie": "5"}, "x.")
    assert str(info.value) == "unknown setting 'x.szie'; did you mean 'x.size'?"


def test_parse_lists_a_short_table_when_nothing_is_close():
    with pytest.raises(SettingsError) as info:
        parse(TABLE, {"x.colour": "red"}, "x.")
    assert str(info.value) == (
        "unknown setting 'x.colour'; known settings: x.name, x.size"
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(
            {"stratgy": "hash"},
            "unknown setting 'stratgy'; did you mean 'strategy'?",
            id="typo",
        ),
        pytest.param(
            {"colour": "red"},
            "unknown setting 'colour'; it is none of the "
            f"{len(DISPATCHER_SETTINGS)} known settings "
            "(`pyramid-lb serve --help` lists them)",
            id="nothing close",
        ),
    ],
)
def test_unknown_key_of_a_long_table_is_one_short_line(raw, message):
    with pytest.raises(SettingsError) as info:
        parse_dispatcher(raw)
    assert str(info.value) == message
    assert len(str(info.value)) < 120


def test_unknown_add_on_key_is_compared_without_the_prefix():
    # With the prefix, every pyramid_lb.* key would look close to any other.
    with pytest.raises(SettingsError) as info:
        parse_addon({"pyramid_lb.colour": "red"})
    assert "did you mean" not in str(info.value)
    assert f"none of the {len(ADDON_SETTINGS)} known pyramid_lb.* settings" in str(
        info.value
    )
    with pytest.raises(SettingsError, match="did you mean 'pyramid_lb.check_cache'"):
        parse_addon({"pyramid_lb.check_cahce": "1"})


def test_parse_can_let_unknown_keys_pass():
    assert parse(TABLE, {"x.szie": "5"}, "x.", reject_unknown=False)["x.size"] == 3


def test_every_default_is_valid():
    values = parse_addon({})
    assert set(values) == {ADDON_PREFIX + s.name for s in ADDON_SETTINGS}


def test_forwarded_cannot_mix_with_x_forwarded():
    with pytest.raises(SettingsError, match="pyramid_lb.trusted_headers"):
        parse_addon({"pyramid_lb.trusted_headers": "forwarded x-forwarded-for"})


def test_auto_count_refused_with_anyone():
    with pytest.raises(SettingsError) as info:
        parse_addon(
            {
                "pyramid_lb.trusted_proxy_count": "auto",
                "pyramid_lb.trusted_proxies": "*",
            }
        )
    assert "pyramid_lb.trusted_proxy_count" in str(info.value)
    assert "pyramid_lb.trusted_proxies" in str(info.value)


def readme_block(name):
    text = README.read_text()
    match = re.search(
        rf"<!-- settings:{name} -->\n(.*?)\n<!-- /settings:{name} -->", text, re.S
    )
    assert match, f"README.md has no settings:{name} block"
    return match.group(1)


@pytest.mark.parametrize("name", ["addon", "dispatcher"])
def test_readme_reference_matches_the_tables(name):
    """The README's reference is generated; regenerate it with `make docs`."""
    assert readme_block(name) == reference.blocks()[name]


def test_write_readme_fills_and_refreshes_blocks(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- settings:addon -->\n<!-- /settings:addon -->\nmiddle\n"
        "<!-- settings:dispatcher -->\nSTALE\n<!-- /settings:dispatcher -->\nend\n"
    )
    settings.write_readme(str(readme), reference.blocks())
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\nend\n")
    assert "middle" in text and "STALE" not in text
    assert reference.blocks()["dispatcher"] in text
    settings.write_readme(str(readme), reference.blocks())
    assert readme.read_text() == text


def test_write_readme_needs_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="settings:addon"):
        settings.write_readme(str(readme), reference.blocks())


def test_the_dispatcher_adds_trusted_proxies_through_the_environment():
    values = parse_addon(
        {"pyramid_lb.trusted_proxies": "10.0.0.1"},
        environ={"PYRAMID_LB_TRUSTED_PROXIES": "127.0.0.1"},
    )
    trusted = values["pyramid_lb.trusted_proxies"]
    assert "10.0.0.1" in trusted and "127.0.0.1" in trusted
    assert "192.0.2.1" not in trusted


def test_a_bad_trusted_proxies_environment_variable_is_named():
    with pytest.raises(SettingsError, match="PYRAMID_LB_TRUSTED_PROXIES = 'nope'"):
        parse_addon({}, environ={"PYRAMID_LB_TRUSTED_PROXIES": "nope"})
