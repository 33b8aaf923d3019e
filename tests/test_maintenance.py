"""sds.maintenance on real SQLite files: figures, read-only inspection, compaction."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sds.backends.sqlite import SCHEMA, SQLITE_VERSION, store_filename
from sds.maintenance import (
    MaintenanceError,
    compact_connection,
    compact_file,
    distinct_in_order,
    inspect_file,
    joiner_frames,
    resolve_store,
)
from tests.store_files import write_store


def test_inspect_figures_match_what_was_written(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    write_store(path, "notes", [b"a" * 10, b"b" * 20, b"c" * 30], blobs={"ab" * 32: b"v" * 100})
    write_store(path, "notes", [], snapshot=(b"k" * 32 + b"state", 1))
    report = inspect_file(path)
    (figures,) = report.stores
    assert figures.store_id == "notes"
    assert (figures.patches, figures.patch_bytes) == (3, 60)
    assert (figures.first_clock, figures.last_clock) == (1, 3)
    assert (figures.snapshot_clock, figures.snapshot_bytes) == (1, 37)
    assert (report.blobs, report.blob_bytes) == (1, 100)
    assert report.integrity == "ok"
    assert report.sqlite_version == SQLITE_VERSION
    assert report.bytes >= path.stat().st_size
    assert report.last_write is not None


def test_two_store_ids_sharing_a_file_are_reported_apart(tmp_path: Path) -> None:
    path = tmp_path / store_filename("a/b")
    assert store_filename("a:b") == path.name
    write_store(path, "a/b", [b"1", b"2"])
    write_store(path, "a:b", [b"3"])
    report = inspect_file(path)
    assert [(s.store_id, s.patches) for s in report.stores] == [("a/b", 2), ("a:b", 1)]


def test_inspecting_never_writes_the_database(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    write_store(path, "s", [b"x"] * 50)
    before = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    inspect_file(path)
    inspect_file(path, quick=True)
    assert (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns) == before


def test_damaged_file_fails_the_integrity_check(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    write_store(path, "s", [bytes([i]) * 3000 for i in range(200)])
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    for offset in range(4096 * 3 + 100, 4096 * 3 + 400):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    try:
        report = inspect_file(path)
    except MaintenanceError:
        return
    assert report.integrity != "ok"


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(MaintenanceError):
        inspect_file(path)


def test_resolve_store_by_id_and_by_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    write_store(path, "notes", [b"x"])
    assert resolve_store(tmp_path, "notes") == (path, "notes")
    assert resolve_store(None, str(path)) == (path, None)
    with pytest.raises(MaintenanceError, match="unknown store"):
        resolve_store(tmp_path, "missing")


def test_compaction_keeps_every_distinct_patch_in_first_occurrence_order(tmp_path: Path) -> None:
    path = tmp_path / store_filename("a/b")
    sent = [b"s1", b"s2", b"s1", b"s3", b"s2", b"s2", b"s4", b"s1"]
    write_store(path, "a/b", sent)
    write_store(path, "a:b", [b"s1", b"other", b"s1"])
    conn = sqlite3.connect(path)
    before = {sid: joiner_frames(conn, sid) for sid in ("a/b", "a:b")}
    conn.close()
    result = compact_file(path)
    assert result.integrity == "ok"
    conn = sqlite3.connect(path)
    after = {sid: joiner_frames(conn, sid) for sid in ("a/b", "a:b")}
    conn.close()
    assert (
        after["a/b"]
        == distinct_in_order(before["a/b"])
        == [b"\x01s1", b"\x01s2", b"\x01s3", b"\x01s4"]
    )
    assert after["a:b"] == distinct_in_order(before["a:b"]) == [b"\x01s1", b"\x01other"]
    assert not path.with_name(path.name + "-wal").exists() or (
        path.with_name(path.name + "-wal").stat().st_size == 0
    )


def test_compacting_one_store_leaves_the_other_store_of_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / store_filename("a/b")
    write_store(path, "a/b", [b"x", b"x"])
    write_store(path, "a:b", [b"y", b"y"])
    compact_file(path, store_id="a/b")
    conn = sqlite3.connect(path)
    assert joiner_frames(conn, "a/b") == [b"\x01x"]
    assert joiner_frames(conn, "a:b") == [b"\x01y", b"\x01y"]
    conn.close()
    with pytest.raises(MaintenanceError, match="unknown store"):
        compact_file(path, store_id="nobody")


def test_snapshot_mode_prunes_superseded_patches_without_changing_the_joiner_view(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    write_store(path, "s", [b"p1", b"p2", b"p3", b"p4", b"p2", b"p5", b"p5"])
    write_store(path, "s", [], snapshot=(b"K" * 32 + b"state", 3))
    conn = sqlite3.connect(path)
    before = joiner_frames(conn, "s")
    conn.close()
    result = compact_file(path, value_mode="snapshot")
    assert result.superseded_removed == 3
    conn = sqlite3.connect(path)
    assert joiner_frames(conn, "s") == distinct_in_order(before)
    assert joiner_frames(conn, "s")[0] == b"\x02" + b"K" * 32 + b"state"
    assert conn.execute("SELECT min(clock) FROM patches").fetchone()[0] == 4
    conn.close()


def test_blob_mode_keeps_patches_behind_the_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    write_store(path, "s", [b"p1", b"p2", b"p3"], snapshot=(b"K" * 33, 2))
    assert compact_file(path, value_mode="blob").superseded_removed == 0
    assert inspect_file(path).stores[0].patches == 3


def test_a_copy_hidden_behind_the_snapshot_does_not_remove_a_visible_one(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    write_store(path, "s", [b"same", b"x", b"same"], snapshot=(b"K" * 33, 2))
    conn = sqlite3.connect(path)
    before = joiner_frames(conn, "s")
    conn.close()
    compact_file(path)
    conn = sqlite3.connect(path)
    assert joiner_frames(conn, "s") == before == [b"\x02" + b"K" * 33, b"\x01same"]
    conn.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"b", b"c", b"dd", b"", b"\x00"]), max_size=40))
def test_compaction_preserves_the_distinct_sequence(patches: list[bytes]) -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(SCHEMA)
    conn.executemany(
        "INSERT INTO patches VALUES ('s', ?, ?)", [(i + 1, p) for i, p in enumerate(patches)]
    )
    before = joiner_frames(conn, "s")
    compact_connection(conn, ["s"], value_mode="blob")
    assert joiner_frames(conn, "s") == distinct_in_order(before)
