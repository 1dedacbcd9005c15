"""Servers under test as child processes: a free port, readiness, and a clean stop.

Shared by the benchmarks that start HTTP servers (gateway_overhead.py, serving.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Polls `url` until it answers below 500; fails early when `proc` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout}s")


def stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGINT to the process group of `proc` (started with `start_new_session=True`), SIGKILL if it
    is not gone in `timeout` seconds, then SIGKILL to whatever the group still holds: launchers
    (vllm-router's Python wrapper, LiteLLM, vLLM's engine core) leave children behind otherwise."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
