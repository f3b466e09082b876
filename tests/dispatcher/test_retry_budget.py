"""The retry budget: retries as a share of recent requests, plus a floor."""

import pytest

from pyramid_lb.dispatcher.proxy import RetryBudget
from tests.clock import Clock


def spend_all(budget, limit=1000):
    """How many retries the budget allows right now (spending them)."""
    spent = 0
    while spent < limit and budget.try_spend():
        spent += 1
    return spent


def requests(budget, count):
    for _ in range(count):
        budget.request()


@pytest.mark.parametrize(
    "ratio, floor, count, allowed",
    [
        pytest.param(0.2, 10, 0, 10, id="floor with no traffic"),
        pytest.param(0.2, 3, 0, 3, id="a smaller floor"),
        pytest.param(0.2, 10, 20, 10, id="floor above the ratio"),
        pytest.param(0.2, 10, 100, 20, id="ratio above the floor"),
        pytest.param(0.5, 0, 10, 5, id="half"),
        pytest.param(0.2, 0, 7, 2, id="a fraction of a retry rounds up"),
        pytest.param(0.0, 0, 100, 0, id="no retries at all"),
    ],
)
def test_budget(ratio, floor, count, allowed):
    budget = RetryBudget(ratio, floor, clock=Clock())
    requests(budget, count)
    assert spend_all(budget) == allowed


def test_budget_counts_requests_across_the_window():
    clock = Clock()
    budget = RetryBudget(0.1, 0, window=10, clock=clock)
    for _ in range(10):
        requests(budget, 10)
        clock.now += 1
    clock.now -= 1
    assert spend_all(budget) == 10


def test_retries_spent_count_across_the_window():
    clock = Clock()
    budget = RetryBudget(0.2, 5, window=10, clock=clock)
    assert spend_all(budget) == 5
    clock.now += 9.9
    assert not budget.try_spend()
    clock.now += 0.1  # the second they were spent in has left the window
    assert spend_all(budget) == 5


def test_old_requests_fall_out_of_the_window():
    clock = Clock()
    budget = RetryBudget(0.2, 0, window=10, clock=clock)
    requests(budget, 100)
    clock.now += 9.5
    assert budget.try_spend()
    clock.now += 0.5
    assert not budget.try_spend()
    requests(budget, 10)  # two retries' worth, one spent a second ago
    assert spend_all(budget) == 1


def test_a_slot_reused_after_a_long_pause_starts_empty():
    clock = Clock()
    budget = RetryBudget(0.5, 0, window=10, clock=clock)
    requests(budget, 100)
    clock.now += 30  # the same slot, three windows later
    requests(budget, 2)
    assert spend_all(budget) == 1


def test_a_pause_longer_than_the_window_forgets_everything():
    clock = Clock()
    budget = RetryBudget(0.2, 0, window=10, clock=clock)
    requests(budget, 100)
    clock.now += 15  # another slot: the old one is left as it was, but stale
    assert not budget.try_spend()
