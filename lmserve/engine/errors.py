"""Errors the engine raises that a caller is expected to handle (the server maps them to HTTP)."""

from __future__ import annotations

from functools import partial


class EngineOverloaded(Exception):
    """The engine's queue is full: the request was not admitted and nothing else changed.

    `retry_after` is the engine's estimate, in seconds, of when a request like this one would be
    admitted (from the measured rate at which queued requests start); None when it has not
    measured that rate yet. The server answers 429 with `Retry-After`.
    """

    def __init__(self, message: str, *, limit: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        """The setting that was exceeded: max_queued_requests or max_queued_tokens."""
        self.retry_after = retry_after

    def __reduce__(self):  # type: ignore[no-untyped-def]
        """Pickles with its keyword arguments (it crosses from the engine process to the server)."""
        return partial(EngineOverloaded, limit=self.limit, retry_after=self.retry_after), (str(self),)
