"""The supervisor of `lmserve up` restarts a child whose `/health` stays bad once it has been ready,
and leaves alone one that is merely slow while it starts (issue 14 items 8 and 9), over real processes."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lmserve.stack.supervisor import Child, HealthWatch, Supervisor
from tests.services import REPO_ROOT, free_port

WATCH = HealthWatch(interval=0.2, timeout=0.5, restart_after=3, startup_timeout=60.0, kill_grace=1.0)


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Callable[..., tuple[Supervisor, Child, list[str]]]]:
    supervisors: list[Supervisor] = []

    def start(*flags: str) -> tuple[Supervisor, Child, list[str]]:
        said: list[str] = []
        supervisor = Supervisor(backoff_max=1.0, say=said.append, watch=WATCH)
        port = free_port()
        child = Child("srv", [sys.executable, "-m", "tests.stack.health_child", "--port", str(port),
                              "--state-dir", str(tmp_path), *flags],
                      tmp_path / "srv.log", f"http://127.0.0.1:{port}/ready",
                      env={"PYTHONPATH": str(REPO_ROOT)}, health_url=f"http://127.0.0.1:{port}/health")
        supervisors.append(supervisor)
        supervisor.add(child)
        return supervisor, child, said

    yield start
    for supervisor in supervisors:
        supervisor.stop(supervisor.children, 5)


def run_until(supervisor: Supervisor, check: Callable[[], bool], timeout: float = 30.0) -> None:
    """Drives the supervisor as `lmserve up` does until `check()` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        supervisor.check()
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


@pytest.mark.parametrize("fault", ["bad", "hang"])
def test_a_child_whose_health_stays_bad_is_restarted(supervised, tmp_path: Path, fault: str) -> None:
    supervisor, child, said = supervised()
    supervisor.wait_ready([child], 30)
    first_pid = child.popen.pid
    (tmp_path / fault).touch()  # "bad": /health 503 (a dead engine); "hang": no answer, SIGTERM ignored
    run_until(supervisor, lambda: child.restarts == 1 and child.is_ready())
    assert child.popen.pid != first_pid
    why = "status 503" if fault == "bad" else "no answer in time"
    assert any(f"/health bad 3 times in a row (last: {why})" in line for line in said), said
    assert any("killing it" in line for line in said) is (fault == "hang"), said


def test_a_slow_start_is_not_a_bad_health(supervised, tmp_path: Path) -> None:
    # /health hangs and /ready is 503 for 3 s: longer than restart_after bad checks would take.
    supervisor, child, said = supervised("--startup-delay", "3")
    started = time.monotonic()
    run_until(supervisor, lambda: child.was_ready)
    assert time.monotonic() - started >= 3 - 0.5
    assert child.restarts == 0 and child.is_running, said
    (tmp_path / "bad").touch()  # and once ready, it is watched
    run_until(supervisor, lambda: child.restarts == 1)
