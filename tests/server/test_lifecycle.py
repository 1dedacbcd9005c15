"""Disconnects, draining, TLS, and what the probes say while loading or after the engine died."""

import asyncio
import datetime
import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest
from openai import OpenAI

from lmserve.engine.config import EngineConfig
from lmserve.server.app import create_app
from lmserve.server.settings import ServerOptions
from lmserve.server.state import ServerState
from tests.server.conftest import MODEL_NAME

LONG = {"model": MODEL_NAME, "prompt": "Go on", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}


def running(server) -> int:
    return httpx.get(server.url + "/v1/status").json()["running"]


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def request_lines(server, status: int) -> list[dict]:
    return [line for line in server.log_entries("request") if line.get("status") == status]


def test_streaming_client_disconnect_aborts_in_the_engine(server):
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            assert running(server) == 1
    assert wait_until(lambda: running(server) == 0, 2.0)
    assert wait_until(lambda: request_lines(server, 499), 2.0)
    assert request_lines(server, 499)[-1]["generation_tokens"] < 1000


def test_non_streaming_client_disconnect_aborts_in_the_engine(server):
    body = json.dumps(LONG).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert wait_until(lambda: running(server) == 1, 5.0)
    assert wait_until(lambda: running(server) == 0, 2.0)


def run_in_thread(fn):
    result = {}

    def target():
        try:
            result["value"] = fn()
        except Exception as exc:  # reported by the test
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def test_sigterm_drains_without_losing_in_flight_requests(start_server):
    server = start_server("--drain-seconds", "60")
    client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    kwargs = dict(model=MODEL_NAME, prompt="Drain", max_tokens=1000, temperature=0, extra_body={"ignore_eos": True})

    def streamed():
        chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
        return chunks[-1].usage.completion_tokens

    jobs = [run_in_thread(lambda: client.completions.create(**kwargs).usage.completion_tokens) for _ in range(2)]
    jobs += [run_in_thread(streamed) for _ in range(2)]
    assert wait_until(lambda: running(server) == 4, 10.0)
    server.signal(signal.SIGTERM)
    assert wait_until(lambda: httpx.get(server.url + "/ready").status_code == 503, 2.0)
    refused = httpx.post(server.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "late"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "service_unavailable"
    for thread, result in jobs:
        thread.join(60)
        assert "error" not in result, result
    assert [r["value"] for _, r in jobs] == [1000] * 4
    assert server.popen.wait(20) == 0


def test_drain_seconds_cuts_what_is_left_and_exits_zero(start_server):
    server = start_server("--drain-seconds", "0.1")

    def streamed():
        with httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "max_tokens": 1000, "stream": True},
                          timeout=30) as r:
            return [line for line in r.iter_lines() if line]

    thread, result = run_in_thread(streamed)
    assert wait_until(lambda: running(server) == 1, 10.0)
    server.signal(signal.SIGTERM)
    thread.join(30)
    lines = result["value"]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["type"] == "service_unavailable"
    assert server.popen.wait(20) == 0


def engine_child(server) -> int:
    """The pid of the server's engine process (its one child)."""
    pid = server.popen.pid
    children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    assert len(children) == 1, children
    cmdline = open(f"/proc/{children[0]}/cmdline").read()
    assert "lmserve.server.engine_process" in cmdline, cmdline
    return int(children[0])


def gone(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_ctrl_c_reaches_both_processes_and_the_server_still_drains(start_server):
    """A terminal's Ctrl-C signals the whole process group: the engine process ignores it and
    finishes what the draining server still has in flight."""
    server = start_server("--drain-seconds", "60")
    engine = engine_child(server)
    client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    thread, result = run_in_thread(lambda: client.completions.create(
        model=MODEL_NAME, prompt="Drain", max_tokens=1000, temperature=0, extra_body={"ignore_eos": True}))
    assert wait_until(lambda: running(server) == 1, 10.0)
    for pid in (server.popen.pid, engine):
        os.kill(pid, signal.SIGINT)
    thread.join(60)
    assert "error" not in result, result
    assert result["value"].usage.completion_tokens == 1000
    assert server.popen.wait(20) == 0
    assert wait_until(lambda: gone(engine), 10.0)


def test_the_engine_process_never_outlives_its_server(start_server):
    server = start_server()
    engine = engine_child(server)
    server.popen.kill()
    server.popen.wait(10)
    assert wait_until(lambda: gone(engine), 10.0)


def self_signed(tmp_path):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls(start_server, tmp_path):
    cert, key = self_signed(tmp_path)
    server = start_server("--tls-certfile", str(cert), "--tls-keyfile", str(key), scheme="https")
    client = OpenAI(base_url=server.url + "/v1", api_key="x", http_client=httpx.Client(verify=str(cert)))
    assert client.completions.create(model=MODEL_NAME, prompt="secure", max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url.replace("https", "http") + "/health")  # plain HTTP is not answered as HTTP


def break_thread_engine(state: ServerState) -> None:
    def broken_step():
        raise RuntimeError("simulated device failure")

    state.engine._steps.engine.step = broken_step


def kill_engine_process(state: ServerState) -> None:
    os.kill(state.engine.pid, signal.SIGKILL)


@pytest.mark.parametrize("mode, break_engine", [("thread", break_thread_engine), ("process", kill_engine_process)])
def test_probes_while_loading_and_after_the_engine_died(tiny_llama, mode, break_engine):
    options = ServerOptions(warmup=False, engine_mode=mode)
    config = EngineConfig.from_kwargs(model=str(tiny_llama), num_blocks=64)
    state = ServerState.create(options, config)
    app = create_app(state)
    payload = {"model": state.model_name, "prompt": "x", "max_tokens": 2}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            assert (await http.get("/health")).status_code == 200
            assert (await http.get("/ready")).status_code == 503
            assert (await http.get("/v1/status")).json()["state"] == "loading"
            loading = await http.post("/v1/completions", json=payload)
            assert loading.status_code == 503 and "still loading" in loading.json()["error"]["message"]
            await state.load()
            assert (await http.get("/ready")).status_code == 200
            assert (await http.post("/v1/completions", json=payload)).status_code == 200

            in_flight = asyncio.create_task(http.post("/v1/completions", json={**LONG, "model": state.model_name}))
            for _ in range(3000):
                if state.engine.latest_stats.num_running or in_flight.done():
                    break
                await asyncio.sleep(0.01)
            break_engine(state)
            cut = await asyncio.wait_for(in_flight, 30)
            assert cut.status_code == 503 and "engine" in cut.json()["error"]["message"]
            failed = await http.post("/v1/completions", json=payload)
            assert failed.status_code == 503 and "engine stopped" in failed.json()["error"]["message"]
            assert (await http.get("/health")).status_code == 503
            assert (await http.get("/ready")).status_code == 503
            await state.engine.shutdown()

    asyncio.run(scenario())


def test_both_processes_freeze_their_start_up_heap(start_server):
    # Frozen objects are skipped by every later full collection (~170 ms for a real model's engine).
    server = start_server("--log-level", "debug")
    assert httpx.post(server.url + "/v1/completions", json={**LONG, "max_tokens": 2}).status_code == 200
    frozen = {line["process"]: line["objects"] for line in server.log_entries("start-up heap frozen")}
    assert set(frozen) == {"server", "engine"}
    assert min(frozen.values()) > 10_000, frozen
