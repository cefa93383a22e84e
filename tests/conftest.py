import os
import signal
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("MUJOCO_GL", "egl")


def pytest_collection_modifyitems(items):
    """The slow tests first (a stable sort: otherwise in file order). make test's two workers (pytest -n 2
    --dist worksteal) then end together on quick tests, instead of one waiting minutes for the other's last
    loop run."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# A test that hangs (a server that never answers, a child that never exits) fails with its name after this many
# seconds, instead of holding make test until CI's own limit. The slowest, the end-to-end loop, took 3 min 18 s
# beside two training runs.
TEST_TIMEOUT_S = int(os.environ.get("TEST_TIMEOUT_S", "600"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """SIGALRM over the test's setup, call and teardown; pytest records the TimeoutError as the test's failure.
    (The alarm reaches the main thread, where xdist's workers run their tests; subprocess.run kills its child
    when the error interrupts its wait.)"""
    def expire(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran past {TEST_TIMEOUT_S} s (TEST_TIMEOUT_S)")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
