"""Which process owns a store: on one machine, the holder of the store's lock file.

Several sds processes of one machine share a lock directory: a server's persist
dir (the store file's own lock, taken by ``sds.storage``), or ``--lock-dir`` for
relay-only processes. The process holding a store's lock owns the store; its lock
record (``sds.storage.LockRecord``) says where it is reached. Signalling rooms are
owned the same way, by a lock of their own (``<name>.signal.lock``), so the peers
of one room never split either.

A process that gets a connection for a store another live process owns forwards
it there (``sds.forwarding``). An owner whose clients of a store have all arrived
forwarded for ``--handover-grace`` seconds hands the store over: it stops admitting
for it, writes a ``handover`` record into the lock (so nobody forwards to it any
more and the next process waits for the lock instead of refusing), closes the
store's clients with 1012 once its commits are done, and releases the lock. The
clients reconnect through the proxy, and the process the proxy routes them to
takes the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from sds.storage import (
    LOCK_SUFFIX,
    SERVER_RECORD_PREFIX,
    LockRecord,
    lock_holder,
    rewrite_record,
    store_filename,
    try_lock,
    unlock,
)

if TYPE_CHECKING:
    from sds.background import Tasks
    from sds.metrics import Metrics
    from sds.storage import Storage

log = logging.getLogger(__name__)

WS = "ws"
SIGNAL = "signal"
FORWARDED_HEADER = "X-SDS-Forwarded-By"
"""Marks a connection one sds process forwarded to another; the value is its instance id."""
NOT_OWNER_HEADER = "X-SDS-Not-Owner"
"""On a 503 to a forwarded connection: this process does not own the store (ask again)."""
HANDOVER = "handover"
"""The ``command`` of a lock record whose store is being handed over (no URL: do not forward)."""
CLOSE_SERVICE_RESTART = 1012
HANDOVER_DRAIN_SECONDS = 10.0
"""How long a handover waits for the store's clients to leave and its commits to finish."""
RELEASE_WAIT_SECONDS = 10.0
"""How long a connection waits for a handover of its store in this process to finish."""
_INSTANCE = re.compile(r"^[0-9a-f]{16}$")

Key = tuple[str, str]
"""(kind, store id): a /ws store or a /signal room."""


class NotOwner(Exception):
    """A forwarded connection reached a process that does not own its store."""


@dataclasses.dataclass
class Use:
    """Who uses one store or room here: direct and forwarded clients."""

    direct: int = 0
    forwarded: int = 0
    timer: asyncio.TimerHandle | None = None


