"""Reassembly of VALUE_CHUNK sequences into whole values, bounded in memory and time. Pure.

Relaying never depends on this: every chunk is relayed as it came. This only
decides which complete values get stored, and throws away what cannot be.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sds.protocol import CHUNK_BYTES, ChunkHeader


class ChunkBudget:
    """Chunk memory of all connections together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


@dataclass
class _Sequence:
    count: int
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0
    touched: float = 0.0


class ChunkAssembler:
    """One connection's incomplete VALUE_CHUNK sequences, by value key."""

    def __init__(self, budget: ChunkBudget, *, limit: int, timeout: float) -> None:
        self.budget = budget
        self.limit = limit
        self.timeout = timeout
        self.used = 0
        self.discarded = 0
        self._sequences: dict[str, _Sequence] = {}

    def add(self, header: ChunkHeader, body: bytes, now: float | None = None) -> bytes | None:
        """Take one chunk; return the whole value when this chunk completes it.

        A chunk with another count than the earlier chunks of its key discards
        them and starts a new sequence. A count whose value cannot fit the
        per-connection limit, or no memory left, discards the sequence: nothing
        of it is stored.
        """
        now = time.monotonic() if now is None else now
        self.expire(now)
        if header.count * CHUNK_BYTES > self.limit and header.count > 1:
            self._discard(header.key)
            return None
        sequence = self._sequences.get(header.key)
        if sequence is not None and sequence.count != header.count:
            # Another count for the key: the old sequence is broken; this chunk may start anew.
            self._discard(header.key)
            sequence = None
        if sequence is None:
            sequence = self._sequences[header.key] = _Sequence(header.count)
        previous = sequence.parts.get(header.index)
        grow = len(body) - (len(previous) if previous is not None else 0)
        if self.used + grow > self.limit or self.budget.used + grow > self.budget.limit:
            self._discard(header.key)
            return None
        sequence.parts[header.index] = bytes(body)
        sequence.size += grow
        sequence.touched = now
        self._account(grow)
        if len(sequence.parts) < sequence.count:
            return None
        del self._sequences[header.key]
        self._account(-sequence.size)
        return b"".join(sequence.parts[index] for index in range(sequence.count))

    def expire(self, now: float | None = None) -> None:
        """Drop sequences that waited longer than the timeout for their next chunk."""
        now = time.monotonic() if now is None else now
        for key in [k for k, s in self._sequences.items() if now - s.touched > self.timeout]:
            self._discard(key)

    def clear(self) -> None:
        """Drop every incomplete sequence (the sender left)."""
        for key in list(self._sequences):
            self._discard(key)

    @property
    def pending(self) -> int:
        return len(self._sequences)

    def _discard(self, key: str) -> None:
        sequence = self._sequences.pop(key, None)
        if sequence is not None:
            self._account(-sequence.size)
            self.discarded += 1

    def _account(self, delta: int) -> None:
        self.used += delta
        self.budget.used += delta
