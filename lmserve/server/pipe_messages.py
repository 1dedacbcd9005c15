"""Reads the messages `multiprocessing.connection.Connection.send` writes, from a non-blocking pipe.

`Connection.recv` assumes a blocking descriptor: it reads a 4-byte length, then loops until the
whole pickle is in. On an event loop's non-blocking descriptor (uvloop makes every descriptor given
to `add_reader` non-blocking) a message that is still being written ends that loop with
`BlockingIOError`, the stream is left mid-message, and the caller can only give up. This reader
keeps what has arrived and hands out whole messages only, so a read never waits and never fails on
a message written in parts (one above 16 KiB is always written as a header, then a body; one above
the pipe's capacity, in as many parts as it takes).
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any

_HEADER = struct.Struct("!i")
_LONG_HEADER = struct.Struct("!Q")
"""Follows a header of -1: the length of a message of 2 GiB or more."""
_CHUNK_BYTES = 2**20
_MAX_BYTES_PER_READ = 8 * 2**20
"""Bytes taken per `read_messages` call at most, so a writer that never pauses cannot keep the
event loop in one callback."""


class PipeMessageReader:
    """Invariant: `_buffer` holds the bytes read but not yet handed out, starting at a message's header."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.is_closed = False
        """The writer closed its end: no message will follow the ones already returned."""
        self._buffer = bytearray()

    def read_messages(self) -> list[Any]:
        """The messages that are complete now, in order; [] when only part of one has arrived."""
        taken = 0
        while taken < _MAX_BYTES_PER_READ:
            try:
                chunk = os.read(self.fd, _CHUNK_BYTES)
            except BlockingIOError:
                break
            if not chunk:
                self.is_closed = True
                break
            self._buffer += chunk
            taken += len(chunk)
        return self._split()

    def _split(self) -> list[Any]:
        messages, offset, buffer = [], 0, self._buffer
        while True:
            if len(buffer) - offset < _HEADER.size:
                break
            (size,) = _HEADER.unpack_from(buffer, offset)
            start = offset + _HEADER.size
            if size == -1:
                if len(buffer) - start < _LONG_HEADER.size:
                    break
                (size,) = _LONG_HEADER.unpack_from(buffer, start)
                start += _LONG_HEADER.size
            if len(buffer) - start < size:
                break
            messages.append(pickle.loads(buffer[start:start + size]))
            offset = start + size
        del buffer[:offset]
        return messages
