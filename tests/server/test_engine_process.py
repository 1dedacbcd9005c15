"""The server's engine process: large event batches over its pipes, and how its death is reported."""

import asyncio
import os
import signal
import time

import httpx

from tests.server.conftest import MODEL_NAME

PROMPT_TOKENS = 1000


def test_event_batches_larger_than_the_pipe_do_not_kill_the_engine(start_server):
    """Issue 14 item 8. Each echoed request below carries ~80 KB of prompt log-probabilities back from
    the engine; 24 of them prefilled in one step make one event batch of ~2 MB, more than the 1 MiB
    pipe holds, so the server reads it in parts. uvloop (uvicorn's loop) makes the read end of the
    pipe non-blocking, and the server took the first empty read as the engine's death."""
    # The PyTorch attention path: the transport is under test, not the C++ kernels (built at first use).
    server = start_server("--num-blocks", "4096", "--max-num-batched-tokens", "32768", "--max-num-seqs", "64",
                          "--attention-backend", "torch")
    body = {"model": MODEL_NAME, "max_tokens": 1, "echo": True, "logprobs": 20, "temperature": 0}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            return await asyncio.gather(*(
                http.post("/v1/completions", json={**body, "prompt": [(7 * i + r) % 480 + 20 for i in range(PROMPT_TOKENS)]})
                for r in range(24)))

    for _ in range(3):
        responses = asyncio.run(burst())
        assert [r.status_code for r in responses] == [200] * len(responses), responses[0].text
        assert all(len(r.json()["choices"][0]["logprobs"]["top_logprobs"]) == PROMPT_TOKENS + 1 for r in responses)
    assert httpx.get(server.url + "/health").status_code == 200
    assert not server.log_entries("the engine process exited (code %s)")


def test_a_killed_engine_is_logged_fails_its_requests_and_stops_the_server(start_server):
    """Issue 14 item 8: the cause of the engine's death is logged, the stream in flight ends with an
    error, /ready never says 200 again, and the server exits non-zero so that a supervisor restarts it."""
    server = start_server("--attention-backend", "torch")
    engine_pid = _engine_pid(server.popen.pid)
    body = {"model": MODEL_NAME, "prompt": "Go on", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", server.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        os.kill(engine_pid, signal.SIGKILL)
        rest = "\n".join(lines)
    assert "error" in rest and "[DONE]" not in rest.split("error", 1)[0], rest[-500:]
    readiness, deadline = [], time.monotonic() + 30
    try:
        while server.popen.poll() is None and time.monotonic() < deadline:
            readiness.append(httpx.get(server.url + "/ready", timeout=5).status_code)
    except httpx.TransportError:
        pass  # the server stopped listening
    assert 200 not in readiness
    assert server.popen.wait(30) != 0
    [died] = server.log_entries("the engine died")
    assert "SIGKILL" in died["cause"], died


def _engine_pid(server_pid: int) -> int:
    """The server's engine process: its child running lmserve.server.engine_process."""
    for task in os.listdir(f"/proc/{server_pid}/task"):
        with open(f"/proc/{server_pid}/task/{task}/children") as f:
            for pid in f.read().split():
                with open(f"/proc/{pid}/cmdline", "rb") as cmd:
                    if b"lmserve.server.engine_process" in cmd.read():
                        return int(pid)
    raise AssertionError(f"no engine process under {server_pid}")
