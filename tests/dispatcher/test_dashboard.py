"""The /_lb/ dashboard in a real headless Chromium, over a real dispatcher.

Playwright drives Debian's chromium (no browser download): the tests skip
where it is not installed. The main test leaves ``dashboard-1280.png`` and
``dashboard-390.png`` (a laptop and a phone) in its tmp_path.
"""

import re
import time
from importlib.resources import files
from pathlib import Path

import pytest
import requests
from playwright.sync_api import expect, sync_playwright

from tests.dispatcher.site import all_up, serve, who, write_ini
from tests.processes import wait_until

CHROMIUM = Path("/usr/bin/chromium")
# This machine has no network beyond loopback: keep Chromium from reaching out.
CHROMIUM_ARGS = [
    "--no-sandbox",  # tests run as root, where the sandbox cannot start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM}"
)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


#: A laptop's width; the main test also looks at a phone's (PHONE).
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=LAPTOP)
    context.set_default_timeout(10_000)
    try:
        yield context.new_page()
    finally:
        context.close()


def test_dashboard_shows_and_drains(processes, page, tmp_path):
    ini = write_ini(tmp_path, instances=3)
    _, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 3), timeout=20)
    ids = ["site-1", "site-2", "site-3"]

    page.goto(url + "/_lb/")
    for name in ids:
        row = page.locator(f'tr[data-id="{name}"]')
        expect(row.locator("th")).to_have_text(name)
        expect(row.locator(".state.up")).to_have_text("up")
    expect(page.locator("#conn")).to_have_class("live")
    expect(page.locator("#t-up")).to_have_text("3 / 3")

    who(url, 30)
    expect(page.locator("#t-requests")).to_have_text("30")
    # The chart shows complete seconds only: the burst appears within one.
    expect(page.locator("#chart-note")).to_have_text(re.compile(r"^peak [1-9]"))

    drained = page.locator('tr[data-id="site-2"]')
    page.get_by_role("button", name="Drain site-2").click()
    expect(drained.locator(".state")).to_have_text("draining")
    expect(page.locator("#outcome")).to_have_text(re.compile("Drain site-2: done"))
    expect(page.get_by_role("button", name="Enable site-2")).to_be_visible()
    expect(page.get_by_role("button", name="Drain site-2")).to_be_hidden()
    expect(page.locator("#t-up")).to_have_text("2 / 3")

    served = {w["instance"] for w in who(url, 20)}
    assert served == {"site-1", "site-3"}

    for size in (LAPTOP, PHONE):
        page.set_viewport_size(size)
        screenshot = tmp_path / f"dashboard-{size['width']}.png"
        page.screenshot(path=screenshot, full_page=True)
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert screenshot.stat().st_size > 20_000
        assert_fits(page, size["width"])
    page.set_viewport_size(LAPTOP)

    page.get_by_role("button", name="Enable site-2").click()
    expect(drained.locator(".state")).to_have_text("up")
    assert "site-2" in {w["instance"] for w in who(url, 6)}

    # Without the header that a cross-site form cannot send, nothing happens.
    refused = requests.post(url + "/_lb/instances/site-1/drain", timeout=10)
    assert refused.status_code == 403
    assert "X-Requested-With" in refused.json()["error"]
    assert all_up(url, 3)


def assert_fits(page, width):
    """Nothing wider than the window, nothing cut off in a scrolled box: every
    button (the last column) lies inside the window."""
    widths = page.evaluate(
        """() => [document.documentElement.scrollWidth,
                  ...[...document.querySelectorAll('.scroll, .cards dd')].map(
                      (node) => node.scrollWidth - node.clientWidth)]"""
    )
    assert widths[0] <= width, f"the page is {widths[0]} px wide in {width} px"
    assert max(widths[1:]) <= 0, "a table or card is wider than its box"
    buttons = page.locator("button:visible")
    assert buttons.count() >= 4  # Rolling restart, and Drain/Enable, Restart
    for index in range(buttons.count()):
        box = buttons.nth(index).bounding_box()
        assert 0 <= box["x"] and box["x"] + box["width"] <= width, buttons.nth(
            index
        ).get_attribute("aria-label")


