"""The per-test time limit of conftest.py, run on a throwaway suite with a limit of 2 s instead of waiting out the
real one: a test that hangs fails with its name, a child it waits on is killed, and the tests after it still run."""
import os
import shutil
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

HANGING_SUITE = '''
import subprocess, sys, time

def test_sleeps():
    time.sleep(30)

def test_waits_on_child():
    # A shell writes its pid within milliseconds (a Python child can take longer than the limit to start on a
    # busy machine), then becomes the sleep under the same pid.
    subprocess.run(["sh", "-c", "echo $$ > '{pid_file}'; exec sleep 30"], check=True)

def test_quick():
    assert True
'''


def is_running(pid):
    """True when pid is alive and not a zombie (an orphan may wait unreaped where PID 1 does not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("workers", [[], ["-n", "1"]], ids=["plain", "xdist"])
def test_a_hanging_test_fails_with_its_name_after_the_limit(tmp_path, workers):
    shutil.copy(os.path.join(HERE, "conftest.py"), tmp_path / "conftest.py")
    pid_file = tmp_path / "child.pid"
    (tmp_path / "test_hangs.py").write_text(HANGING_SUITE.format(pid_file=str(pid_file)))
    env = dict(os.environ, TEST_TIMEOUT_S="2")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers,
                             "test_hangs.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "2 failed, 1 passed" in out, out
    for name in ("test_sleeps", "test_waits_on_child"):
        assert f"test_hangs.py::{name} ran past 2 s (TEST_TIMEOUT_S)" in out, out
    assert took < 30, f"the suite took {took:.0f} s: the limit did not cut the 30 s sleeps"
    child_pid = int(pid_file.read_text())
    if is_running(child_pid):
        os.kill(child_pid, 9)
        pytest.fail("the child the hanging test waited on outlived it")
