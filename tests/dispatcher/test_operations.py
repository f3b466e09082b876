"""Life-cycle operations, one at a time (in process; the real ones are in
test_supervisor.py and test_supervisor_replacement.py)."""

import logging
import threading

import pytest

from pyramid_lb.dispatcher.operations import Busy, Operations
from tests.clock import Clock
from tests.processes import wait_until


@pytest.fixture
def clock():
    return Clock()


def test_a_second_operation_is_refused_with_what_runs(clock):
    operations = Operations(clock)
    operations.claim("rolling restart")
    clock.now += 4
    with pytest.raises(Busy) as info:
        operations.claim("scale to 2")
    assert info.value.running == "rolling restart"
    assert str(info.value) == (
        "rolling restart is under way (started 4s ago); one life-cycle operation "
        "runs at a time: try again once it is done"
    )
    operations.release()
    operations.claim("scale to 2")
    assert operations.running == "scale to 2"


def test_start_and_end_are_logged(clock, caplog):
    caplog.set_level(logging.INFO, "pyramid_lb.dispatcher")
    operations = Operations(clock)
    operations.claim("scale to 3")
    clock.now += 2.5
    operations.release("done")
    assert [r.getMessage() for r in caplog.records] == [
        "scale to 3 started",
        "scale to 3 done in 2.5s",
    ]


def test_run_in_the_background_refuses_at_once_and_releases_after(clock, caplog):
    caplog.set_level(logging.INFO, "pyramid_lb.dispatcher")
    operations = Operations(clock)
    going, finish = threading.Event(), threading.Event()

    def work():
        going.set()
        finish.wait(10)
        return True

    operations.run("rolling restart", work, background=True)
    assert going.wait(10)
    with pytest.raises(Busy):  # in the caller's thread, not later
        operations.run("restart of site-1", lambda: True)
    finish.set()
    wait_until(lambda: operations.running is None)
    assert operations.run("restart of site-1", lambda: True) is True


def test_work_that_stops_or_fails_is_said_and_released(clock, caplog):
    caplog.set_level(logging.INFO, "pyramid_lb.dispatcher")
    operations = Operations(clock)
    assert operations.run("rolling restart", lambda: False) is False

    def broken():
        raise ValueError("list.remove(x): x not in list")

    assert operations.run("scale to 2", broken) is False
    assert operations.running is None
    messages = [r.getMessage() for r in caplog.records]
    assert "rolling restart stopped in 0.0s" in messages
    assert "scale to 2 failed" in messages
    assert "scale to 2 stopped in 0.0s" in messages
