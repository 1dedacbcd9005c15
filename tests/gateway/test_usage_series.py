"""Usage per hour or day (the console's usage chart), grouped in SQLite and in a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmserve.gateway.keystore import KeyStore, usage_ledger
from lmserve.gateway.usage_series import usage_series

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 12, 3, 17, 30, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyStore]:
    url = f"sqlite:///{tmp_path / 'keys.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    store = KeyStore(url)
    with store.engine.begin() as conn:
        conn.execute(usage_ledger.delete())
    yield store
    store.close()


def add(store: KeyStore, when: dt.datetime, key_id: str, requests: int, tokens: tuple[int, int, int]) -> None:
    with store.engine.begin() as conn:
        conn.execute(usage_ledger.insert().values(key_id=key_id, model="m", requests=requests, prompt_tokens=tokens[0],
                                                  completion_tokens=tokens[1], cached_tokens=tokens[2],
                                                  recorded_at=when))


def row(bucket: str, key_id: str, requests: int, tokens: tuple[int, int, int]) -> dict[str, object]:
    return {"bucket": bucket, "key_id": key_id, "model": "m", "requests": requests, "prompt_tokens": tokens[0],
            "completion_tokens": tokens[1], "cached_tokens": tokens[2]}


def test_rows_are_summed_per_hour_and_day_in_utc(store: KeyStore) -> None:
    add(store, dt.datetime(2026, 12, 3, 17, 10, tzinfo=UTC), "k1", 1, (10, 5, 2))
    add(store, dt.datetime(2026, 12, 3, 17, 29, 59, tzinfo=UTC), "k1", 2, (20, 10, 0))
    add(store, dt.datetime(2026, 12, 3, 16, 59, 59, tzinfo=UTC), "k1", 1, (1, 1, 0))
    add(store, dt.datetime(2026, 12, 3, 16, 15, tzinfo=UTC), "k2", 1, (7, 7, 7))
    add(store, dt.datetime(2026, 12, 2, 17, 59, tzinfo=UTC), "k1", 5, (50, 50, 0))  # 24 hours back: outside
    assert usage_series(store, "hour", 24, now=NOW) == [
        row("2026-12-03T16:00:00", "k1", 1, (1, 1, 0)),
        row("2026-12-03T16:00:00", "k2", 1, (7, 7, 7)),
        row("2026-12-03T17:00:00", "k1", 3, (30, 15, 2)),
    ]
    assert usage_series(store, "hour", 1, key_id="k1", now=NOW) == [row("2026-12-03T17:00:00", "k1", 3, (30, 15, 2))]
    assert usage_series(store, "day", 2, key_id="k1", now=NOW) == [
        row("2026-12-02T00:00:00", "k1", 5, (50, 50, 0)), row("2026-12-03T00:00:00", "k1", 4, (31, 16, 2))]


def test_unknown_buckets_and_long_spans_are_refused(store: KeyStore) -> None:
    with pytest.raises(ValueError, match="bucket must be one of"):
        usage_series(store, "minute", 10)
    with pytest.raises(ValueError, match="between 1 and"):
        usage_series(store, "hour", 100_000)
