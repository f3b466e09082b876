"""``pyramid-lb status``: a dispatcher's stats as a table in the terminal."""

from __future__ import annotations

import time

COLUMNS = (
    ("instance", "id", "<"),
    ("address", "address", "<"),
    ("pid", "pid", ">"),
    ("state", "state", "<"),
    ("in flight", "in_flight", ">"),
    ("requests", "requests", ">"),
    ("errors", "errors", ">"),
    ("retries", "retries", ">"),
    ("p50 ms", "p50_ms", ">"),
    ("p99 ms", "p99_ms", ">"),
    ("restarts", "restarts", ">"),
    ("last check", "check", "<"),
)


def _check(check: dict | None, now: float) -> str:
    if not check:
        return "-"
    ago = max(0.0, now - check["time"])
    outcome = "ok" if check["passed"] else "FAILED"
    return f"{outcome} {check['detail']} ({ago:.0f}s ago)"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def format_stats(stats: dict, now: float | None = None) -> str:
    """The instances as an aligned table, then a line of totals."""
    now = time.time() if now is None else now
    rows = []
    for instance in stats["instances"]:
        state = instance["state"] + (" (ejected)" if instance.get("ejected") else "")
        share = instance.get("slow_start_share", 1)
        if share < 1:
            state += f" (slow start {share:.0%})"
        in_flight = str(instance["in_flight"])
        if instance.get("max_in_flight") is not None:
            in_flight += f"/{instance['max_in_flight']}"
        values = dict(
            instance,
            address=instance["url"].removeprefix("http://"),
            state=state,
            in_flight=in_flight,
            check=_check(instance.get("last_check"), now),
        )
        rows.append([_cell(values[key]) for _, key, _ in COLUMNS])
    headers = [title for title, _, _ in COLUMNS]
    widths = [
        max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)
    ]
    lines = []
    for cells in [headers, *rows]:
        line = "  ".join(
            f"{cell:{align}{width}}"
            for cell, width, (_, _, align) in zip(cells, widths, COLUMNS, strict=True)
        )
        lines.append(line.rstrip())
    totals = stats["totals"]
    summary = (
        f"{totals['up']}/{totals['instances']} up, {totals['in_flight']} in flight, "
        f"{totals['requests']} requests, {totals['errors']} errors, "
        f"{totals['retries']} retries, {totals['rate']} req/s; "
        f"strategy {stats['strategy']}"
    )
    if stats.get("panic"):
        summary += "; PANIC MODE: every instance looks bad, all are tried"
    if stats.get("operation"):
        summary += f"; {stats['operation']} under way"
    elif stats.get("rolling"):  # a dispatcher from before "operation"
        summary += "; rolling restart under way"
    lines.append("")
    lines.append(summary)
    queue = stats.get("queue")  # absent from dispatchers before the queue
    if queue:
        lines.append(
            f"queue: {queue['depth']}/{queue['size']} waiting, "
            f"{queue['served']} served after a wait, {queue['timeouts']} timed out "
            f"(queue_timeout {queue['timeout']:g}s), {queue['rejected']} turned "
            "away (full)"
        )
    if stats.get("recycled"):
        recycled = sorted(stats["recycled"].items())
        lines.append(
            "recycled: "
            + ", ".join(f"{count} by {reason}" for reason, count in recycled)
        )
    return "\n".join(lines)
