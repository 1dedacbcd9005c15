"""API keys (hashed at rest, revoked, scoped, expired) and JWT bearer tokens, end to end."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import rsa

from lmserve.gateway.keystore import KeyStore, hash_key
from tests.gateway.conftest import base_config
from tests.services import REPO_ROOT

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def post(url: str, token: str | None, model: str = "m") -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.post(url + "/v1/chat/completions", json={"model": model, **CHAT}, headers=headers, timeout=10)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmserve.cli", *args], check=False, capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60)


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_keys_are_stored_only_as_hashes(db: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}" if db == "sqlite" else request.getfixturevalue("postgres_url")
    created = cli("keys", "create", "--name", f"team-{db}", "--models", "a,b", "--rpm", "5", "--database-url", url)
    assert created.returncode == 0, created.stderr
    record = json.loads(created.stdout)
    plaintext = record["key"]
    assert plaintext.startswith("lms-") and len(plaintext) > 40
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = [tuple(str(v) for v in row) for row in conn.execute(sa.text("select * from lmserve_api_keys"))]
    engine.dispose()
    dump = repr(rows)
    assert plaintext not in dump and plaintext[10:] not in dump
    assert hash_key(plaintext) in dump
    listed = json.loads(cli("keys", "list", "--database-url", url).stdout)
    mine = [k for k in listed if k["id"] == record["id"]]
    assert mine and mine[0]["models"] == ["a", "b"] and "key" not in mine[0]
    assert cli("keys", "revoke", record["id"], "--database-url", url).returncode == 0
    assert cli("keys", "revoke", record["id"], "--database-url", url).returncode == 1  # already revoked
    assert KeyStore(url).get(record["id"]).revoked_at is not None


def test_revoked_out_of_scope_and_expired_keys_are_refused(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    config = base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]},
                                    {"name": "other", "backends": [{"url": a.url}]}])
    gw = gateway_factory(config)
    db_url = config["database_url"]
    assert post(gw.url, None).status_code == 401
    bad = post(gw.url, "lms-not-a-key")
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"

    scoped = json.loads(cli("keys", "create", "--name", "scoped", "--models", "m", "--database-url", db_url).stdout)
    assert post(gw.url, scoped["key"], "m").status_code == 200
    denied = post(gw.url, scoped["key"], "other")
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
    listing = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {scoped['key']}"}).json()
    assert [m["id"] for m in listing["data"]] == ["m"]

    # Revoked through the CLI (another process): refused within the key cache TTL (1 s here).
    assert cli("keys", "revoke", scoped["id"], "--database-url", db_url).returncode == 0
    deadline = time.monotonic() + 5
    while post(gw.url, scoped["key"]).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    revoked = post(gw.url, scoped["key"])
    assert revoked.status_code == 401 and "revoked" in revoked.json()["error"]["message"]

    # Revoked through this gateway's admin API: refused at once.
    key = gw.admin("POST", "/admin/keys", json={"name": "x"}).json()
    assert post(gw.url, key["key"]).status_code == 200
    assert gw.admin("DELETE", f"/admin/keys/{key['id']}").status_code == 200
    assert post(gw.url, key["key"]).status_code == 401

    past = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)).isoformat()
    expired = gw.admin("POST", "/admin/keys", json={"name": "old", "expires_at": past}).json()
    response = post(gw.url, expired["key"])
    assert response.status_code == 401 and "expired" in response.json()["error"]["message"]


def test_admin_api_needs_the_admin_key(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}]))
    key = gw.create_key()
    for token in (None, key, "wrong"):
        headers = {"authorization": f"Bearer {token}"} if token else {}
        response = httpx.get(gw.url + "/admin/keys", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert gw.admin("GET", "/admin/keys").status_code == 200


def _jwks(tmp_path: Path) -> tuple[object, Path]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}))
    return private, path


def test_jwt_valid_expired_wrong_audience_bad_signature(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    private, jwks_path = _jwks(tmp_path)
    (tmp_path / "other").mkdir()
    other_private, _ = _jwks(tmp_path / "other")
    secret = "hs256-shared-secret-of-enough-length!"
    config = base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]},
                                    {"name": "other", "backends": [{"url": a.url}]}],
                         jwt={"secret": secret, "jwks_file": str(jwks_path), "issuer": "https://idp.test",
                              "audience": "lmserve"})
    gw = gateway_factory(config)
    now = int(time.time())
    claims = {"sub": "user-1", "iss": "https://idp.test", "aud": "lmserve", "exp": now + 300, "tenant": "acme",
              "models": ["m"]}

    def rs(payload: dict, key: object = private) -> str:
        return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "k1"})

    assert post(gw.url, rs(claims)).status_code == 200
    assert post(gw.url, jwt.encode(claims, secret, algorithm="HS256")).status_code == 200
    assert post(gw.url, rs(claims), "other").status_code == 403  # models claim enforced

    cases = {
        "expired": rs({**claims, "exp": now - 10}),
        "audience": rs({**claims, "aud": "someone-else"}),
        "issuer": rs({**claims, "iss": "https://evil.test"}),
        "signature": rs(claims, other_private),
        "hs-secret": jwt.encode(claims, "wrong-secret-wrong-secret-wrong!", algorithm="HS256"),
        "no-exp": rs({k: v for k, v in claims.items() if k != "exp"}),
    }
    for name, token in cases.items():
        response = post(gw.url, token)
        assert response.status_code == 401, name
        assert response.json()["error"]["type"] == "authentication_error", name
    assert "expired" in post(gw.url, cases["expired"]).json()["error"]["message"]
    assert "audience" in post(gw.url, cases["audience"]).json()["error"]["message"]


def test_jwt_claims_carry_limits(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    secret = "hs256-shared-secret-of-enough-length!"
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}],
                                     jwt={"secret": secret, "audience": "lmserve"}))
    token = jwt.encode({"sub": "svc", "aud": "lmserve", "exp": int(time.time()) + 300, "rpm": 2}, secret,
                       algorithm="HS256")
    statuses = [post(gw.url, token).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_jwt_claims_of_the_wrong_type_are_a_401_not_a_crash(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    secret = "hs256-shared-secret-of-enough-length!"
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}],
                                     jwt={"secret": secret, "audience": "lmserve"}))
    base = {"sub": "svc", "aud": "lmserve", "exp": int(time.time()) + 300}
    for bad in ({"tenant": {"id": 7}}, {"tenant": 7}, {"models": [{"name": "m"}]}, {"models": "m"}, {"sub": ["x"]}):
        response = post(gw.url, jwt.encode({**base, **bad}, secret, algorithm="HS256"))
        assert response.status_code == 401, (bad, response.text)
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and ("claim" in error["message"] or "Subject" in
                                                            error["message"]), (bad, error)
    assert post(gw.url, jwt.encode({**base, "tenant": "t", "models": ["m"]}, secret, algorithm="HS256")).status_code == 200


def test_default_limits_apply_to_keys_without_their_own(tmp_path: Path) -> None:
    import asyncio

    from lmserve.gateway.auth import Authenticator

    store = KeyStore(f"sqlite:///{tmp_path / 'k.db'}")
    plain, _ = store.create_key("no-limits")
    own, _ = store.create_key("own", rpm=7)
    auth = Authenticator(store, 5.0, None, default_limits=(100, 5000))

    async def run() -> tuple:
        return (await auth.authenticate(f"Bearer {plain}".encode()), await auth.authenticate(f"Bearer {own}".encode()))

    first, second = asyncio.run(run())
    assert (first.rpm, first.tpm) == (100, 5000)
    assert (second.rpm, second.tpm) == (7, 5000)


def test_gateway_on_postgresql_keys_and_ledger(backends, gateway_factory, tmp_path: Path, postgres_url: str) -> None:
    a = backends("a")
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}],
                                     database_url=postgres_url))
    created = gw.admin("POST", "/admin/keys", json={"name": "pg", "tpm": 1000}).json()
    assert post(gw.url, created["key"]).status_code == 200
    deadline = time.monotonic() + 10
    rows: list = []
    while not rows and time.monotonic() < deadline:
        rows = KeyStore(postgres_url).usage(created["id"])
        time.sleep(0.1)
    assert rows == [{"key_id": created["id"], "model": "m", "requests": 1, "prompt_tokens": 10,
                     "completion_tokens": 5, "cached_tokens": 0}]
