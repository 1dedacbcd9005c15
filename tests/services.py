"""Real processes for tests: free ports, subprocess start/stop with a readiness wait, Redis and
PostgreSQL servers started in temp dirs (installed by scripts/install-test-deps.sh)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Process:
    """A child process serving HTTP on `port`; its output goes to `log_path`."""

    popen: subprocess.Popen
    port: int
    log_path: Path
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


def start_process(args: list[str], port: int, log_path: Path, ready_path: str = "/health",
                  env: dict[str, str] | None = None, timeout: float = 30.0, scheme: str = "http") -> Process:
    """Starts `args` and waits until GET `ready_path` answers (any status below 500)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    with open(log_path, "wb") as log_file:  # the child keeps its own descriptor
        popen = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=REPO_ROOT)
    proc = Process(popen, port, log_path, scheme)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"{args[:4]} exited with {popen.returncode}:\n{proc.log()[-3000:]}")
        try:
            if httpx.get(proc.url + ready_path, timeout=1.0, verify=False).status_code < 500:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{args[:4]} did not become ready in {timeout}s:\n{proc.log()[-3000:]}")


def start_redis(tmp: Path) -> Process:
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server is missing: run scripts/install-test-deps.sh")
    port = free_port()
    popen = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                              "--dir", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return Process(popen, port, tmp / "redis.log", "redis")
        except OSError:
            time.sleep(0.05)
    popen.kill()
    raise RuntimeError("redis-server did not start")


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL is missing: run scripts/install-test-deps.sh")
    return found[-1]


def _as_postgres(args: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the `postgres` system user then."""
    if os.geteuid() != 0:
        return args
    return ["runuser", "-u", "postgres", "--", *args]


def start_postgres(tmp: Path) -> tuple[Process, str]:
    """Starts a throwaway PostgreSQL (trust auth, no fsync) and returns it with its SQLAlchemy URL."""
    data = tmp / "pgdata"
    data.mkdir(parents=True)
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for path in (tmp, data):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                                 "--no-sync"]), check=True, capture_output=True)
    port = free_port()
    log_path = tmp / "postgres.log"
    popen = subprocess.Popen(_as_postgres([_pg_bin("postgres"), "-D", str(data), "-p", str(port), "-k", str(tmp),
                                           "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                time.sleep(0.3)
                return Process(popen, port, log_path, "postgresql"), url
        except OSError:
            if popen.poll() is not None:
                break
            time.sleep(0.1)
    popen.kill()
    raise RuntimeError("postgres did not start")


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
