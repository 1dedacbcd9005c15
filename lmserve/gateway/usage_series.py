"""Usage over time: the ledger's rows summed per hour or day, key and model, in SQL.

The ledger appends one row per key and model per flush (every `ledger_flush_interval` seconds), so a
busy day holds tens of thousands of rows: they are grouped in the database, never in Python. Bucket
labels are UTC, `YYYY-MM-DDTHH:00:00` (hours) or `YYYY-MM-DDT00:00:00` (days), the same for SQLite
and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

from lmserve.gateway.keystore import KeyStore, usage_ledger

BUCKETS = {"hour": dt.timedelta(hours=1), "day": dt.timedelta(days=1)}
MAX_BUCKETS = 24 * 31
"""The most buckets one query may span (a month of hours), so one request cannot scan the whole ledger."""


def _bucket_label(dialect: str, column: Any, bucket: str) -> Any:
    if dialect == "sqlite":  # SQLAlchemy stores SQLite datetimes as ISO text in UTC
        return sa.func.strftime("%Y-%m-%dT%H:00:00" if bucket == "hour" else "%Y-%m-%dT00:00:00", column)
    utc = sa.func.timezone("UTC", column)
    return sa.func.to_char(sa.func.date_trunc(bucket, utc), 'YYYY-MM-DD"T"HH24:MI:SS')


def usage_series(store: KeyStore, bucket: str, num_buckets: int, key_id: str | None = None,
                 now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Sums per (bucket, key, model) over the last `num_buckets` buckets (the current one included),
    oldest first. Raises ValueError for an unknown bucket or a span past `MAX_BUCKETS`."""
    if bucket not in BUCKETS:
        raise ValueError(f"bucket must be one of {sorted(BUCKETS)}, got {bucket!r}")
    if not 1 <= num_buckets <= MAX_BUCKETS:
        raise ValueError(f"buckets must be between 1 and {MAX_BUCKETS}, got {num_buckets}")
    now = now or dt.datetime.now(dt.timezone.utc)
    start = now.replace(minute=0, second=0, microsecond=0)
    if bucket == "day":
        start = start.replace(hour=0)
    since = start - BUCKETS[bucket] * (num_buckets - 1)
    c = usage_ledger.c
    label = _bucket_label(store.engine.dialect.name, c.recorded_at, bucket).label("bucket")
    query = (sa.select(label, c.key_id, c.model, sa.func.sum(c.requests), sa.func.sum(c.prompt_tokens),
                       sa.func.sum(c.completion_tokens), sa.func.sum(c.cached_tokens))
             .where(c.recorded_at >= since)
             .group_by(label, c.key_id, c.model).order_by(label, c.key_id, c.model))
    if key_id is not None:
        query = query.where(c.key_id == key_id)
    with store.engine.connect() as conn:
        rows = conn.execute(query).all()
    return [{"bucket": r[0], "key_id": r[1], "model": r[2], "requests": int(r[3]), "prompt_tokens": int(r[4]),
             "completion_tokens": int(r[5]), "cached_tokens": int(r[6])} for r in rows]
