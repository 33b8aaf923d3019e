"""Byte budgets: how much memory the data path may hold, per holder and server-wide.

Two shapes:

* ``ByteBudget``: an allowance that takers wait for, in arrival order (catch-up
  pages are read only once their bytes are reserved).
* ``PendingBytes``: a count that is always added to (the bytes already arrived)
  and says when it is full, so whoever feeds it stops reading until there is room.
"""

from __future__ import annotations

import asyncio
from collections import deque


class ByteBudget:
    """Up to ``limit`` bytes shared by many holders; a taker waits until its share fits.

    A request larger than the whole budget takes the whole budget (it waits until
    nobody else holds any), so one big item is never refused, only serialised.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.waits = 0
        """How many takers had to wait for room (a counter for metrics)."""
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, size: int) -> int:
        """Reserve ``size`` bytes (capped at the limit), waiting in line; returns what was taken."""
        size = min(size, self.limit)
        if not self._waiters and self.used + size <= self.limit:
            self.used += size
            return size
        self.waits += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.give(size)  # granted, but the taker went away
            else:
                self._waiters.remove(entry)
                self._wake()
            raise
        return size

    def give(self, size: int) -> None:
        """Return bytes taken earlier; the next takers in line that fit get them."""
        self.used -= size
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            size, future = waiters[0]
            if self.used + size > self.limit:
                return
            waiters.popleft()
            self.used += size
            future.set_result(None)


class PendingBytes:
    """Bytes that arrived and wait (for their commit); full at ``limit``, with room below it."""

    __slots__ = ("_room", "full", "limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.full = False
        self._room = asyncio.Event()
        self._room.set()

    def add(self, size: int) -> None:
        self.used += size
        self.check()

    def check(self) -> None:
        """Mark the count full when it reached the limit (after ``used`` grew directly)."""
        if self.used >= self.limit and not self.full:
            self.full = True
            self._room.clear()

    def remove(self, size: int) -> None:
        used = self.used = self.used - size
        if self.full and used < self.limit:
            self.full = False
            self._room.set()

    async def wait_for_room(self) -> None:
        await self._room.wait()
