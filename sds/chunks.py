"""Reassembly of VALUE_CHUNK sequences into whole values, bounded in memory and time. Pure.

Relaying never depends on this: every chunk is relayed as it came. This only
decides which complete values get stored, and throws away what cannot be.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from sds.protocol import CHUNK_BYTES, ChunkHeader


class ChunkBudget:
    """Chunk memory of all connections together, and of each store's connections."""

    def __init__(self, limit: int, per_store: int | None = None) -> None:
        self.limit = limit
        self.per_store = limit if per_store is None else per_store
        self.used = 0
        self.stores: dict[str, int] = {}
        """Bytes held per store id (only stores holding some)."""

    def refusal(self, store_id: str, grow: int) -> str | None:
        """Why ``grow`` more bytes for ``store_id`` do not fit, or None when they do."""
        if self.stores.get(store_id, 0) + grow > self.per_store:
            return "store_limit"
        if self.used + grow > self.limit:
            return "total_limit"
        return None

    def account(self, store_id: str, delta: int) -> None:
        self.used += delta
        held = self.stores.get(store_id, 0) + delta
        if held:
            self.stores[store_id] = held
        else:
            self.stores.pop(store_id, None)


class ChunkRefused(Exception):
    """A VALUE_CHUNK sequence cannot be stored for lack of memory: its sender must learn it.

    ``reason`` is ``client_limit`` (the connection holds its limit), ``store_limit``
    (the store's connections hold theirs) or ``total_limit`` (all connections).
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"value {key[:12]} cannot be stored: {reason}")
        self.key = key
        self.reason = reason


@dataclass
class _Sequence:
    count: int
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0
    touched: float = 0.0


class ChunkAssembler:
    """One connection's incomplete VALUE_CHUNK sequences, by value key."""

    def __init__(
        self,
        budget: ChunkBudget,
        *,
        limit: int,
        timeout: float,
        store_id: str = "",
        not_stored: Counter[str] | None = None,
    ) -> None:
        self.budget = budget
        self.limit = limit
        self.timeout = timeout
        self.store_id = store_id
        self.not_stored: Counter[str] = Counter() if not_stored is None else not_stored
        """Sequences given up, by reason (the server's ``values_not_stored`` metric)."""
        self.used = 0
        self.discarded = 0
        self._sequences: dict[str, _Sequence] = {}

    def add(self, header: ChunkHeader, body: bytes, now: float | None = None) -> bytes | None:
        """Take one chunk; return the whole value when this chunk completes it.

        A chunk with another count than the earlier chunks of its key discards
        them and starts a new sequence. A count whose value cannot fit the
        per-connection limit is a malformed header: the sequence is discarded.
        No memory left (for this connection, its store or all connections)
        discards the sequence and raises ChunkRefused: nothing of it is stored,
        and the caller tells the sender.
        """
        now = time.monotonic() if now is None else now
        self.expire(now)
        if header.count * CHUNK_BYTES > self.limit and header.count > 1:
            # A header check: the value can never fit, the sequence is malformed.
            self._discard(header.key, "count_too_large")
            return None
        sequence = self._sequences.get(header.key)
        if sequence is not None and sequence.count != header.count:
            # Another count for the key: the old sequence is broken; this chunk may start anew.
            self._discard(header.key, "count_changed")
            sequence = None
        if sequence is None:
            sequence = self._sequences[header.key] = _Sequence(header.count)
        previous = sequence.parts.get(header.index)
        grow = len(body) - (len(previous) if previous is not None else 0)
        refusal = "client_limit" if self.used + grow > self.limit else None
        refusal = refusal or self.budget.refusal(self.store_id, grow)
        if refusal is not None:
            self._discard(header.key, refusal)
            raise ChunkRefused(header.key, refusal)
        sequence.parts[header.index] = bytes(body)
        sequence.size += grow
        sequence.touched = now
        self._account(grow)
        if len(sequence.parts) < sequence.count:
            return None
        del self._sequences[header.key]
        self._account(-sequence.size)
        return b"".join(sequence.parts[index] for index in range(sequence.count))

    def expire(self, now: float | None = None) -> list[str]:
        """Drop sequences that waited longer than the timeout for their next chunk; their keys."""
        now = time.monotonic() if now is None else now
        keys = [k for k, s in self._sequences.items() if now - s.touched > self.timeout]
        for key in keys:
            self._discard(key, "timeout")
        return keys

    def clear(self) -> None:
        """Drop every incomplete sequence (the sender left)."""
        for key in list(self._sequences):
            self._discard(key, "sender_left")

    @property
    def pending(self) -> int:
        return len(self._sequences)

    def _discard(self, key: str, reason: str) -> None:
        sequence = self._sequences.pop(key, None)
        if sequence is not None:
            self._account(-sequence.size)
            self.discarded += 1
        self.not_stored[reason] += 1

    def _account(self, delta: int) -> None:
        self.used += delta
        self.budget.account(self.store_id, delta)
