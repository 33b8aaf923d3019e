"""Which process owns a store: the holder of the store's lock.

Several sds processes of one machine share a lock directory: a server's persist
dir (the store file's own lock, taken by ``sds.backends.sqlite``), or ``--lock-dir``
for processes without one. The process holding a store's lock owns the store; its
lock record (``sds.backends.sqlite.LockRecord``) says where it is reached.
Servers on several machines keep the locks in their PostgreSQL database instead
(``sds.pg_ownership``, behind the same ``Locks`` interface). Signalling rooms are
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
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from sds.backends.sqlite import (
    HANDOVER_COMMAND,
    LOCK_SUFFIX,
    SERVER_RECORD_PREFIX,
    LockRecord,
    lock_holder,
    rewrite_record,
    store_filename,
    try_lock,
    unlock,
)
from sds.backends.sqlite import StoreLocked as StoreLocked  # raised by Locks.take

if TYPE_CHECKING:
    from sds.backends.sqlite import Storage as SqliteStorage
    from sds.background import Tasks
    from sds.metrics import Metrics

log = logging.getLogger(__name__)

WS = "ws"
SIGNAL = "signal"
FORWARDED_HEADER = "X-SDS-Forwarded-By"
"""Marks a connection one sds process forwarded to another; the value is its instance id."""
NOT_OWNER_HEADER = "X-SDS-Not-Owner"
"""On a 503 to a forwarded connection: this process does not own the store (ask again)."""
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
    failback: bool = False
    """A client came forwarded by the server this process took the store from."""
    timer: asyncio.TimerHandle | None = None

    def due(self) -> bool:
        return self.forwarded > 0 and (self.direct == 0 or self.failback)


def same_lock(a: str, b: str) -> bool:
    """True when two store ids share one lock on one machine (one file name)."""
    return store_filename(a) == store_filename(b)


async def ownership_for(
    lock_dir: Path | None,
    storage: object,
    *,
    database_url: str | None,
    database_ownership: bool = True,
    metrics: Metrics,
    tasks: Tasks,
    handover_grace: float,
) -> Ownership | None:
    """Ownership among the processes of one lock dir, or of one PostgreSQL database.

    A persist dir's store files are locked by the SQLite backend itself; relay-only
    processes (or PostgreSQL ones on one machine) take lock files in ``lock_dir``;
    otherwise, with ``database_ownership``, PostgreSQL servers own stores in the database
    (sds.pg_ownership). None: a process on its own.
    """
    from sds.backends.sqlite import Storage as SqliteStorage

    if lock_dir is not None:
        return Ownership(
            lock_dir,
            storage=storage if isinstance(storage, SqliteStorage) else None,
            metrics=metrics,
            tasks=tasks,
            handover_grace=handover_grace,
        )
    if database_url is None or not database_ownership:
        return None
    from sds.pg_ownership import PgLocks

    locks = PgLocks(database_url, describe=getattr(storage, "where", "the database"))
    await locks.start()
    ownership = Ownership(
        None,
        storage=None,
        locks=locks,
        metrics=metrics,
        tasks=tasks,
        handover_grace=handover_grace,
    )
    locks.on_lost = ownership.lose_all
    if hasattr(storage, "fence"):
        storage.fence = lambda store_id: locks.fence(ownership.lease((WS, store_id)))
    return ownership


class Locks(Protocol):
    """Where ownership locks live: lock files of one machine, or PostgreSQL (sds.pg_ownership)."""

    def ident(self, key: Key) -> Hashable:
        """What identifies the lock of ``key`` (two keys may share one lock)."""

    async def take(self, key: Key, record: LockRecord, timeout: float) -> tuple[Any, Any]:
        """Take the lock: (handle, the record the previous holder left or None).

        StoreLocked (with the holder's record) when another server holds it; a
        holder without a URL or handing over is waited for up to ``timeout``.
        """

    def release(self, handle: Any) -> None: ...

    def mark(self, handle: Any, record: LockRecord) -> None: ...

    async def holder(self, key: Key) -> LockRecord | None: ...

    async def server_url(self, instance: str) -> str | None: ...

    def advertise(self, record: LockRecord) -> None: ...

    def close(self) -> None: ...


class FileLocks:
    """Ownership locks as lock files in one directory of one machine (flock + JSON record)."""

    def __init__(self, lock_dir: Path) -> None:
        self.lock_dir = lock_dir
        self._server_fd: int | None = None
        self._server_instance = ""

    def ident(self, key: Key) -> Path:
        """The path whose ``.lock`` is the lock of a store or room."""
        kind, store_id = key
        name = store_filename(store_id)
        if kind == SIGNAL:
            return self.lock_dir / (name[: -len(".db")] + ".signal")
        return self.lock_dir / name

    async def take(self, key: Key, record: LockRecord, timeout: float) -> tuple[int, Any]:
        base = self.ident(key)
        previous: list[LockRecord | None] = []
        fd = await asyncio.get_running_loop().run_in_executor(
            None, lambda: try_lock(base, timeout=timeout, record=record, previous=previous)
        )
        return fd, previous[0] if previous else None

    def release(self, handle: Any) -> None:
        unlock(handle)

    def mark(self, handle: Any, record: LockRecord) -> None:
        rewrite_record(handle, record)

    async def holder(self, key: Key) -> LockRecord | None:
        try:
            return lock_holder(self.ident(key))
        except OSError:
            return None

    async def server_url(self, instance: str) -> str | None:
        if not _INSTANCE.match(instance):
            return None
        with contextlib.suppress(OSError):
            holder = lock_holder(self.lock_dir / f"{SERVER_RECORD_PREFIX}{instance}")
            if holder is not None and holder.url:
                return holder.url
        return None

    def advertise(self, record: LockRecord) -> None:
        """Leave a server record in the lock dir, held while this process runs."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        if self._server_fd is None:
            self._server_instance = record.instance
            try:
                self._server_fd = try_lock(
                    self.lock_dir / f"{SERVER_RECORD_PREFIX}{record.instance}",
                    timeout=2.0,
                    record=record,
                )
            except OSError as exc:
                log.warning("cannot write the server record in %s: %s", self.lock_dir, exc)

    def close(self) -> None:
        if self._server_fd is not None:
            name = f"{SERVER_RECORD_PREFIX}{self._server_instance}{LOCK_SUFFIX}"
            with contextlib.suppress(OSError):
                (self.lock_dir / name).unlink()
            unlock(self._server_fd)
            self._server_fd = None


class Ownership:
    """The stores and rooms this process owns, how to find another owner, and handovers."""

    def __init__(
        self,
        lock_dir: Path | None,
        *,
        storage: SqliteStorage | None,
        locks: Locks | None = None,
        metrics: Metrics,
        tasks: Tasks,
        handover_grace: float = 2.0,
        lock_timeout: float = 5.0,
    ) -> None:
        self.storage = storage
        if locks is None:
            assert lock_dir is not None
            locks = FileLocks(lock_dir)
        self.locks = locks
        self.metrics = metrics
        self.tasks = tasks
        self.handover_grace = handover_grace
        self.lock_timeout = lock_timeout
        self._record = (
            None
            if storage is not None
            else LockRecord(pid=os.getpid(), instance=secrets.token_hex(8))
        )
        self._held: dict[Hashable, list[Any]] = {}
        """Locks this module holds itself (rooms, relay-only stores):
        [handle, users, previous record, key]."""
        self._taking: dict[Hashable, asyncio.Lock] = {}
        self._uses: dict[Key, Use] = {}
        self.releasing: dict[Key, asyncio.Event] = {}
        self.close_clients: Callable[[Key, int, str], None] = lambda key, code, reason: None
        """Set by the application: close every local client of a store or room."""
        self.in_use: Callable[[Key], bool] = lambda key: False
        """Set by the application: True while a store or room has a live object here."""
        self.shares_lock: Callable[[Key], bool] = lambda key: False
        """Set by the application: True while another live store id here maps to the same
        lock (two ids can share one file name): such a lock is not handed over."""
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
        """Record this process's URL, and leave a server record where the locks are."""
        if self.storage is not None:
            return  # Storage.advertise records it (and the server record)
        self._record = dataclasses.replace(self.record, url=url)
        self.locks.advertise(self.record)

    async def server_url(self, instance: str) -> str | None:
        """The URL of ``instance`` when it is a live server of the same locks now."""
        return await self.locks.server_url(instance)

    def previous_url(self, key: Key) -> str | None:
        """The URL of the server that had ``key`` before this process took it from a killed
        or stopped owner (None: taken free, or handed over to us)."""
        if self._self_locked(key):
            held = self._held.get(self.locks.ident(key))
            previous = held[2] if held is not None else None
        else:
            assert self.storage is not None
            previous = self.storage.previous_holder(key[1])
        if not isinstance(previous, LockRecord) or not previous.url:
            return None
        if previous.instance == self.instance or previous.url == self.record.url:
            return None
        return previous.url

    def _self_locked(self, key: Key) -> bool:
        """Locks this module takes; a persistent server's stores are locked by their files."""
        return key[0] == SIGNAL or self.storage is None

    def owns(self, key: Key) -> bool:
        if self._self_locked(key):
            return self.locks.ident(key) in self._held
        assert self.storage is not None
        return self.storage.holds(key[1])

    async def holder(self, key: Key) -> LockRecord | None:
        """The record of whoever holds the lock now (None: nobody)."""
        return await self.locks.holder(key)

    def lease(self, key: Key) -> Any:
        """The handle of the lock this process holds for ``key`` (None: not held)."""
        held = self._held.get(self.locks.ident(key))
        return None if held is None else held[0]

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
            if forwarded and not self.in_use(key) and not self.shares_lock(key):
                # Unused here (a file in its close grace): the forwarder takes it.
                self.hand_over(key)
                raise NotOwner
            return None
        if forwarded:
            raise NotOwner
        holder = await self.holder(key)
        if (
            holder is None
            or holder.instance == self.instance
            or not holder.url
            or holder.command == HANDOVER_COMMAND
        ):
            # Free, ours, or held by a command or a handover: take it here (waiting for it).
            return None
        return holder.url

    async def claim(self, key: Key) -> None:
        """Take (or share) the lock of a store or room this module locks itself.

        StoreLocked (with the owner's record) when another server holds it.
        """
        if not self._self_locked(key):
            return
        base = self.locks.ident(key)
        taking = self._taking.setdefault(base, asyncio.Lock())
        async with taking:
            held = self._held.get(base)
            if held is not None:
                held[1] += 1
                return
            handle, previous = await self.locks.take(key, self.record, self.lock_timeout)
            self._held[base] = [handle, 1, previous, key]
            self.metrics.ownership_changes["acquired"] += 1
        if not taking.locked():
            self._taking.pop(base, None)

    def unclaim(self, key: Key) -> None:
        """One user fewer of a lock taken by ``claim``; the last one releases it."""
        if not self._self_locked(key):
            return
        base = self.locks.ident(key)
        held = self._held.get(base)
        if held is None:
            return
        held[1] -= 1
        if held[1] <= 0:
            self._release_when_unused(base, held, time.monotonic() + HANDOVER_DRAIN_SECONDS)

    def _release_when_unused(self, base: Hashable, held: list[Any], deadline: float) -> None:
        """Release a lock once its store's queued commits are done (or at ``deadline``)."""
        if self._held.get(base) is not held or held[1] > 0:
            return  # taken again meanwhile, or lost
        key = held[3]
        if self.in_use(key) and time.monotonic() < deadline:
            loop = asyncio.get_running_loop()
            loop.call_later(0.02, self._release_when_unused, base, held, deadline)
            return
        del self._held[base]
        self.locks.release(held[0])
        if key not in self.releasing:
            self.metrics.ownership_changes["released"] += 1

    def joined(self, key: Key, *, via: str | None) -> None:
        """A client of ``key`` joined here: directly, or forwarded by the server at URL ``via``.

        Failback: a store this process took from a killed or stopped server goes back
        to it once clients reach it again (they arrive forwarded from its URL) and no
        client has joined here directly since, even while older clients stay here.
        """
        use = self._uses.setdefault(key, Use())
        if via is not None:
            use.forwarded += 1
            previous = self.previous_url(key)
            if previous is not None and via == previous:
                use.failback = True
        else:
            use.direct += 1
            use.failback = False
        self._watch(key, use)

    def left(self, key: Key, *, via: str | None) -> None:
        forwarded = via is not None
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
        """Only forwarded clients (or a failback): hand over after the grace; a direct client
        cancels it."""
        if use.due():
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
        if use.due():
            self.hand_over(key)

    def _mark(self, key: Key, record: LockRecord) -> None:
        if self._self_locked(key):
            held = self._held.get(self.locks.ident(key))
            if held is not None:
                self.locks.mark(held[0], record)
        elif self.storage is not None:
            self.storage.mark(key[1], record)

    def handover_record(self) -> LockRecord:
        """A lock being handed over: no URL, so no process forwards here or moves it back."""
        return dataclasses.replace(self.record, url=None, command=HANDOVER_COMMAND)

    def hand_over(self, key: Key) -> None:
        """Let another process own ``key``: stop admitting, close with 1012, release the lock.

        The lock says ``handover`` before this returns, so a process that looks next
        waits for the lock instead of forwarding here.
        """
        if key in self.releasing or not self.owns(key) or self.shares_lock(key):
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
        # With the URL: the process that takes a store next moves it back here when
        # this server returns (see ``joined``).
        record = dataclasses.replace(self.record, command=HANDOVER_COMMAND)
        for handle, *_rest in self._held.values():
            self.locks.mark(handle, record)
        if self.storage is not None:
            for file in self.storage.open_files():
                if file.lock_fd is not None:
                    rewrite_record(file.lock_fd, record)
        for close in list(self.pipes):
            close(code, "server shutting down")

    def lose_all(self, why: str) -> None:
        """The locks are gone (cut off from where they live): stop serving their stores.

        Their clients are closed with 1012 and reconnect through the proxy; nothing is
        taken back later (another process may own the stores by then).
        """
        held, self._held = self._held, {}
        for _handle, _users, _previous, key in held.values():
            self.metrics.ownership_changes["lost"] += 1
            self.close_clients(key, CLOSE_SERVICE_RESTART, "store ownership lost")
        if held:
            log.error(
                "lost the ownership of %d stores and rooms (%s): their clients are closed "
                "with 1012 and reconnect through the proxy",
                len(held),
                why,
                extra={"event": "ownership_lost", "count": len(held)},
            )

    def close(self) -> None:
        for handle, *_rest in self._held.values():
            self.locks.release(handle)
        self._held.clear()
        self.locks.close()
