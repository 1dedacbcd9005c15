"""Child processes that are started, checked for readiness, restarted when they crash or when their
`/health` stays bad, and stopped."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: it gets SIGTERM if `lmserve up` dies, and has its own process
    group, so Ctrl-C reaches only the supervisor, which stops children in order."""
    os.setpgrp()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: children then outlive a killed supervisor, as with any shell


@dataclass
class HealthWatch:
    """When a running child counts as stuck: after it has been ready once since its last start,
    `restart_after` bad `/health` answers (not 200, refused, or no answer within `timeout`) in a
    row, one per `interval`; or not ready `startup_timeout` seconds after a start. A stuck child gets
    SIGTERM, then SIGKILL after `kill_grace` seconds, and is restarted like a crashed one."""

    interval: float = 5.0
    timeout: float = 5.0
    restart_after: int = 3
    startup_timeout: float = 600.0
    kill_grace: float = 10.0


@dataclass
class Child:
    """One supervised process. Invariant: `popen` is the live process or the last one that ran."""

    name: str
    args: list[str]
    log_path: Path
    ready_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    health_url: str | None = None
    """Watched (see HealthWatch) when set."""
    popen: subprocess.Popen | None = None
    restarts: int = 0
    backoff: float = 1.0
    restart_at: float | None = None
    was_ready: bool = False
    """Answered its readiness URL since the last start."""
    num_bad_health: int = 0
    """Bad `/health` answers in a row since it was ready."""
    kill_at: float | None = None
    """When a stuck child that got SIGTERM gets SIGKILL."""
    probe: Future | None = None
    next_probe_at: float = 0.0

    @property
    def is_running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                preexec_fn=_die_with_parent,
            )
        self.restart_at = self.kill_at = self.probe = None
        self.was_ready = False
        self.num_bad_health = 0
        self.next_probe_at = 0.0

    def is_ready(self) -> bool:
        if not self.is_running:
            return False
        if self.ready_url is None:
            return True
        try:
            with urllib.request.urlopen(self.ready_url, timeout=1.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def health_problem(self, timeout: float) -> str | None:
        """None when `/health` answers 200, else what was wrong."""
        if self.health_url is None:
            return None
        try:
            with urllib.request.urlopen(self.health_url, timeout=timeout) as response:
                return None if response.status == 200 else f"status {response.status}"
        except urllib.error.HTTPError as exc:
            return f"status {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return "no answer in time" if isinstance(reason, TimeoutError) else f"no answer ({reason})"

    def signal(self, sig: int) -> None:
        if self.is_running and self.popen is not None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, lines: int = 5) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Supervisor:
    """Keeps children alive: a crashed child is restarted after a backoff that doubles up to a cap
    and resets once the child has been up for a minute; a child with a `health_url` whose health
    stays bad (see HealthWatch) is stopped and then restarted the same way."""

    def __init__(self, backoff_max: float = 30.0, say=print, watch: HealthWatch | None = None) -> None:
        self.children: list[Child] = []
        self.backoff_max = backoff_max
        self.say = say
        self.watch = watch or HealthWatch()
        self._started_at: dict[str, float] = {}
        # Probes run here so that a child that does not answer never holds up restarts of the others.
        self._probes = ThreadPoolExecutor(max_workers=4, thread_name_prefix="health-watch")

    def add(self, child: Child) -> Child:
        self.children.append(child)
        child.start()
        self._started_at[child.name] = time.monotonic()
        return child

    def wait_ready(self, children: list[Child], timeout: float) -> None:
        """Waits until every child answers its readiness URL; raises RuntimeError with its log otherwise."""
        deadline = time.monotonic() + timeout
        pending = list(children)
        while pending:
            for child in list(pending):
                if child.popen is not None and child.popen.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with code {child.popen.returncode}:\n{child.log_tail()}")
                if child.is_ready():
                    child.was_ready = True
                    pending.remove(child)
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise RuntimeError(f"{names} not ready after {timeout:.0f}s:\n{pending[0].log_tail()}")
            time.sleep(0.2)

    def check(self) -> None:
        """Restarts crashed children whose backoff has passed; stops stuck ones. Never blocks long."""
        now = time.monotonic()
        for child in self.children:
            if child.is_running:
                if now - self._started_at[child.name] > 60:
                    child.backoff = 1.0
                self._watch(child, now)
                continue
            if child.restart_at is None:
                code = child.popen.returncode if child.popen is not None else None
                child.restart_at = now + child.backoff
                self.say(f"{child.name} exited (code {code}); restarting in {child.backoff:.0f}s")
                child.backoff = min(child.backoff * 2, self.backoff_max)
            elif now >= child.restart_at:
                child.start()
                child.restarts += 1
                self._started_at[child.name] = now
                self.say(f"{child.name} restarted (restart #{child.restarts})")

    def _watch(self, child: Child, now: float) -> None:
        """One step of the health watch of a running child: SIGKILL when its grace is over, the
        result of the last probe, and the next probe when it is due."""
        if child.health_url is None:
            return
        if child.kill_at is not None:
            if now >= child.kill_at:
                self.say(f"{child.name} did not stop within {self.watch.kill_grace:.0f}s; killing it")
                child.signal(signal.SIGKILL)
                child.kill_at = float("inf")
            return
        if child.probe is not None:
            if not child.probe.done():
                return
            self._judge(child, child.probe.result(), now)
            child.probe = None
            if child.kill_at is not None:
                return
        if now >= child.next_probe_at:
            child.next_probe_at = now + self.watch.interval
            if child.was_ready:
                child.probe = self._probes.submit(child.health_problem, self.watch.timeout)
            else:
                child.probe = self._probes.submit(lambda: None if child.is_ready() else "not ready")

    def _judge(self, child: Child, problem: str | None, now: float) -> None:
        if not child.was_ready:
            if problem is None:
                child.was_ready = True
            elif now - self._started_at[child.name] > self.watch.startup_timeout:
                self._stop_stuck(child, f"not ready {self.watch.startup_timeout:.0f}s after its start")
            return
        child.num_bad_health = 0 if problem is None else child.num_bad_health + 1
        if child.num_bad_health >= self.watch.restart_after:
            self._stop_stuck(child, f"/health bad {child.num_bad_health} times in a row (last: {problem})")

    def _stop_stuck(self, child: Child, why: str) -> None:
        self.say(f"{child.name}: {why}; stopping it to restart it")
        child.signal(signal.SIGTERM)
        child.kill_at = time.monotonic() + self.watch.kill_grace

    def stop(self, children: list[Child], timeout: float) -> None:
        """SIGTERM (the children drain), then SIGKILL whatever is left after `timeout`."""
        for child in children:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in children:
            if child.wait(max(0.0, deadline - time.monotonic())) is None and child.is_running:
                child.signal(signal.SIGKILL)
                child.wait(5)
        if all(not c.is_running for c in self.children):
            self._probes.shutdown(wait=False, cancel_futures=True)
