"""Store files written and read by hand, as the server would (without going through it)."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sds.backends.sqlite import connect_sync


def write_store(
    path: Path,
    store_id: str,
    patches: Iterable[bytes],
    *,
    snapshot: tuple[bytes, int] | None = None,
    blobs: dict[str, bytes] | None = None,
) -> None:
    """Append patches (clocks continue after the highest) to a store file, as the server would."""
    conn = connect_sync(path)
    try:
        row = conn.execute(
            "SELECT coalesce(max(clock), 0) FROM patches WHERE store_id = ?", (store_id,)
        ).fetchone()
        clock = int(row[0])
        rows = []
        for data in patches:
            clock += 1
            rows.append((store_id, clock, data))
        conn.executemany("INSERT INTO patches (store_id, clock, data) VALUES (?, ?, ?)", rows)
        if snapshot is not None:
            conn.execute(
                "INSERT OR REPLACE INTO snapshots (store_id, data, clock) VALUES (?, ?, ?)",
                (store_id, snapshot[0], snapshot[1]),
            )
        for key, value in (blobs or {}).items():
            conn.execute("INSERT INTO blobs (hash, data, ref_count) VALUES (?, ?, 1)", (key, value))
    finally:
        conn.close()


def read_rows(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of a query on a store file opened read-only."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def all_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the three tables, sorted (read-only)."""
    return {
        table: sorted(read_rows(path, f"SELECT * FROM {table}"))
        for table in ("snapshots", "patches", "blobs")
    }


def db_digests(directory: Path) -> dict[str, str]:
    """sha256 of every .db file and non-empty WAL of a dir: to show that nothing stored changed.

    (A read-only SQLite connection may create an empty ``-wal`` beside a WAL database.)
    """
    if not directory.exists():
        return {}
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
        if path.name.endswith((".db", ".db-wal")) and path.is_file() and path.stat().st_size
    }
