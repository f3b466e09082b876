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
