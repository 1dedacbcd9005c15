"""Files, batches and per-request results in the gateway's database (the key store's SQLAlchemy engine).

File contents are stored in the database (`LargeBinary`: BLOB on SQLite, bytea on PostgreSQL), so
every gateway replica sharing the database serves every file, and one backup holds everything.

Exactly-once results: a request's result is one row keyed by (batch, line), inserted with the
batch's counters in one transaction; a worker that resumes a batch runs only the lines without a
row. A worker holds a batch through a lease (`lease_owner`, `lease_until`) renewed while it runs;
another worker (a replica, or this gateway after a restart) takes the batch over once it lapses.

All methods are synchronous (blocking I/O); the gateway calls them from worker threads.
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from lmserve.gateway.batches.records import ACTIVE, BatchRecord, FileRecord, batch_from_row, file_from_row

_metadata = sa.MetaData()
_ID = sa.String(64)
files = sa.Table(
    "lmserve_files", _metadata,
    sa.Column("id", _ID, primary_key=True),
    sa.Column("owner", sa.String(200), nullable=False, index=True),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("num_bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("content", sa.LargeBinary, nullable=False),
)
batches = sa.Table(
    "lmserve_batches", _metadata,
    sa.Column("id", _ID, primary_key=True),
    sa.Column("owner", sa.String(200), nullable=False, index=True),
    sa.Column("principal", sa.Text, nullable=False),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("input_file_id", _ID, nullable=False),
    sa.Column("completion_window", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Column("total", sa.Integer, nullable=False, default=0),
    sa.Column("completed", sa.Integer, nullable=False, default=0),
    sa.Column("failed", sa.Integer, nullable=False, default=0),
    sa.Column("output_file_id", _ID, nullable=True),
    sa.Column("error_file_id", _ID, nullable=True),
    sa.Column("errors", sa.Text, nullable=True),
    sa.Column("metadata_json", sa.Text, nullable=True),
    *(sa.Column(name, sa.BigInteger, nullable=True) for name in (
        "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
        "cancelled_at")),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_until", sa.Float, nullable=True),
)
results = sa.Table(
    "lmserve_batch_results", _metadata,
    sa.Column("batch_id", _ID, primary_key=True),
    sa.Column("line_index", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("is_error", sa.Boolean, nullable=False),
    sa.Column("line", sa.LargeBinary, nullable=False),
)


class _Moved(Exception):
    """The batch left the state a transaction expected: roll it back."""


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


class BatchStore:
    """Invariant: a batch's `completed + failed` equals its number of result rows."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        _metadata.create_all(engine)

    # Files.
    def create_file(self, owner: str, purpose: str, filename: str, content: bytes) -> FileRecord:
        record = FileRecord(new_id("file-"), owner, purpose, filename, len(content), int(time.time()))
        with self.engine.begin() as conn:
            conn.execute(files.insert().values(id=record.id, owner=owner, purpose=purpose, filename=filename,
                                               num_bytes=record.num_bytes, created_at=record.created_at,
                                               content=content))
        return record

    def get_file(self, owner: str, file_id: str) -> FileRecord | None:
        c = files.c
        query = sa.select(c.id, c.owner, c.purpose, c.filename, c.num_bytes, c.created_at).where(
            c.id == file_id, c.owner == owner)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return file_from_row(row) if row is not None else None

    def file_content(self, owner: str, file_id: str) -> bytes | None:
        query = sa.select(files.c.content).where(files.c.id == file_id, files.c.owner == owner)
        with self.engine.connect() as conn:
            content = conn.execute(query).scalar_one_or_none()
        return bytes(content) if content is not None else None

    def list_files(self, owner: str, purpose: str | None, after: str | None, limit: int) -> list[FileRecord]:
        c = files.c
        query = sa.select(c.id, c.owner, c.purpose, c.filename, c.num_bytes, c.created_at).where(c.owner == owner)
        if purpose is not None:
            query = query.where(c.purpose == purpose)
        query = self._page(query, files, owner, after, limit)
        with self.engine.connect() as conn:
            return [file_from_row(r) for r in conn.execute(query).all()]

    def delete_file(self, owner: str, file_id: str) -> bool:
        with self.engine.begin() as conn:
            result = conn.execute(files.delete().where(files.c.id == file_id, files.c.owner == owner))
        return result.rowcount > 0

    # Batches.
    def create_batch(self, owner: str, principal: dict[str, Any], endpoint: str, input_file_id: str,
                     completion_window: str, window_seconds: int, metadata: dict[str, str] | None) -> BatchRecord:
        now = int(time.time())
        batch_id = new_id("batch_")
        with self.engine.begin() as conn:
            conn.execute(batches.insert().values(
                id=batch_id, owner=owner, principal=orjson.dumps(principal).decode(), endpoint=endpoint,
                input_file_id=input_file_id, completion_window=completion_window, status="validating",
                created_at=now, expires_at=now + window_seconds, total=0, completed=0, failed=0,
                metadata_json=orjson.dumps(metadata).decode() if metadata is not None else None))
        return self.get_batch(batch_id)  # type: ignore[return-value]

    def get_batch(self, batch_id: str, owner: str | None = None) -> BatchRecord | None:
        """The batch; None when absent or (with `owner`) owned by someone else."""
        query = batches.select().where(batches.c.id == batch_id)
        if owner is not None:
            query = query.where(batches.c.owner == owner)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return batch_from_row(row) if row is not None else None

    def list_batches(self, owner: str, after: str | None, limit: int) -> list[BatchRecord]:
        query = self._page(batches.select().where(batches.c.owner == owner), batches, owner, after, limit)
        with self.engine.connect() as conn:
            return [batch_from_row(r) for r in conn.execute(query).all()]

    def recent_batches(self, limit: int) -> list[BatchRecord]:
        """Every owner's batches, newest first (the admin's view)."""
        query = batches.select().order_by(batches.c.created_at.desc(), batches.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [batch_from_row(r) for r in conn.execute(query).all()]

    @staticmethod
    def _page(query: sa.Select, table: sa.Table, owner: str, after: str | None, limit: int) -> sa.Select:
        """Newest first, ties broken by id; `after` an id: the rows that come after it in that order."""
        c = table.c
        if after is not None:
            anchor = sa.select(c.created_at).where(c.id == after, c.owner == owner).scalar_subquery()
            query = query.where(sa.or_(c.created_at < anchor, sa.and_(c.created_at == anchor, c.id < after)))
        return query.order_by(c.created_at.desc(), c.id.desc()).limit(limit)

    def request_cancel(self, owner: str, batch_id: str) -> BatchRecord | None:
        """Moves a validating or in-progress batch to cancelling; returns the batch as it now is."""
        c = batches.c
        with self.engine.begin() as conn:
            conn.execute(batches.update().where(c.id == batch_id, c.owner == owner,
                                                c.status.in_(("validating", "in_progress")))
                         .values(status="cancelling", cancelling_at=int(time.time())))
        return self.get_batch(batch_id, owner)

    def claim(self, worker_id: str, lease_seconds: float, skip: set[str]) -> list[BatchRecord]:
        """Takes the lease of every active batch whose lease is free, lapsed or already this worker's
        (oldest first), except those in `skip`; returns the batches claimed."""
        c = batches.c
        now = time.time()
        free = sa.or_(c.lease_owner.is_(None), c.lease_owner == worker_id, c.lease_until < now)
        with self.engine.connect() as conn:
            ids = [r.id for r in conn.execute(sa.select(c.id).where(c.status.in_(ACTIVE), free)
                                              .order_by(c.created_at, c.id)).all() if r.id not in skip]
        claimed = []
        for batch_id in ids:
            with self.engine.begin() as conn:
                result = conn.execute(batches.update().where(c.id == batch_id, c.status.in_(ACTIVE), free)
                                      .values(lease_owner=worker_id, lease_until=now + lease_seconds))
            if result.rowcount == 1:
                claimed.append(self.get_batch(batch_id))
        return [b for b in claimed if b is not None]

    def renew(self, worker_id: str, batch_id: str, lease_seconds: float) -> str | None:
        """Extends this worker's lease; returns the batch's status, or None when the lease was lost."""
        c = batches.c
        with self.engine.begin() as conn:
            result = conn.execute(batches.update().where(c.id == batch_id, c.lease_owner == worker_id)
                                  .values(lease_until=time.time() + lease_seconds))
            if result.rowcount != 1:
                return None
            return conn.execute(sa.select(c.status).where(c.id == batch_id)).scalar_one()

    def release(self, worker_id: str, batch_id: str) -> None:
        c = batches.c
        with self.engine.begin() as conn:
            conn.execute(batches.update().where(c.id == batch_id, c.lease_owner == worker_id)
                         .values(lease_owner=None, lease_until=None))

    def set_status(self, batch_id: str, status: str, only_from: tuple[str, ...], **values: Any) -> bool:
        """Moves the batch to `status` (stamping `<status>_at`) when it is in one of `only_from`."""
        c = batches.c
        stamp = f"{status}_at"
        if stamp in c and stamp not in values:
            values[stamp] = int(time.time())
        if "errors" in values and values["errors"] is not None:
            values["errors"] = orjson.dumps(values["errors"]).decode()
        with self.engine.begin() as conn:
            result = conn.execute(batches.update().where(c.id == batch_id, c.status.in_(only_from))
                                  .values(status=status, **values))
        return result.rowcount == 1

    # Results.
    def done_indexes(self, batch_id: str) -> set[int]:
        with self.engine.connect() as conn:
            return {r[0] for r in conn.execute(sa.select(results.c.line_index).where(results.c.batch_id == batch_id))}

    def record_result(self, batch_id: str, index: int, line: bytes, is_error: bool) -> bool:
        """Stores one request's result and counts it; False (nothing changed) when it was already stored."""
        c = batches.c
        counter = c.failed if is_error else c.completed
        try:
            with self.engine.begin() as conn:
                conn.execute(results.insert().values(batch_id=batch_id, line_index=index, is_error=is_error,
                                                     line=line))
                conn.execute(batches.update().where(c.id == batch_id).values({counter: counter + 1}))
        except IntegrityError:
            return False
        return True

    def finalize(self, batch_id: str, owner: str, from_status: str, status: str, extra_errors: list[bytes],
                 total: int | None = None) -> bool:
        """Writes the output and error files (results in input order, then `extra_errors`, counted as
        failed; `total`, when given, is the batch's request count) and moves the batch from `from_status`
        to `status`, all in one transaction: a crash before the commit leaves nothing behind, and the
        next worker redoes it whole. False (nothing written) when the batch had left `from_status`."""
        try:
            with self.engine.begin() as conn:
                self._finalize(conn, batch_id, owner, from_status, status, extra_errors, total)
        except _Moved:
            return False
        return True

    @staticmethod
    def _finalize(conn: sa.Connection, batch_id: str, owner: str, from_status: str, status: str,
                  extra_errors: list[bytes], total: int | None) -> None:
        now = int(time.time())
        c = batches.c
        rows = conn.execute(sa.select(results.c.is_error, results.c.line).where(results.c.batch_id == batch_id)
                            .order_by(results.c.line_index)).all()
        out = [bytes(r.line) for r in rows if not r.is_error]
        err = [bytes(r.line) for r in rows if r.is_error] + extra_errors
        file_ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for key, lines in (("output_file_id", out), ("error_file_id", err)):
            if not lines:
                continue
            content = b"\n".join(lines) + b"\n"
            file_ids[key] = new_id("file-")
            conn.execute(files.insert().values(id=file_ids[key], owner=owner, purpose="batch_output",
                                               filename=f"{batch_id}_{key.split('_')[0]}.jsonl",
                                               num_bytes=len(content), created_at=now, content=content))
        result = conn.execute(batches.update().where(c.id == batch_id, c.status == from_status).values(
            status=status, **{f"{status}_at": now}, failed=c.failed + len(extra_errors), **file_ids,
            total=c.total if total is None else total, lease_owner=None, lease_until=None))
        if result.rowcount != 1:
            raise _Moved()  # rolls the files back
