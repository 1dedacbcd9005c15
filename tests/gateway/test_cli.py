import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from lmserve.gateway.cli import _parse_expiry
from lmserve.gateway.keystore import KeyStore


def test_expiry_forms() -> None:
    now = dt.datetime.now(dt.timezone.utc)
    assert abs((_parse_expiry("30d") - now) - dt.timedelta(days=30)) < dt.timedelta(seconds=5)
    assert abs((_parse_expiry("12h") - now) - dt.timedelta(hours=12)) < dt.timedelta(seconds=5)
    assert _parse_expiry("2030-01-02") == dt.datetime(2030, 1, 2, tzinfo=dt.timezone.utc)
    assert _parse_expiry(None) is None
    with pytest.raises(typer.BadParameter):
        _parse_expiry("soon")


def _keys(*args: str, home: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LMSERVE_HOME": str(home)}
    env.pop("LMSERVE_GATEWAY_DATABASE_URL", None)
    env.pop("LMSERVE_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "lmserve.cli", "keys", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120, check=False)


def test_keys_use_the_stack_config_in_lmserve_home(tmp_path: Path) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    stack_db = f"sqlite:///{home / 'gateway.db'}"
    (home / "gateway.yaml").write_text(yaml.safe_dump({"database_url": stack_db, "models": []}))
    created = _keys("create", "--name", "from-home", home=home, cwd=cwd)
    assert created.returncode == 0, created.stderr
    key_id = json.loads(created.stdout)["id"]
    assert [r.id for r in KeyStore(stack_db).list_keys()] == [key_id]
    assert not (cwd / "lmserve-gateway.db").exists()
    # Without a stack config in the home, the default store in the working directory is used.
    (home / "gateway.yaml").unlink()
    created = _keys("create", "--name", "local", home=home, cwd=cwd)
    assert created.returncode == 0, created.stderr
    assert (cwd / "lmserve-gateway.db").exists()
    assert len(KeyStore(stack_db).list_keys()) == 1
