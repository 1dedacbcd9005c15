"""Real processes for tests: free ports, subprocess start/stop with a readiness wait, Redis and
PostgreSQL servers started in temp dirs (installed by scripts/install-test-deps.sh)."""

from __future__ import annotations

import glob
import json
import os
import pwd
import re
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
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_entries(self, msg: str | None = None) -> list[dict]:
        """The JSON lines of the log (those with this `msg`, where given), parsed."""
        entries = [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]
        return entries if msg is None else [e for e in entries if e.get("msg") == msg]

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
                  env: dict[str, str] | None = None, timeout: float = 30.0, scheme: str = "http",
                  host: str = "127.0.0.1") -> Process:
    """Starts `args` and waits until GET `ready_path` answers (any status below 500)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    with open(log_path, "wb") as log_file:  # the child keeps its own descriptor
        popen = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=REPO_ROOT)
    proc = Process(popen, port, log_path, scheme, host)
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


def start_redis(tmp: Path, port: int | None = None) -> Process:
    """A fresh, empty redis-server; `port` restarts one at the address of a stopped one."""
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server is missing: run scripts/install-test-deps.sh")
    port = port or free_port()
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


def is_port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


STACK_SERVER_PORT_OFFSET = 100  # `lmserve up` puts its servers on the gateway port + 100, + 101, ...


def free_stack_port(num_servers: int = 2) -> int:
    """A gateway port whose server ports (+100, +101, ...) are free as well."""
    for _ in range(200):
        port = free_port()
        first = port + STACK_SERVER_PORT_OFFSET
        if first + num_servers <= 65535 and all(is_port_free(first + i) for i in range(num_servers)):
            return port
    raise RuntimeError("no free block of ports for a stack")


@dataclass
class StackProcess:
    """`lmserve up` as a child process with its own home; `api_key` is the key its banner printed."""

    popen: subprocess.Popen
    port: int
    home: Path
    log_path: Path
    api_key: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def server_port(self, replica: int) -> int:
        return self.port + STACK_SERVER_PORT_OFFSET + replica

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first match of `pattern` in the output; fails if it does not come or the stack exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log())
            if match:
                return match
            if self.popen.poll() is not None:
                raise AssertionError(f"lmserve up exited with {self.popen.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in lmserve up's output after {timeout}s:\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the stack drains and stops its children), SIGKILL after `timeout`."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


def start_stack(tmp: Path, *args: str, timeout: float = 300.0) -> StackProcess:
    """Runs `lmserve up` (the default stack unless `args` say otherwise) on a free gateway port with
    its home under `tmp`, and waits for its banner. Two demo servers load in about a minute on 2 cores."""
    port = free_stack_port()
    home = tmp / "lmserve-home"
    log_path = tmp / "up.log"
    with open(log_path, "wb") as log_file:
        popen = subprocess.Popen(python_module("lmserve.cli", "up", "--port", str(port), "--home", str(home), *args),
                                 stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                 env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"})
    stack = StackProcess(popen, port, home, log_path)
    try:
        stack.api_key = stack.wait_for(r"API key:\s+(\S+)", timeout).group(1)
    except AssertionError:
        stack.stop(10)
        raise
    return stack
