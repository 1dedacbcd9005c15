"""A gateway terminating TLS exports when its certificate expires (LmserveCertificateExpiringSoon)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from cryptography import x509

from tests.deploy.conftest import start_gateway
from tests.gateway.conftest import base_config
from tests.gateway.test_serve import _self_signed


def test_tls_gateway_exports_its_certificate_expiry(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    config = base_config(tmp_path, [{"name": "m", "backends": [{"url": "http://127.0.0.1:9"}]}],
                         tls_certfile=str(cert), tls_keyfile=str(key))
    gateway = start_gateway(tmp_path, config, scheme="https")
    try:
        text = httpx.get(gateway.url + "/metrics", verify=str(cert), timeout=10).text
    finally:
        gateway.proc.stop()
    expires = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc.timestamp()
    match = re.search(rf'^lmserve_gateway_tls_cert_expiry_timestamp_seconds\{{certfile="{re.escape(str(cert))}"\}} '
                      r"(\S+)$", text, re.M)
    assert match, text
    assert float(match.group(1)) == expires


def test_plain_gateway_exports_no_expiry_sample(tmp_path: Path) -> None:
    """No sample at all (not a 0 that would read as 'expired in 1970' and fire the alert)."""
    config = base_config(tmp_path, [{"name": "m", "backends": [{"url": "http://127.0.0.1:9"}]}])
    gateway = start_gateway(tmp_path, config)
    try:
        text = httpx.get(gateway.url + "/metrics", timeout=10).text
    finally:
        gateway.proc.stop()
    assert "# TYPE lmserve_gateway_tls_cert_expiry_timestamp_seconds gauge" in text
    assert not re.search(r"^lmserve_gateway_tls_cert_expiry_timestamp_seconds[{ ]", text, re.M)
