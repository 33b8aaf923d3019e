"""Background tasks that are not garbage-collected while they run, and are drained at shutdown.

The server keeps one ``Tasks`` on its application (``appkeys.TASKS``): everything it
spawns there is cancelled and awaited when the application shuts down. ``spawn``
without an owner (code that runs without the application) uses a module-level set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Tasks:
    """A set of running background tasks that can be drained."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._running)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background; the event loop only keeps weak references to tasks."""
        task = asyncio.ensure_future(coro)
        self._running.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed: %r", task.exception())

    async def drain(self, grace: float = 0.0) -> None:
        """Let the running tasks finish for up to ``grace`` seconds, then cancel and await the rest."""
        if not self._running:
            return
        if grace > 0:
            await asyncio.wait(set(self._running), timeout=grace)
        while self._running:
            tasks = set(self._running)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


_DEFAULT = Tasks()


def spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Run ``coro`` in the background, owned by no application (not drained at shutdown)."""
    return _DEFAULT.spawn(coro)
