"""The stack under chaos: `lmserve up` on the demo model in a temp home (with its own Redis), or an
existing gateway given by URL; plus the probes chaos.py reads (backends, ledger, server PIDs).

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import yaml

from benchmarks.servers import free_port, stop_group, wait_http

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "lmserve-demo"


class Redis:
    """A throwaway redis-server on a fixed port, so it can be restarted at the same address."""

    def __init__(self, home: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("chaos: redis-server is missing (scripts/install-test-deps.sh installs it)")
        self.binary, self.home, self.port = binary, home, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.home)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            done = subprocess.run([self.binary.replace("redis-server", "redis-cli"), "-p", str(self.port), "ping"],
                                  capture_output=True, text=True, check=False)
            if done.stdout.strip() == "PONG":
                return
            time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None


@dataclass
class Stack:
    url: str
    admin_key: str
    proc: subprocess.Popen | None = None
    home: Path | None = None
    redis: Redis | None = None

    def admin(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"authorization": f"Bearer {self.admin_key}"},
                             timeout=10, **kwargs)  # type: ignore[arg-type]

    def create_key(self, name: str, **limits: object) -> tuple[str, str]:
        created = self.admin("POST", "/admin/keys", json={"name": name, **limits})
        created.raise_for_status()
        return created.json()["key"], created.json()["id"]

    def backends(self) -> list[dict]:
        return self.admin("GET", "/admin/backends").json()["models"][MODEL]["backends"]

    def all_backends_back(self) -> bool:
        return all(b["healthy"] and b["ready"] and not b["draining"] and b["breaker"] == "closed"
                   for b in self.backends())

    def usage(self, key_id: str) -> dict[str, int]:
        rows = self.admin("GET", "/admin/usage", params={"key_id": key_id}).json()["data"]
        return {f: sum(int(r[f]) for r in rows) for f in ("requests", "prompt_tokens", "completion_tokens")}

    def settled_usage(self, key_id: str, timeout: float = 20.0) -> dict[str, int]:
        """The ledger once two reads 2 s apart agree (it is flushed in batches)."""
        last = self.usage(key_id)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(2.0)
            now = self.usage(key_id)
            if now == last:
                return now
            last = now
        return last

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, timeout=60)
        if self.redis is not None:
            self.redis.stop()
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)


def _stack_port(num_servers: int) -> int:
    for _ in range(200):
        port = free_port()
        if port + 100 + num_servers < 65536 and all(_is_free(port + 100 + i) for i in range(num_servers)):
            return port
    raise RuntimeError("no free gateway port with free server ports")


def _is_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_stack(replicas: int = 2, serve: dict[str, str] | None = None) -> Stack:
    """`lmserve up` with `replicas` demo servers (with extra `serve` settings) and Redis-backed limits,
    in a temp home."""
    home = Path(tempfile.mkdtemp(prefix="lmserve-chaos-"))
    redis = Redis(home)
    redis.start()
    port = _stack_port(replicas)
    stack_file = home / "stack.yaml"
    stack_file.write_text(yaml.safe_dump({
        "models": [{"name": MODEL, "model": "demo", "replicas": replicas, "serve": serve or {}}],
        "port": port, "home": str(home), "redis_url": redis.url,
    }))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with open(home / "up.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lmserve.cli", "up", "-c", str(stack_file)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True)
    stack = Stack(f"http://127.0.0.1:{port}", "", proc, home, redis)
    try:
        wait_http(stack.url + "/ready", timeout=900, proc=proc)
        deadline = time.monotonic() + 60
        while httpx.get(stack.url + "/ready", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway never became ready")
            time.sleep(0.5)
        stack.admin_key = (home / "admin_key").read_text().strip()
    except BaseException:
        print((home / "up.log").read_text()[-3000:], file=sys.stderr)
        stack.stop()
        raise
    return stack


def server_pid(url: str) -> int:
    """PID of the local `lmserve serve` listening on `url`'s port (found by its command line)."""
    port = str(urlsplit(url).port)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in args]
        if "serve" in words and "--port" in words and words[words.index("--port") + 1] == port:
            return int(entry)
    raise RuntimeError(f"no local lmserve server on port {port}")
