"""`sds store list / inspect / compact`, `sds backup` and `sds restore` on PostgreSQL."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import asyncpg

from sds.backends.base import distinct_in_order
from tests.conftest import RunningServer, ServerFactory
from tests.helpers import clean_env, one_error_line, run_sds, run_sds_async, streaming_writer
from tests.pg_cluster import PgCluster


def patch(text: str) -> bytes:
    return b"\x01" + text.encode()


def key(n: int) -> bytes:
    return bytes([n]) * 32


async def write_all(server: RunningServer, store_id: str, frames: list[bytes]) -> None:
    """Send frames and wait until a peer received them all (so all are committed)."""
    async with (
        server.client(store_id, sub="writer") as writer,
        server.client(store_id, scope="read", sub="peer") as peer,
    ):
        for frame in frames:
            await writer.send(frame)
        for _ in frames:
            await peer.receive(timeout=5)


async def joiner_view(server: RunningServer, store_id: str) -> list[bytes]:
    async with server.client(store_id, scope="read", sub="joiner") as joiner:
        return await joiner.receive_all(0.5)


def db_env(url: str) -> dict[str, str]:
    return clean_env(SDS_DATABASE_URL=url, secret=None)


async def test_store_list_and_inspect_show_the_figures_of_the_database(
    make_server: ServerFactory, database_url: str
) -> None:
    server = await make_server(database_url=database_url)
    await write_all(server, "notes", [patch("a"), patch("bb"), patch("a")])
    await write_all(server, "other", [b"\x02" + key(1) + b"value"])
    listed = await run_sds_async("store", "list", "--json", env=db_env(database_url))
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    figures = {one["store_id"]: one for one in report["stores"]}
    assert set(figures) == {"notes", "other"}
    assert figures["notes"]["patches"] == 3
    assert (figures["notes"]["first_clock"], figures["notes"]["last_clock"]) == (1, 3)
    assert figures["notes"]["patch_bytes"] == 1 + 2 + 1  # payloads, without the type byte
    assert (figures["other"]["blobs"], figures["other"]["blob_bytes"]) == (1, 5)
    assert report["schema_version"] == 1
    password = urllib.parse.urlsplit(database_url).password
    assert password and password not in listed.stdout + listed.stderr

    table = await run_sds_async("store", "inspect", "notes", env=db_env(database_url))
    assert table.returncode == 0, table.stderr
    assert "notes" in table.stdout and "1..3" in table.stdout
    unknown = await run_sds_async("store", "inspect", "nothing", env=db_env(database_url))
    assert unknown.returncode == 1
    assert "unknown store 'nothing'" in one_error_line(unknown)


def test_store_list_of_an_unreachable_database_is_one_line_without_the_password() -> None:
    url = "postgresql://sds:pw-not-shown-42@127.0.0.1:1/sds"
    result = run_sds("store", "list", env=db_env(url))
    assert result.returncode == 1
    line = one_error_line(result)
    assert "cannot connect to PostgreSQL at 127.0.0.1:1/sds" in line
    assert "pw-not-shown-42" not in result.stderr + result.stdout


def test_a_persist_dir_and_a_database_url_together_are_refused(tmp_path: Path) -> None:
    result = run_sds(
        "store", "list", "--persist-dir", str(tmp_path), env=db_env("postgresql://h/db")
    )
    assert result.returncode == 2
    assert "exclude each other" in one_error_line(result)


async def test_compaction_while_a_writer_streams_loses_nothing_and_keeps_the_joiner_view(
    make_server: ServerFactory, database_url: str
) -> None:
    server = await make_server(database_url=database_url)
    writer = await server.connect("live", sub="writer")
    peer = await server.connect("live", scope="read", sub="peer")
    duplicating = streaming_writer(writer, lambda i: patch(f"patch-{i % 60}" * 20), at_least=200)
    async with duplicating as sent:
        result = await run_sds_async("store", "compact", "live", "--json", env=db_env(database_url))
    assert result.returncode == 0, result.stderr
    (report,) = json.loads(result.stdout)["results"]
    assert report["via"] == "database"
    assert report["duplicates_removed"] > 0
    assert report["bytes_after"] < report["bytes_before"]
    received = [await peer.receive(timeout=5) for _ in sent]
    assert received == sent
    joined = await joiner_view(server, "live")
    assert distinct_in_order(joined) == distinct_in_order(sent)
    assert len(joined) < len(sent)


async def test_snapshot_mode_compaction_removes_superseded_patches(
    make_server: ServerFactory, database_url: str
) -> None:
    server = await make_server(database_url=database_url, value_mode="snapshot")
    frames = [patch("x"), patch("y"), b"\x02" + key(3) + b"state", patch("z"), patch("z")]
    await write_all(server, "snap", frames)
    before = await joiner_view(server, "snap")
    conn = await asyncpg.connect(database_url)
    try:  # patches at or below the snapshot clock that a server left (an older version did)
        await conn.execute(
            "INSERT INTO patches (store_id, clock, data) VALUES ('snap', 1, 'old'::bytea)"
        )
    finally:
        await conn.close()
    result = await run_sds_async(
        "store", "compact", "--all", "--value-mode", "snapshot", "--json", env=db_env(database_url)
    )
    assert result.returncode == 0, result.stderr
    (report,) = json.loads(result.stdout)["results"]
    assert (report["superseded_removed"], report["duplicates_removed"]) == (1, 1)
    assert await joiner_view(server, "snap") == distinct_in_order(before)


async def test_a_database_backs_up_into_files_and_restores_into_files_and_a_database(
    make_server: ServerFactory, database_url: str, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    source = await make_server(database_url=database_url)
    big = bytes(range(256)) * 20
    stores = {
        "team/notes": [patch("n1"), patch("n2"), b"\x02" + key(5) + big],
        "team:notes": [patch("other file-mate")],
        "plain": [patch("p") for _ in range(3)],
    }
    for store_id, frames in stores.items():
        await write_all(source, store_id, frames)
    views = {store_id: await joiner_view(source, store_id) for store_id in stores}

    out = tmp_path / "backups"
    backup = await run_sds_async("backup", "--out", str(out), "--json", env=db_env(database_url))
    assert backup.returncode == 0, backup.stderr
    archive = json.loads(backup.stdout)["archive"]
    verified = await run_sds_async("backup", "verify", archive)
    assert verified.returncode == 0, verified.stderr
    names = {entry["name"] for entry in json.loads(backup.stdout)["manifest"]["files"]}
    assert names == {"team_notes.db", "plain.db"}

    # Into files: a SQLite server serves what the PostgreSQL one did.
    persist = tmp_path / "stores"
    restored = await run_sds_async(
        "restore", archive, env=clean_env(SDS_PERSIST_DIR=str(persist), secret=None)
    )
    assert restored.returncode == 0, restored.stderr
    on_files = await make_server(persist_dir=persist)
    for store_id in stores:
        assert await joiner_view(on_files, store_id) == views[store_id]

    # Into another database: the same again, values included.
    target_url = pg_cluster.url(pg_cluster.create_database())
    into_db = await run_sds_async("restore", archive, "--json", env=db_env(target_url))
    assert into_db.returncode == 0, into_db.stderr
    assert sorted(json.loads(into_db.stdout)["store_ids"]) == sorted(stores)
    on_db = await make_server(database_url=target_url)
    for store_id in stores:
        assert await joiner_view(on_db, store_id) == views[store_id]
    async with on_db.client("team/notes", scope="read", sub="asker") as asker:
        assert [await asker.receive(timeout=5) for _ in views["team/notes"]] == views["team/notes"]
        await asker.send(b"\x03" + key(5))
        assert await asker.receive(timeout=5) == b"\x02" + key(5) + big
    async with on_db.client("team:notes", scope="read", sub="stranger") as stranger:
        await stranger.send(b"\x03" + key(5))  # another store's value: no answer
        assert await stranger.receive_all(0.4) == views["team:notes"]

    # Restoring again over existing stores: refused without --force, nothing written.
    await write_all(on_db, "plain", [patch("after the restore")])
    again = await run_sds_async("restore", archive, env=db_env(target_url))
    assert again.returncode == 1
    assert "already exists" in one_error_line(again)
    assert (await joiner_view(on_db, "plain"))[-1] == patch("after the restore")
    kept = await run_sds_async("restore", archive, "--if-missing", "--json", env=db_env(target_url))
    assert kept.returncode == 0, kept.stderr
    assert sorted(json.loads(kept.stdout)["kept"]) == sorted(stores)
