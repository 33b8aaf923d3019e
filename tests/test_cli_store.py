"""`sds store list | inspect | compact`: figures, --json, bad input (one stderr line, exit code)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from sds.backends.sqlite import try_lock
from sds.cli import cli
from tests.conftest import ServerFactory
from tests.helpers import clean_env, one_error_line, run_sds
from tests.store_files import db_digests, write_store


def _invoke(*args: str, persist: Path | None = None) -> tuple[int, str]:
    env = {"SDS_PERSIST_DIR": str(persist)} if persist else {}
    result = CliRunner().invoke(cli, list(args), env=env)
    return result.exit_code, result.output


def _stores(tmp_path: Path) -> Path:
    directory = tmp_path / "stores"
    directory.mkdir()
    write_store(directory / "notes.db", "notes", [b"n1", b"n2", b"n1"], blobs={"aa" * 32: b"v"})
    write_store(directory / "todo.db", "todo", [b"t" * 100])
    return directory


def test_store_list_json_has_the_figures_of_every_file(tmp_path: Path) -> None:
    directory = _stores(tmp_path)
    code, output = _invoke("store", "list", "--json", persist=directory)
    assert code == 0, output
    data = json.loads(output)
    files = {f["file"]: f for f in data["files"]}
    assert set(files) == {"notes.db", "todo.db"}
    assert files["notes.db"]["stores"][0]["patches"] == 3
    assert files["notes.db"]["blobs"] == 1
    assert files["todo.db"]["stores"][0]["patch_bytes"] == 100
    assert data["sqlite_version"]


def test_store_list_prints_a_table(tmp_path: Path) -> None:
    directory = _stores(tmp_path)
    result = run_sds("store", "list", env=clean_env(SDS_PERSIST_DIR=str(directory), COLUMNS="200"))
    assert result.returncode == 0, result.stderr
    assert "notes.db" in result.stdout and "todo" in result.stdout and "ok" in result.stdout


def test_store_list_without_persist_dir_is_a_config_error() -> None:
    result = run_sds("store", "list")
    assert result.returncode == 2
    assert "persist dir" in one_error_line(result)


def test_store_list_reports_a_corrupt_file_and_exits_1(tmp_path: Path) -> None:
    directory = _stores(tmp_path)
    (directory / "bad.db").write_bytes(b"garbage" * 1000)
    before = db_digests(directory)
    result = run_sds("store", "list", "--json", env=clean_env(SDS_PERSIST_DIR=str(directory)))
    assert result.returncode == 1
    assert "bad.db" in one_error_line(result)
    assert any("error" in f for f in json.loads(result.stdout)["files"])
    assert db_digests(directory) == before


def test_store_inspect_by_id_and_by_file(tmp_path: Path) -> None:
    directory = _stores(tmp_path)
    code, output = _invoke("store", "inspect", "notes", "--json", persist=directory)
    assert code == 0, output
    data = json.loads(output)
    assert data["integrity"] == "ok"
    assert data["stores"][0]["first_clock"] == 1 and data["stores"][0]["last_clock"] == 3
    code, output = _invoke("store", "inspect", str(directory / "todo.db"), "--json")
    assert code == 0 and json.loads(output)["stores"][0]["store_id"] == "todo"


@pytest.mark.parametrize("command", ["inspect", "compact"])
def test_store_command_on_an_unknown_store_exits_1_and_changes_nothing(
    tmp_path: Path, command: str
) -> None:
    directory = _stores(tmp_path)
    before = db_digests(directory)
    result = run_sds("store", command, "nope", env=clean_env(SDS_PERSIST_DIR=str(directory)))
    assert result.returncode == 1
    assert "unknown store" in one_error_line(result)
    assert result.stdout == ""
    assert db_digests(directory) == before
    assert sorted(p.name for p in directory.iterdir()) == ["notes.db", "todo.db"]


def test_store_inspect_corrupt_file_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 1000)
    result = run_sds("store", "inspect", str(bad))
    assert result.returncode == 1
    one_error_line(result)
    assert bad.read_bytes() == b"garbage" * 1000


def test_store_compact_needs_an_id_or_all(tmp_path: Path) -> None:
    directory = _stores(tmp_path)
    env = clean_env(SDS_PERSIST_DIR=str(directory))
    for args in (("store", "compact"), ("store", "compact", "notes", "--all")):
        result = run_sds(*args, env=env)
        assert result.returncode == 2
        one_error_line(result)
    result = run_sds("store", "compact", "notes", "--wait", "soon", env=env)
    assert result.returncode == 2
    one_error_line(result)


def test_store_compact_gives_up_when_neither_lock_nor_server_is_available(
    tmp_path: Path,
) -> None:
    directory = _stores(tmp_path)
    before = db_digests(directory)
    fd = try_lock(directory / "notes.db", timeout=1)
    try:
        result = run_sds(
            "store",
            "compact",
            "notes",
            "--wait",
            "0.5",
            "--url",
            "http://127.0.0.1:9",
            env=clean_env(SDS_PERSIST_DIR=str(directory), SDS_JWT_SECRET="s" * 40),
        )
    finally:
        os.close(fd)
    assert result.returncode == 1
    line = one_error_line(result)
    assert "within 0.5s" in line
    assert db_digests(directory) == before


async def test_store_compact_all_then_a_new_server_replays_distinct_patches(
    tmp_path: Path, make_server: ServerFactory
) -> None:
    directory = tmp_path / "stores"
    directory.mkdir()
    write_store(directory / "notes.db", "notes", [b"a", b"b", b"a", b"c", b"b"])
    write_store(directory / "todo.db", "todo", [b"x", b"x"])
    code, output = _invoke("store", "compact", "--all", "--json", persist=directory)
    assert code == 0, output
    results = json.loads(output)["results"]
    assert sum(r["duplicates_removed"] for r in results) == 3
    server = await make_server(persist=True)
    assert server.config.persist_dir == directory
    async with server.client("notes", "read") as joiner:
        assert await joiner.receive_all(0.4) == [b"\x01a", b"\x01b", b"\x01c"]
    async with server.client("todo", "read") as joiner:
        assert await joiner.receive_all(0.4) == [b"\x01x"]


def test_store_help_lists_examples_and_env_vars() -> None:
    for command in ("list", "inspect", "compact"):
        code, output = _invoke("store", command, "--help")
        assert code == 0
        assert "Examples:" in output and "SDS_PERSIST_DIR" in output
    code, output = _invoke("store", "compact", "--help")
    assert "SDS_URL" in output and "SDS_JWT_SECRET" in output


def test_store_compact_warns_about_an_unreadable_secret_file(tmp_path: Path) -> None:
    directory = _stores(tmp_path)
    missing = str(tmp_path / "no-such-secret")
    result = run_sds(
        "store",
        "compact",
        "notes",
        env=clean_env(SDS_PERSIST_DIR=str(directory), SDS_JWT_SECRET_FILE=missing),
    )
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and missing in result.stderr


def test_client_commands_describe_port_as_the_servers_port() -> None:
    for command in (("store", "compact"), ("watch",)):
        code, output = _invoke(*command, "--help")
        assert code == 0
        words = " ".join(output.split())
        port_help = words.split("--port N", 1)[1].split(" --", 1)[0]
        assert "listen on" not in port_help and "server" in port_help


LONG_ID = "notes-with-a-rather-long-store-identifier-0123456789"


def _long_store(tmp_path: Path) -> Path:
    directory = tmp_path / "a-persist-dir-whose-path-is-longer-than-the-terminal-is-wide"
    directory.mkdir()
    write_store(directory / "notes.db", LONG_ID, [b"a", b"b", b"a"])
    return directory


def test_store_list_piped_to_a_narrow_terminal_prints_every_value_in_full(
    tmp_path: Path,
) -> None:
    directory = _long_store(tmp_path)
    result = run_sds("store", "list", env=clean_env(SDS_PERSIST_DIR=str(directory), COLUMNS="60"))
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    assert str(directory) in result.stdout
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("notes.db")]
    assert row.split()[:3] == ["notes.db", LONG_ID, "3"]


def test_store_list_on_a_narrow_terminal_wraps_values_instead_of_cutting_them(
    tmp_path: Path,
) -> None:
    directory = _long_store(tmp_path)
    env = clean_env(SDS_PERSIST_DIR=str(directory), COLUMNS="60", FORCE_COLOR="1")
    result = run_sds("store", "list", env=env)
    assert result.returncode == 0, result.stderr
    text = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
    assert "…" not in text
    rows = [line.split("│") for line in text.splitlines() if line.startswith("│")]
    assert "".join(cells[2].strip() for cells in rows) == LONG_ID


def test_store_list_last_write_is_the_last_commit_not_the_listing(tmp_path: Path) -> None:
    directory = tmp_path / "stores"
    directory.mkdir()
    write_store(directory / "old.db", "old", [b"a"])
    long_ago = 1577836800  # 2020-01-01T00:00:00Z
    os.utime(directory / "old.db", (long_ago, long_ago))
    for _ in range(2):  # the first listing's read-only open recreates an empty -wal
        code, output = _invoke("store", "list", "--json", persist=directory)
        assert code == 0, output
        (report,) = json.loads(output)["files"]
        assert report["last_write"] == "2020-01-01T00:00:00+00:00"
    write_store(directory / "old.db", "old", [b"b"])
    code, output = _invoke("store", "list", "--json", persist=directory)
    assert not json.loads(output)["files"][0]["last_write"].startswith("2020")