class Ownership:
    """The stores and rooms this process owns, how to find another owner, and handovers."""

    def __init__(
        self,
        lock_dir: Path,
        *,
        storage: Storage | None,
        metrics: Metrics,
        tasks: Tasks,
        handover_grace: float = 2.0,
        lock_timeout: float = 5.0,
    ) -> None:
        self.lock_dir = lock_dir
        self.storage = storage
        self.metrics = metrics
        self.tasks = tasks
        self.handover_grace = handover_grace
        self.lock_timeout = lock_timeout
        self._record = (
            None
            if storage is not None
            else LockRecord(pid=os.getpid(), instance=secrets.token_hex(8))
        )
        self._held: dict[Path, list[int]] = {}
        """Locks this module holds itself (rooms, relay-only stores): path -> [fd, users]."""
        self._taking: dict[Path, asyncio.Lock] = {}
        self._uses: dict[Key, Use] = {}
        self.releasing: dict[Key, asyncio.Event] = {}
        self._server_fd: int | None = None
        self.close_clients: Callable[[Key, int, str], None] = lambda key, code, reason: None
        """Set by the application: close every local client of a store or room."""
        self.in_use: Callable[[Key], bool] = lambda key: False
        """Set by the application: True while a store or room has a live object here."""
        self.pipes: set[Callable[[int, str], None]] = set()
        """Closers of the forwarded connections this process pipes to other owners."""
        self.session: aiohttp.ClientSession | None = None
        """The HTTP client of forwarded connections (sds.forwarding)."""

    @property
    def record(self) -> LockRecord:
        """What this process writes into the locks it takes (its URL once advertised)."""
        if self.storage is not None:
            return self.storage.holder
        assert self._record is not None
        return self._record

    @property
    def instance(self) -> str:
        return self.record.instance

    def advertise(self, url: str) -> None:
        """Record this process's URL; relay-only, also leave a server record in the lock dir."""
        if self.storage is not None:
            return  # Storage.advertise records it (and the server record)
        self._record = dataclasses.replace(self.record, url=url)
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        if self._server_fd is None:
            try:
                self._server_fd = try_lock(
                    self.lock_dir / f"{SERVER_RECORD_PREFIX}{self.instance}",
                    timeout=2.0,
                    record=self.record,
                )
            except OSError as exc:
                log.warning("cannot write the server record in %s: %s", self.lock_dir, exc)

    def is_live_server(self, instance: str) -> bool:
        """True when ``instance`` is a server holding its record in the lock dir now."""
        if not _INSTANCE.match(instance):
            return False
        with contextlib.suppress(OSError):
            return lock_holder(self.lock_dir / f"{SERVER_RECORD_PREFIX}{instance}") is not None
        return False

    def lock_base(self, key: Key) -> Path:
        """The path whose ``.lock`` is the lock of a store or room."""
        kind, store_id = key
        name = store_filename(store_id)
        if kind == SIGNAL:
            return self.lock_dir / (name[: -len(".db")] + ".signal")
        return self.lock_dir / name

    def _self_locked(self, key: Key) -> bool:
        """Locks this module takes; a persistent server's stores are locked by their files."""
        return key[0] == SIGNAL or self.storage is None

    def owns(self, key: Key) -> bool:
        if self._self_locked(key):
            return self.lock_base(key) in self._held
        assert self.storage is not None
        return self.storage.holds(key[1])

    def holder(self, key: Key) -> LockRecord | None:
        """The record of whoever holds the lock now (None: nobody)."""
        try:
            return lock_holder(self.lock_base(key))
        except OSError:
            return None

    async def route(self, key: Key, *, forwarded: bool) -> str | None:
        """Where a connection of ``key`` is served: None here, or the owner's URL.

        A forwarded connection is served only by the owner (NotOwner otherwise, and
        an owner that does not use the store releases it at once to the forwarder).
        """
        event = self.releasing.get(key)
        if event is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RELEASE_WAIT_SECONDS):
                    await event.wait()
        if self.owns(key):
            if forwarded and not self.in_use(key):
                # Unused here (a file in its close grace): the forwarder takes it.
                self.hand_over(key)
                raise NotOwner
            return None
        if forwarded:
            raise NotOwner
        holder = self.holder(key)
        if holder is None or holder.instance == self.instance or not holder.url:
            # Free, ours, or held by a command or a handover: take it here (waiting for it).
            return None
        return holder.url

    async def claim(self, key: Key) -> None:
        """Take (or share) the lock of a store or room this module locks itself.

        StoreLocked (with the owner's record) when another server holds it.
        """
        if not self._self_locked(key):
            return
        base = self.lock_base(key)
        taking = self._taking.setdefault(base, asyncio.Lock())
        async with taking:
            held = self._held.get(base)
            if held is not None:
                held[1] += 1
                return
            loop = asyncio.get_running_loop()
            record = self.record
            fd = await loop.run_in_executor(
                None, lambda: try_lock(base, timeout=self.lock_timeout, record=record)
            )
            self._held[base] = [fd, 1]
            self.metrics.ownership_changes["acquired"] += 1
        if not taking.locked():
            self._taking.pop(base, None)

    def unclaim(self, key: Key) -> None:
        """One user fewer of a lock taken by ``claim``; the last one releases it."""
        if not self._self_locked(key):
            return
        base = self.lock_base(key)
        held = self._held.get(base)
        if held is None:
            return
        held[1] -= 1
        if held[1] <= 0:
            del self._held[base]
            unlock(held[0])
            if key not in self.releasing:
                self.metrics.ownership_changes["released"] += 1

    def joined(self, key: Key, *, forwarded: bool) -> None:
        use = self._uses.setdefault(key, Use())
        if forwarded:
            use.forwarded += 1
        else:
            use.direct += 1
        self._watch(key, use)

    def left(self, key: Key, *, forwarded: bool) -> None:
        use = self._uses.get(key)
        if use is None:
            return
        if forwarded:
            use.forwarded -= 1
        else:
            use.direct -= 1
        if use.direct <= 0 and use.forwarded <= 0:
            if use.timer is not None:
                use.timer.cancel()
            del self._uses[key]
            return
        self._watch(key, use)

    def _watch(self, key: Key, use: Use) -> None:
        """Only forwarded clients: hand over after the grace; a direct client cancels it."""
        if use.direct == 0 and use.forwarded > 0:
            if use.timer is None and key not in self.releasing:
                loop = asyncio.get_running_loop()
                use.timer = loop.call_later(self.handover_grace, self._due, key)
        elif use.timer is not None:
            use.timer.cancel()
            use.timer = None

    def _due(self, key: Key) -> None:
        use = self._uses.get(key)
        if use is None:
            return
        use.timer = None
        if use.direct == 0 and use.forwarded > 0:
            self.hand_over(key)

    def _mark(self, key: Key, record: LockRecord) -> None:
        if self._self_locked(key):
            held = self._held.get(self.lock_base(key))
            if held is not None:
                rewrite_record(held[0], record)
        elif self.storage is not None:
            self.storage.mark(key[1], record)

    def handover_record(self) -> LockRecord:
        return dataclasses.replace(self.record, url=None, command=HANDOVER)

    def hand_over(self, key: Key) -> None:
        """Let another process own ``key``: stop admitting, close with 1012, release the lock.

        The lock says ``handover`` before this returns, so a process that looks next
        waits for the lock instead of forwarding here.
        """
        if key in self.releasing or not self.owns(key):
            return
        event = self.releasing[key] = asyncio.Event()
        self._mark(key, self.handover_record())
        self.tasks.spawn(self._finish_handover(key, event))

    async def _finish_handover(self, key: Key, event: asyncio.Event) -> None:
        released = False
        try:
            self.close_clients(key, CLOSE_SERVICE_RESTART, "store handed over")
            deadline = time.monotonic() + HANDOVER_DRAIN_SECONDS
            while self.in_use(key) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if self._self_locked(key):
                released = not self.owns(key)
            elif self.storage is not None and not self.in_use(key):
                released = await self.storage.close_now(key[1])
            if released:
                self.metrics.ownership_changes["handed_over"] += 1
                log.info(
                    "%s %s handed over: its clients reconnect through the proxy",
                    "store" if key[0] == WS else "signalling room",
                    key[1],
                    extra={"event": "handover", "store_id": key[1], "kind": key[0]},
                )
            else:
                self._mark(key, self.record)
        finally:
            del self.releasing[key]
            event.set()

    def retire(self, code: int) -> None:
        """Shutting down: every lock says handover (other processes wait for it instead of
        forwarding here), and the connections this process forwards are closed with ``code``."""
        record = self.handover_record()
        for fd, _users in self._held.values():
            rewrite_record(fd, record)
        if self.storage is not None:
            for file in self.storage.open_files():
                if file.lock_fd is not None:
                    rewrite_record(file.lock_fd, record)
        for close in list(self.pipes):
            close(code, "server shutting down")

    def close(self) -> None:
        for fd, _users in self._held.values():
            unlock(fd)
        self._held.clear()
        if self._server_fd is not None:
            with contextlib.suppress(OSError):
                (self.lock_dir / f"{SERVER_RECORD_PREFIX}{self.instance}{LOCK_SUFFIX}").unlink()
            unlock(self._server_fd)
            self._server_fd = None
