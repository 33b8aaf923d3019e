"""Who serves what in a dir shared by several sds processes (``sds cluster status``).

The dir is the persist dir, or for relay-only processes their ``--lock-dir``.

Read from the lock files alone, without writing anything: a server holds the flock
of its directory record (``.sds-server-<instance>.lock``) while it runs, the
flock of every store it owns (``<store file>.lock``) and of every signalling room
it owns (``<room>.signal.lock``); each lock file carries the holder's JSON
record (``sds.backends.sqlite.LockRecord``). A flock is the truth about whether a file is
held, so a record whose flock nobody holds (a process that died) counts for nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sds.backends.sqlite import (
    LOCK_SUFFIX,
    SERVER_RECORD_PREFIX,
    LockRecord,
    lock_holder,
)

ROOM_SUFFIX = ".signal"
"""``<room>.signal.lock``: the lock of a signalling room (``sds.ownership``)."""


class ClusterError(Exception):
    """The persist dir cannot be read."""


@dataclasses.dataclass
class OwnedStore:
    """A store file whose lock a process holds."""

    file: str
    store: str
    """The store id as far as the file name tells it (characters outside [A-Za-z0-9_-] read ``_``)."""


@dataclasses.dataclass
class ProcessStatus:
    """One live server of the persist dir and the store files it holds."""

    instance: str
    pid: int
    url: str | None
    stores: list[OwnedStore] = dataclasses.field(default_factory=list)
    rooms: list[str] = dataclasses.field(default_factory=list)
    """Signalling rooms it owns (as far as their lock file names tell)."""


@dataclasses.dataclass
class OtherHolder:
    """A store file held by something that is not a live server (a compaction, a restore)."""

    file: str
    pid: int
    command: str | None


@dataclasses.dataclass
class ClusterStatus:
    persist_dir: str
    processes: list[ProcessStatus]
    others: list[OtherHolder]

    @property
    def alive(self) -> bool:
        return bool(self.processes)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _held(path: Path) -> LockRecord | None:
    """The record of a held lock file (``path`` without its ``.lock``); None when free or gone."""
    try:
        return lock_holder(path)
    except OSError:
        return None


def cluster_status(directory: Path) -> ClusterStatus:
    """The live servers of ``directory`` and the stores each holds now.

    Read-only: stale records of dead processes are reported as nothing and left in place.
    """
    if not directory.is_dir():
        raise ClusterError(f"persist dir {directory} does not exist")
    try:
        lock_files = sorted(p for p in directory.iterdir() if p.name.endswith(LOCK_SUFFIX))
    except OSError as exc:
        raise ClusterError(f"cannot read {directory}: {exc.strerror}") from None
    processes: dict[str, ProcessStatus] = {}
    store_locks: list[Path] = []
    room_locks: list[Path] = []
    for lock in lock_files:
        base = lock.with_name(lock.name[: -len(LOCK_SUFFIX)])
        if lock.name.startswith(SERVER_RECORD_PREFIX):
            record = _held(base)
            if record is not None and record.instance:
                processes[record.instance] = ProcessStatus(record.instance, record.pid, record.url)
        elif base.name.startswith("."):
            continue
        elif base.suffix == ".db":
            store_locks.append(base)
        elif base.suffix == ROOM_SUFFIX:
            room_locks.append(base)
    others: list[OtherHolder] = []
    for base in store_locks:
        record = _held(base)
        if record is None:
            continue
        owner = processes.get(record.instance)
        if owner is not None:
            owner.stores.append(OwnedStore(file=base.name, store=base.stem))
        else:
            others.append(OtherHolder(file=base.name, pid=record.pid, command=record.command))
    for base in room_locks:
        record = _held(base)
        owner = processes.get(record.instance) if record is not None else None
        if owner is not None:
            owner.rooms.append(base.stem)
    ordered = sorted(processes.values(), key=lambda p: (p.url or "", p.pid))
    return ClusterStatus(str(directory), ordered, others)