def test_lost_connection_is_shown_and_recovers(processes, page, tmp_path):
    _, url = serve(processes, write_ini(tmp_path, instances=1))
    page.goto(url + "/_lb/")
    expect(page.locator("#conn")).to_have_class("live")

    page.route("**/stats.json", lambda route: route.abort())
    expect(page.locator("#conn")).to_have_class("lost")
    expect(page.locator("#conn")).to_contain_text("Connection lost")
    expect(page.locator("body")).to_have_class("stale")

    page.unroute("**/stats.json")
    expect(page.locator("#conn")).to_have_class("live")
    expect(page.locator("body")).not_to_have_class("stale")


def test_restarts_are_confirmed_and_outcomes_shown(processes, page, tmp_path):
    _, url = serve(processes, write_ini(tmp_path, instances=1))
    wait_until(lambda: all_up(url, 1), timeout=20)
    page.goto(url + "/_lb/")
    expect(page.locator('tr[data-id="site-1"] .state')).to_have_text("up")
    posts = []
    page.on("request", lambda r: r.method == "POST" and posts.append(r.url))
    answers = iter([False, True])
    questions = []

    def answer(dialog):
        questions.append(dialog.message)
        if next(answers):
            dialog.accept()
        else:
            dialog.dismiss()

    page.on("dialog", answer)
    page.get_by_role("button", name="Rolling restart").click()
    page.get_by_role("button", name="Restart site-1").click()
    assert questions == [
        "Restart every instance, one at a time?",
        "Restart site-1? Its process is stopped and started again.",
    ]
    expect(page.locator("#outcome")).to_have_text(re.compile("Restart site-1: done"))
    assert posts == [url + "/_lb/instances/site-1/restart"]
    # A restart replaces the instance with a new one, as a rolling restart does.
    replaced = {"timeout": 15_000}  # a new process on a busy machine
    expect(page.locator('tr[data-id="site-2"] .state')).to_have_text("up", **replaced)
    expect(page.locator('tr[data-id="site-1"]')).to_have_count(0, **replaced)

    # An error is shown from the answer's "error", as text, never as markup.
    page.route(
        "**/instances/*/drain",
        lambda route: route.fulfill(status=409, json={"error": "not now <b>x</b>"}),
    )
    page.get_by_role("button", name="Drain site-2").click()
    outcome = page.locator("#outcome")
    expect(outcome).to_have_text(re.compile(r"Drain site-2 failed: not now <b>x</b>$"))
    expect(outcome).to_have_class("bad")
    expect(outcome.locator("b")).to_have_count(0)


def canned_instance(name, state, **fields):
    return {
        "id": name,
        "url": "http://127.0.0.1:9",
        "pid": None,
        "state": state,
        "ejected": False,
        "weight": 1,
        "in_flight": 0,
        "requests": 0,
        "errors": 0,
        "retries": 0,
        "restarts": 0,
        "ejections": 0,
        "p50_ms": None,
        "p99_ms": None,
        "statuses": {},
        "last_check": None,
        **fields,
    }


