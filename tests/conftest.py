import pytest

from tests.processes import Processes


@pytest.fixture
def processes(tmp_path):
    """Start real processes; every one is stopped when the test ends."""
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture(scope="module")
def module_processes(tmp_path_factory):
    """Like ``processes``, shared by the tests of one module."""
    started = Processes(tmp_path_factory.mktemp("processes"))
    try:
        yield started
    finally:
        started.stop_all()
