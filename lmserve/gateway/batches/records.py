"""Files and batches as stored, and their OpenAI JSON objects.

Times are Unix seconds (ints), as OpenAI's objects carry them. Batch states:
validating -> in_progress -> finalizing -> completed; validating -> failed; in_progress -> expired (the
window passed first); validating / in_progress -> cancelling -> cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
"""States a worker still has to move on; the others are final."""
FINAL = ("completed", "failed", "expired", "cancelled")
TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
              "cancelled_at")


@dataclass(frozen=True)
class FileRecord:
    """A stored file's metadata (its content is read separately)."""

    id: str
    owner: str
    purpose: str
    filename: str
    num_bytes: int
    created_at: int

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.num_bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None}


@dataclass(frozen=True)
class BatchRecord:
    """A stored batch. `principal` is the creator's identity as JSON (whose limits and ledger it runs under)."""

    id: str
    owner: str
    principal: dict[str, Any]
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    expires_at: int
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    times: dict[str, int | None] = field(default_factory=dict)
    """The state timestamps (`TIMESTAMPS`), None until the batch reached that state."""

    def as_openai(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "expires_at": self.expires_at,
            **{name: self.times.get(name) for name in TIMESTAMPS},
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        }


def batch_from_row(row: Any) -> BatchRecord:
    return BatchRecord(
        id=row.id, owner=row.owner, principal=orjson.loads(row.principal), endpoint=row.endpoint,
        input_file_id=row.input_file_id, completion_window=row.completion_window, status=row.status,
        created_at=row.created_at, expires_at=row.expires_at, total=row.total, completed=row.completed,
        failed=row.failed, output_file_id=row.output_file_id, error_file_id=row.error_file_id,
        errors=orjson.loads(row.errors) if row.errors else None,
        metadata=orjson.loads(row.metadata_json) if row.metadata_json else None,
        times={name: getattr(row, name) for name in TIMESTAMPS},
    )


def file_from_row(row: Any) -> FileRecord:
    return FileRecord(row.id, row.owner, row.purpose, row.filename, row.num_bytes, row.created_at)
