"""Helpers of the operations tests: store files written by hand, the real `sds` process."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sds.storage import connect_sync

SDS = [sys.executable, "-m", "sds"]
BIN_DIR = str(Path(sys.executable).parent)
SUBPROCESS_TIMEOUT = 60.0


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


def all_rows(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the three tables, sorted (read-only)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {
            table: sorted(conn.execute(f"SELECT * FROM {table}").fetchall())
            for table in ("snapshots", "patches", "blobs")
        }
    finally:
        conn.close()


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


def sds_env(**values: str) -> dict[str, str]:
    """The environment of a `sds` subprocess: no inherited SDS_* variables, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDS_")}
    env["PATH"] = BIN_DIR + os.pathsep + env.get("PATH", "")
    env["NO_COLOR"] = "1"
    env.update(values)
    return env


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_sds(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
    """Run the real `sds` command to completion (bounded)."""
    done = subprocess.run(
        [*SDS, *args],
        env=env or sds_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


async def run_sds_async(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run `sds` without blocking the event loop (the in-process test server keeps serving)."""
    process = await asyncio.create_subprocess_exec(
        *SDS,
        *args,
        env=env or sds_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), SUBPROCESS_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


def one_error_line(result: Result) -> str:
    """The stderr of a failed command, checked to be exactly one `sds: ...` line."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {lines!r}"
    assert lines[0].startswith("sds: ")
    assert "Traceback" not in result.stderr
    return lines[0]
