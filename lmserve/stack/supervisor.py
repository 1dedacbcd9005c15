"""Child processes that are started, checked for readiness, restarted when they crash, and stopped."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
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
class Child:
    """One supervised process. Invariant: `popen` is the live process or the last one that ran."""

    name: str
    args: list[str]
    log_path: Path
    ready_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen | None = None
    restarts: int = 0
    backoff: float = 1.0
    restart_at: float | None = None

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
        self.restart_at = None

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
    and resets once the child has been up for a minute."""

    def __init__(self, backoff_max: float = 30.0, say=print) -> None:
        self.children: list[Child] = []
        self.backoff_max = backoff_max
        self.say = say
        self._started_at: dict[str, float] = {}

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
                    pending.remove(child)
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise RuntimeError(f"{names} not ready after {timeout:.0f}s:\n{pending[0].log_tail()}")
            time.sleep(0.2)

    def check(self) -> None:
        """Restarts crashed children whose backoff has passed."""
        now = time.monotonic()
        for child in self.children:
            if child.is_running:
                if now - self._started_at[child.name] > 60:
                    child.backoff = 1.0
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

    def stop(self, children: list[Child], timeout: float) -> None:
        """SIGTERM (the children drain), then SIGKILL whatever is left after `timeout`."""
        for child in children:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in children:
            if child.wait(max(0.0, deadline - time.monotonic())) is None and child.is_running:
                child.signal(signal.SIGKILL)
                child.wait(5)