def test_every_state_is_drawn_from_text(page):
    """Canned stats, no dispatcher: states, warnings, and ids that look like markup."""
    now = time.time()
    sneaky = '<img src=x onerror="document.title=1">'
    stats = {
        "time": now,
        "strategy": "least_connections",
        "sticky": "cookie",
        "panic": True,
        "supervised": False,
        "operation": "scale to 4",
        "rolling": True,
        "totals": {
            "instances": 5,
            "up": 0,
            "in_flight": 0,
            "requests": 3_703_701,
            "errors": 3,
            "retries": 0,
            "unrouted": 4,
            "rate": 0,
        },
        # [second, sent to an instance, answered by the dispatcher itself]
        "rate": [[int(now) - 60 + i, i % 7, int(i == 59)] for i in range(60)],
        "instances": [
            canned_instance("a", "starting"),
            canned_instance("b", "up", ejected=True, errors=3),
            canned_instance("c", "draining"),
            canned_instance(
                "d",
                "down",
                last_check={"time": now - 75, "passed": False, "detail": sneaky},
            ),
            canned_instance(sneaky, "failed", restarts=5),
        ],
    }
    page_html = files("pyramid_lb.dispatcher").joinpath("dashboard.html").read_bytes()
    page.route(
        "http://lb.test/_lb/",
        lambda route: route.fulfill(body=page_html, content_type="text/html"),
    )
    page.route(
        "http://lb.test/_lb/stats.json",
        lambda route: route.fulfill(json=stats),
    )
    page.goto("http://lb.test/_lb/")

    for name, state in zip("abcd", ["starting", "up", "draining", "down"], strict=True):
        expect(page.locator(f'tr[data-id="{name}"] .state')).to_have_text(state)
    row = page.locator("tbody tr").nth(4)
    expect(row.locator("th")).to_have_text(sneaky)
    expect(row.locator(".state")).to_have_text("failed")
    expect(page.locator("img")).to_have_count(0)
    expect(page.locator('tr[data-id="b"] .ejected')).to_be_visible()
    expect(page.locator('tr[data-id="a"] .ejected')).to_be_hidden()
    check = page.locator('tr[data-id="d"] td').nth(9)
    expect(check).to_have_text(f"failed · 75 s ago{sneaky}")
    expect(page.locator('tr[data-id="a"] td').nth(9)).to_have_text("not checked yet")
    expect(page.locator("#panic")).to_be_visible()
    expect(page.locator("#rolling")).to_have_text(
        "Scale to 4 under way: other actions wait until it is done."
    )
    expect(page.locator("#policy")).to_have_text(
        "strategy least_connections · sticky cookie"
    )
    expect(page.locator("#t-unrouted")).to_have_text("4")
    # Unrouted answers are stacked on the chart (and said), as the cards
    # count them apart from Requests.
    expect(page.locator("#chart-note")).to_have_text(
        "peak 6 · last 3 + 1 unrouted req/s"
    )
    assert page.locator("svg rect.unrouted").count() == 60
    assert page.locator("svg rect.unrouted").nth(59).get_attribute("height") == "10"
    # A large count is shown short, in full as its tooltip: the card holds it.
    expect(page.locator("#t-requests")).to_have_text("3.7M")
    expect(page.locator("#t-requests")).to_have_attribute("title", "3,703,701")
    # Nothing to restart when the dispatcher spawns no instances.
    restart = re.compile("restart", re.IGNORECASE)
    expect(page.get_by_role("button", name=restart)).to_have_count(0)
    expect(page.get_by_role("button", name="Enable c")).to_be_visible()
    # The dispatcher would refuse it while the scale runs.
    expect(page.get_by_role("button", name="Enable c")).to_be_disabled()
    assert page.title() == "0/5 up · pyramid_lb"


def test_the_page_is_refused_outside_the_allow_list(processes, page, tmp_path):
    ini = write_ini(tmp_path, instances=1, dispatcher_extra="admin_allow = 192.0.2.1")
    _, url = serve(processes, ini)
    response = page.goto(url + "/_lb/")
    assert response.status == 403
    assert response.json() == {"error": "not an allowed client"}


def test_the_cache_card_shows_the_share_answered_from_the_cache(
    processes, page, tmp_path
):
    ini = write_ini(tmp_path, instances=1, dispatcher_extra="cache = memory")
    _, url = serve(processes, ini)
    wait_until(lambda: all_up(url, 1), timeout=20)
    page.goto(url + "/_lb/")
    card = page.locator("#t-cache")
    expect(card).to_be_visible()
    expect(card).to_have_text("–")
    for _ in range(4):
        requests.get(url + "/cached?max_age=30", timeout=10).raise_for_status()
    expect(card).to_have_text("75 %")
    expect(card).to_have_attribute(
        "title", re.compile(r"^3 hits, 1 misses, 0 revalidated, 0 stale, 0 evicted; ")
    )
    expect(card).to_have_attribute("title", re.compile(r"1 entries, [\d.]+ KiB of 64"))
