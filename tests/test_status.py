from pyramid_lb.status import format_stats

STATS = {
    "strategy": "round_robin",
    "panic": False,
    "rolling": True,
    "totals": {
        "instances": 2,
        "up": 1,
        "in_flight": 3,
        "requests": 120,
        "errors": 2,
        "retries": 1,
        "rate": 7,
    },
    "instances": [
        {
            "id": "site-1",
            "url": "http://127.0.0.1:6544",
            "pid": 4242,
            "state": "up",
            "ejected": False,
            "in_flight": 3,
            "requests": 100,
            "errors": 0,
            "retries": 1,
            "p50_ms": 1.234,
            "p99_ms": 9.8,
            "restarts": 0,
            "last_check": {"time": 995.0, "passed": True, "detail": "200 in 1.0 ms"},
        },
        {
            "id": "10.0.0.5:6543",
            "url": "http://10.0.0.5:6543",
            "pid": None,
            "state": "down",
            "ejected": True,
            "in_flight": 0,
            "requests": 20,
            "errors": 2,
            "retries": 0,
            "p50_ms": None,
            "p99_ms": None,
            "restarts": 0,
            "last_check": None,
        },
    ],
}


def test_format_stats():
    text = format_stats(STATS, now=1000.0)
    lines = text.splitlines()
    assert lines[0].split() == [
        "instance", "address", "pid", "state", "in", "flight", "requests", "errors",
        "retries", "p50", "ms", "p99", "ms", "restarts", "last", "check",
    ]  # fmt: skip
    assert lines[1].split()[:5] == ["site-1", "127.0.0.1:6544", "4242", "up", "3"]
    assert "1.2" in lines[1] and "9.8" in lines[1]
    assert lines[1].endswith("ok 200 in 1.0 ms (5s ago)")
    assert lines[2].split()[:4] == ["10.0.0.5:6543", "10.0.0.5:6543", "-", "down"]
    assert "(ejected)" in lines[2]
    # columns line up
    column = lines[0].index("address")
    assert lines[1].index("127.0.0.1:6544") == column
    assert lines[2].index("10.0.0.5:6543", 1) == column
    assert lines[0].index("state") == lines[1].index("up") == lines[2].index("down")
    assert lines[-1] == (
        "1/2 up, 3 in flight, 120 requests, 2 errors, 1 retries, 7 req/s; "
        "strategy round_robin; rolling restart under way"
    )


def test_panic_is_said():
    assert "PANIC MODE" in format_stats(dict(STATS, panic=True), now=1000.0)


def test_the_operation_under_way_is_said():
    text = format_stats(dict(STATS, operation="scale to 2"), now=1000.0)
    assert text.endswith("; scale to 2 under way")
