"""`lmserve up` as a user runs it: a gateway with keys in front of supervised model servers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI

from tests.services import REPO_ROOT, free_port


def wait_for(pattern: str, log, proc, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text())
        if match:
            return match
        if proc.poll() is not None:
            raise AssertionError(f"lmserve up exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} after {timeout}s:\n{log.read_text()[-3000:]}")


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def servers_of(pid: int) -> list[int]:
    """Children whose command is `... lmserve.cli serve ...`."""
    def argv(child: int) -> list[bytes]:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    return [child for child in children_of(pid) if b"serve" in argv(child)]


@pytest.fixture
def stack(tmp_path, tiny_llama):
    """Runs `lmserve up` on a config file naming the tiny model (the default stack serves the demo model)."""
    port = free_port()
    config = tmp_path / "stack.yaml"
    config.write_text(f"models:\n  - name: tiny\n    model: {tiny_llama}\n    replicas: 2\n"
                      f"    serve: {{num_blocks: 256}}\n")
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lmserve.cli", "up", "-c", str(config), "--port", str(port),
                                 "--home", str(tmp_path / "home")], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    yield proc, log, port
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_up_serves_survives_a_crash_and_stops_everything(stack):
    proc, log, port = stack
    key = wait_for(r"API key:\s+(\S+)", log, proc, 240).group(1)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
    assert reply.usage.completion_tokens >= 1 and reply.choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=8, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    with pytest.raises(Exception, match="401|nvalid"):
        OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()

    servers = servers_of(proc.pid)
    assert len(servers) == 2
    os.kill(servers[0], signal.SIGKILL)
    for _ in range(6):  # the other replica keeps answering
        assert client.completions.create(model="tiny", prompt="still there?", max_tokens=2).usage.completion_tokens
    wait_for(r"tiny-\d restarted", log, proc, 30)
    assert len(servers_of(proc.pid)) == 2

    everyone = children_of(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    time.sleep(0.5)
    assert all(not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
               for pid in everyone)
    assert "stopped" in log.read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
