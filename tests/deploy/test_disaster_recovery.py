"""The drill of docs/runbooks/disaster-recovery.md, performed: back up a gateway's key database and
config, lose both, restore them, and see through a real gateway that the old keys still work and the
usage ledger is intact. SQLite (`sqlite3 .backup`) and PostgreSQL (`pg_dump` / `pg_restore`).

The backend is the fake OpenAI server: the drill is about the gateway's own state, and the fake
reports fixed usage (10 prompt tokens each) so the ledger totals are exact."""

from __future__ import annotations

import glob
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from tests.deploy.conftest import start_gateway
from tests.gateway.conftest import GatewayProc, base_config
from tests.services import free_port, python_module, start_postgres, start_process

MESSAGES = [{"role": "user", "content": "hi"}]


def _pg(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        pytest.fail("PostgreSQL client tools are missing: run scripts/install-test-deps.sh")
    return found[-1]


def _chat(gateway: GatewayProc, key: str) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    client.chat.completions.create(model="m", messages=MESSAGES)


def _usage(gateway: GatewayProc, key_id: str) -> list[dict]:
    return gateway.admin("GET", "/admin/usage", params={"key_id": key_id}).json()["data"]


def _wait_for_requests(gateway: GatewayProc, key_id: str, requests: int, timeout: float = 30.0) -> list[dict]:
    """The ledger flushes in the background: poll until it holds `requests` requests for the key."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = _usage(gateway, key_id)
        if sum(row["requests"] for row in rows) >= requests:
            return rows
        time.sleep(0.1)
    raise AssertionError(f"usage never reached {requests} requests: {_usage(gateway, key_id)}")


@pytest.fixture
def fake_backend(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = start_process(python_module("tests.gateway.fake_backend", "--port", str(port), "--name", "a"),
                         port, tmp_path / "backend.log")
    yield proc.url
    proc.kill()


@pytest.fixture
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A PostgreSQL server with a database `lmserve` (the drill drops and restores it)."""
    tmp = Path(tempfile.mkdtemp(prefix="lmserve-dr-pg-"))
    tmp.chmod(0o755)
    proc, url = start_postgres(tmp)
    subprocess.run([_pg("psql"), "-h", "127.0.0.1", "-p", str(proc.port), "-U", "postgres", "-d", "postgres",
                    "-c", "CREATE DATABASE lmserve"], check=True, capture_output=True, timeout=60)
    yield url.rsplit("/", 1)[0] + "/lmserve", proc.port
    proc.stop()
    shutil.rmtree(tmp, ignore_errors=True)


def _drill(tmp_path: Path, backend_url: str, database_url: str, backup: Callable[[Path], None],
           wipe: Callable[[], None], restore: Callable[[Path], None]) -> None:
    config = base_config(tmp_path, [{"name": "m", "backends": [{"url": backend_url}]}], database_url=database_url)
    gateway = start_gateway(tmp_path, config)
    try:
        created = gateway.admin("POST", "/admin/keys", json={"name": "customer", "rpm": 1000}).json()
        for _ in range(3):
            _chat(gateway, created["key"])
        before = _wait_for_requests(gateway, created["id"], 3)
        backups = tmp_path / "backup"
        backups.mkdir()
        backup(backups)  # online, while the gateway serves
        shutil.copy(gateway.config_path, backups / "gateway.yaml")
    finally:
        gateway.proc.stop()

    wipe()
    gateway.config_path.unlink()

    shutil.copy(backups / "gateway.yaml", gateway.config_path)
    restore(backups)
    restored = start_gateway(tmp_path, {**config}, name="restored")
    try:
        assert _usage(restored, created["id"]) == before
        _chat(restored, created["key"])  # the old key authenticates
        after = _wait_for_requests(restored, created["id"], 4)
        assert sum(row["prompt_tokens"] for row in after) == sum(row["prompt_tokens"] for row in before) + 10
        with pytest.raises(openai.AuthenticationError):
            _chat(restored, "sk-not-a-key")
        keys = restored.admin("GET", "/admin/keys").json()["data"]
        assert [k["id"] for k in keys] == [created["id"]] and keys[0]["rpm"] == 1000
    finally:
        restored.proc.stop()


def test_sqlite_backup_wipe_restore(tmp_path: Path, fake_backend: str) -> None:
    sqlite3 = shutil.which("sqlite3")
    if sqlite3 is None:
        pytest.fail("sqlite3 is missing: run scripts/install-test-deps.sh")
    db = tmp_path / "keys.db"

    def backup(to: Path) -> None:
        subprocess.run([sqlite3, str(db), f".backup '{to / 'gateway.db'}'"], check=True, timeout=60)

    def wipe() -> None:
        db.unlink()
        assert not db.exists()

    def restore(backups: Path) -> None:
        subprocess.run([sqlite3, str(db), f".restore '{backups / 'gateway.db'}'"], check=True, timeout=60)

    _drill(tmp_path, fake_backend, f"sqlite:///{db}", backup, wipe, restore)


def test_postgresql_dump_wipe_restore(tmp_path: Path, fake_backend: str, postgres: tuple[str, int]) -> None:
    url, port = postgres
    conn = ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]

    def backup(to: Path) -> None:
        subprocess.run([_pg("pg_dump"), *conn, "-Fc", "-f", str(to / "gateway.dump"), "lmserve"],
                       check=True, timeout=120)

    def wipe() -> None:
        for sql in ("DROP DATABASE lmserve", "CREATE DATABASE lmserve"):
            subprocess.run([_pg("psql"), *conn, "-d", "postgres", "-c", sql], check=True, capture_output=True,
                           timeout=60)

    def restore(backups: Path) -> None:
        subprocess.run([_pg("pg_restore"), *conn, "-d", "lmserve", "--no-owner", str(backups / "gateway.dump")],
                       check=True, timeout=120)

    _drill(tmp_path, fake_backend, url, backup, wipe, restore)
