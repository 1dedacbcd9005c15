"""`lmserve up` as a user runs it: the default stack (a gateway with keys in front of two supervised
servers of the demo model) on free ports, crash of a replica, and a clean stop."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.services import start_stack

MODEL = "lmserve-demo"


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def server_pid(stack_pid: int, port: int) -> int:
    """The child of `lmserve up` whose command is `... serve ... --port PORT ...`."""
    for child in children_of(stack_pid):
        with open(f"/proc/{child}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        if b"serve" in argv and argv[argv.index(b"--port") + 1] == str(port).encode():
            return child
    raise AssertionError(f"no server on port {port} among the children of {stack_pid}")


def is_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except FileNotFoundError:
        return True


def requests_served_by(stack_url: str, backend_port: int) -> float:
    """The gateway's count of 200 answers that came from the backend on `backend_port`."""
    text = httpx.get(stack_url + "/metrics", timeout=5).text
    pattern = rf'^lmserve_gateway_requests_total{{backend="http://127.0.0.1:{backend_port}".*status="200"}} (\S+)$'
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.MULTILINE))


def wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not ready after {timeout}s")


@pytest.fixture
def stack(tmp_path):
    stack = start_stack(tmp_path)
    yield stack
    stack.stop(10)


def test_default_stack_serves_survives_a_crash_and_stops_everything(stack):
    client = OpenAI(base_url=stack.url + "/v1", api_key=stack.api_key, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a fortune."}],
                                           max_tokens=24)
    assert reply.usage.completion_tokens >= 1 and reply.choices[0].message.content.strip()
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=16, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    with pytest.raises(Exception, match="401|nvalid"):
        OpenAI(base_url=stack.url + "/v1", api_key="wrong", max_retries=0).models.list()
    # The servers take requests only with their own key, which the gateway holds: a client cannot go
    # around it, and what the engine schedules by is the key's identity (this key has no tenant: its id).
    direct = httpx.post(f"http://127.0.0.1:{stack.server_port(0)}/v1/completions", timeout=30,
                        json={"model": MODEL, "prompt": "x", "max_tokens": 1, "priority": -1000})
    assert direct.status_code == 401
    served = [json.loads(line) for log in (stack.home / "logs").glob(f"{MODEL}-*.log")
              for line in log.read_text().splitlines() if '"msg":"request"' in line]
    assert served and all(re.fullmatch(r"[0-9a-f]{16}", e["tenant"]) for e in served), served

    crashed_port = stack.server_port(0)
    os.kill(server_pid(stack.popen.pid, crashed_port), signal.SIGKILL)
    for _ in range(6):  # the other replica keeps answering
        assert client.completions.create(model=MODEL, prompt="still there?", max_tokens=2).usage.completion_tokens
    stack.wait_for(rf"{MODEL}-0 exited \(code -9\)", 10)
    stack.wait_for(rf"{MODEL}-0 restarted", 30)
    wait_ready(f"http://127.0.0.1:{crashed_port}", 120)
    served_before = requests_served_by(stack.url, crashed_port)
    deadline = time.monotonic() + 30  # the gateway's next health probe puts it back in the pool
    while requests_served_by(stack.url, crashed_port) == served_before:
        assert time.monotonic() < deadline, "the restarted replica got no traffic"
        assert client.completions.create(model=MODEL, prompt="back?", max_tokens=2).usage.completion_tokens
    assert len([server_pid(stack.popen.pid, stack.server_port(i)) for i in range(2)]) == 2

    everyone = children_of(stack.popen.pid)
    assert len(everyone) == 3  # two servers and the gateway
    for pid in everyone:  # the stack hands its drain_seconds and log_level down under the same names
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--drain-seconds") + 1] == b"30.0" and b"--log-level" in argv, argv
    assert stack.stop(60) == 0
    time.sleep(0.5)
    assert all(is_gone(pid) for pid in everyone)
    assert "stopped" in stack.log()
    with pytest.raises(httpx.HTTPError):
        httpx.get(stack.url + "/health", timeout=2)
