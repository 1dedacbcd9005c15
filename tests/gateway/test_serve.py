"""Process-level behaviour: SIGTERM drain, TLS, OpenTelemetry export, the usage ledger CLI."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.gateway.conftest import base_config
from tests.services import REPO_ROOT, free_port

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def test_sigterm_drains_in_flight_streams_then_exits(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    a.control(chunk_delay=0.25, content="0123456789", chunk_chars=1)  # a 2.5 s stream
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}], drain_seconds=20))
    created = gw.admin("POST", "/admin/keys", json={"name": "drain"}).json()
    headers = {"authorization": f"Bearer {created['key']}"}
    received: list[str] = []

    def consume() -> None:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json={"model": "m", "stream": True, **CHAT},
                          headers=headers, timeout=30) as response:
            received.extend(response.iter_lines())

    thread = threading.Thread(target=consume)
    thread.start()
    deadline = time.monotonic() + 10
    while a.stats()["in_flight"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    gw.proc.signal(signal.SIGTERM)
    time.sleep(0.5)
    # Draining: new connections are refused while the stream goes on.
    try:
        refused = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m", **CHAT}, headers=headers,
                             timeout=2).status_code
    except httpx.TransportError:
        refused = None
    assert refused in (None, 503)
    assert gw.proc.popen.poll() is None  # still running for the in-flight stream
    thread.join(20)
    data = [line for line in received if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and len(data) == 11  # the whole stream arrived
    # A drain that finished is a clean exit, as for the server (docs/operations.md).
    assert gw.proc.popen.wait(15) == 0
    assert "draining in-flight requests" in gw.proc.log()
    # The ledger was flushed on the way out.
    cli = subprocess.run([sys.executable, "-m", "lmserve.cli", "keys", "usage", created["id"], "--database-url",
                          gw.config["database_url"]], check=False, capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    rows = json.loads(cli.stdout)
    assert rows == [{"key_id": created["id"], "model": "m", "requests": 1, "prompt_tokens": 10,
                     "completion_tokens": 10, "cached_tokens": 0}]


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_termination(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    cert, key = _self_signed(tmp_path)
    config = base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}], tls_certfile=str(cert),
                         tls_keyfile=str(key))
    gw = gateway_factory(config, scheme="https")
    token = httpx.post(gw.url + "/admin/keys", json={"name": "tls"}, verify=str(cert),
                       headers={"authorization": "Bearer test-admin-key"}).json()["key"]
    response = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m", **CHAT}, verify=str(cert),
                          headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 200 and response.json()["backend"] == "a"
    try:
        plain = httpx.get(f"http://127.0.0.1:{gw.proc.port}/health", timeout=3).status_code
    except httpx.TransportError:
        plain = None
    assert plain != 200


class _Collector(BaseHTTPRequestHandler):
    posts: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        _Collector.posts.append((self.path, body))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


def test_opentelemetry_spans_when_endpoint_is_set(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    port = free_port()
    collector = ThreadingHTTPServer(("127.0.0.1", port), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    try:
        gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}]),
                             env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                                  "OTEL_BSP_SCHEDULE_DELAY": "100"})
        key = gw.create_key()
        response = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m", **CHAT},
                              headers={"authorization": f"Bearer {key}"})
        assert response.status_code == 200
        sent = {k.lower(): v for k, v in a.stats()["last_headers"].items()}
        traceparent = sent.get("traceparent", "")
        assert traceparent.startswith("00-") and len(traceparent.split("-")) == 4
        deadline = time.monotonic() + 10
        while not _Collector.posts and time.monotonic() < deadline:
            time.sleep(0.1)
        path, body = _Collector.posts[0]
        assert path == "/v1/traces"
        assert b"gateway /v1/chat/completions" in body and b"lmserve-gateway" in body
        assert bytes.fromhex(traceparent.split("-")[1]) in body  # the backend got this span's trace id
    finally:
        collector.shutdown()


def test_tracing_packages_are_not_imported_without_endpoint() -> None:
    code = ("import sys, os; os.environ.pop('OTEL_EXPORTER_OTLP_ENDPOINT', None);"
            "from lmserve.gateway.app import create_app; from lmserve.gateway.config import GatewayConfig;"
            "gw = create_app(GatewayConfig()); assert gw.tracer is None;"
            "print(any(m.startswith('opentelemetry') for m in sys.modules), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_gateway_freezes_its_start_up_heap(backends, gateway_factory, tmp_path: Path) -> None:
    # Frozen objects are skipped by every later full collection (~35 ms for the gateway's heap).
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": backends("a").url}]}],
                                     log_level="debug"))
    deadline = time.monotonic() + 10
    while "start-up heap frozen" not in gw.proc.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    frozen = gw.proc.log_entries("start-up heap frozen")
    assert [line["process"] for line in frozen] == ["gateway"]
    assert frozen[0]["objects"] > 10_000, frozen
