"""API keys and the usage ledger in SQL (SQLite by default, PostgreSQL by URL), via SQLAlchemy Core.

Only a SHA-256 hash of each key is stored. Keys are 32 random bytes, so a fast hash is enough:
there is nothing to brute-force, and the gateway can verify a key in microseconds. The plaintext is
returned once, by `create_key`.

All methods are synchronous (blocking I/O); the gateway calls them from a worker thread and never on
the per-request path (keys are cached in memory, usage is written in batches).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import uuid
from dataclasses import dataclass

import sqlalchemy as sa

KEY_PREFIX = "lms-"

_metadata = sa.MetaData()
api_keys = sa.Table(
    "lmserve_api_keys", _metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("key_prefix", sa.String(16), nullable=False),
    sa.Column("tenant", sa.String(200), nullable=True),
    sa.Column("models", sa.Text, nullable=True),
    sa.Column("rpm", sa.Integer, nullable=True),
    sa.Column("tpm", sa.Integer, nullable=True),
    sa.Column("budget_tokens", sa.BigInteger, nullable=True),
    sa.Column("priority", sa.String(10), nullable=False, server_default="normal"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
)
usage_ledger = sa.Table(
    "lmserve_usage", _metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("key_id", sa.String(200), nullable=False, index=True),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("requests", sa.Integer, nullable=False),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False),
    sa.Column("cached_tokens", sa.BigInteger, nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)

PRIORITIES = ("high", "normal", "low")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


@dataclass(frozen=True)
class KeyRecord:
    """A stored key (never the plaintext). `models` None means every model."""

    id: str
    name: str
    key_prefix: str
    tenant: str | None
    models: frozenset[str] | None
    rpm: int | None
    tpm: int | None
    budget_tokens: int | None
    priority: str
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None

    def is_expired(self, now: dt.datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id, "name": self.name, "key_prefix": self.key_prefix, "tenant": self.tenant,
            "models": sorted(self.models) if self.models is not None else None, "rpm": self.rpm,
            "tpm": self.tpm, "budget_tokens": self.budget_tokens, "priority": self.priority,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


@dataclass(frozen=True)
class UsageRow:
    """One ledger increment for a key and model."""

    key_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


def _record(row: sa.Row) -> KeyRecord:
    models = frozenset(m for m in row.models.split(",") if m) if row.models is not None else None
    created_at = row.created_at.replace(tzinfo=dt.timezone.utc) if row.created_at.tzinfo is None else row.created_at
    return KeyRecord(row.id, row.name, row.key_prefix, row.tenant, models, row.rpm, row.tpm, row.budget_tokens,
                     row.priority, created_at, _utc(row.expires_at), _utc(row.revoked_at))


class KeyStore:
    """Keys and usage in one database. Invariant: `key_hash` is unique; plaintext is never stored."""

    def __init__(self, database_url: str) -> None:
        connect_args = {"check_same_thread": False} if database_url.startswith("sqlite") else {}
        self.engine = sa.create_engine(database_url, pool_pre_ping=True, connect_args=connect_args)
        _metadata.create_all(self.engine)

    def create_key(self, name: str, models: list[str] | None = None, rpm: int | None = None,
                   tpm: int | None = None, budget_tokens: int | None = None, tenant: str | None = None,
                   priority: str = "normal", expires_at: dt.datetime | None = None) -> tuple[str, KeyRecord]:
        """Creates a key; returns (plaintext, record). The plaintext is not recoverable later."""
        if not name:
            raise ValueError("a key needs a name")
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}")
        for label, value in (("rpm", rpm), ("tpm", tpm), ("budget_tokens", budget_tokens)):
            if value is not None and value < 0:
                raise ValueError(f"{label} must be >= 0")
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = uuid.uuid4().hex[:16]
        values = {
            "id": key_id, "name": name, "key_hash": hash_key(plaintext), "key_prefix": plaintext[:10],
            "tenant": tenant, "models": ",".join(models) if models is not None else None, "rpm": rpm,
            "tpm": tpm, "budget_tokens": budget_tokens, "priority": priority,
            "created_at": dt.datetime.now(dt.timezone.utc), "expires_at": _utc(expires_at), "revoked_at": None,
        }
        with self.engine.begin() as conn:
            conn.execute(api_keys.insert().values(**values))
        return plaintext, self.get(key_id)  # type: ignore[return-value]

    def get(self, key_id: str) -> KeyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(api_keys.select().where(api_keys.c.id == key_id)).first()
        return _record(row) if row is not None else None

    def find_by_hash(self, key_hash: str) -> KeyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(api_keys.select().where(api_keys.c.key_hash == key_hash)).first()
        return _record(row) if row is not None else None

    def list_keys(self) -> list[KeyRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(api_keys.select().order_by(api_keys.c.created_at)).all()
        return [_record(r) for r in rows]

    def revoke(self, key_id_or_prefix: str) -> bool:
        """Revokes by id or by the shown prefix; True when a live key was revoked."""
        now = dt.datetime.now(dt.timezone.utc)
        match = sa.or_(api_keys.c.id == key_id_or_prefix, api_keys.c.key_prefix == key_id_or_prefix)
        with self.engine.begin() as conn:
            result = conn.execute(api_keys.update().where(match, api_keys.c.revoked_at.is_(None))
                                  .values(revoked_at=now))
        return result.rowcount > 0

    def record_usage(self, rows: list[UsageRow]) -> None:
        """Appends one batch of ledger rows in a single transaction."""
        if not rows:
            return
        now = dt.datetime.now(dt.timezone.utc)
        with self.engine.begin() as conn:
            conn.execute(usage_ledger.insert(), [{**r.__dict__, "recorded_at": now} for r in rows])

    def usage(self, key_id: str | None = None) -> list[dict[str, object]]:
        """Totals per key and model (all keys when `key_id` is None)."""
        c = usage_ledger.c
        query = sa.select(c.key_id, c.model, sa.func.sum(c.requests), sa.func.sum(c.prompt_tokens),
                          sa.func.sum(c.completion_tokens), sa.func.sum(c.cached_tokens)
                          ).group_by(c.key_id, c.model).order_by(c.key_id, c.model)
        if key_id is not None:
            query = query.where(c.key_id == key_id)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [{"key_id": r[0], "model": r[1], "requests": int(r[2]), "prompt_tokens": int(r[3]),
                 "completion_tokens": int(r[4]), "cached_tokens": int(r[5])} for r in rows]

    def total_tokens(self, key_id: str) -> int:
        c = usage_ledger.c
        query = sa.select(sa.func.coalesce(sa.func.sum(c.prompt_tokens + c.completion_tokens), 0)
                          ).where(c.key_id == key_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def close(self) -> None:
        self.engine.dispose()
