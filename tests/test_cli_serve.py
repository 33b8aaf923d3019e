"""`sds serve` as a real process: bad configuration exits 2 before listening; `--dev` works."""

from __future__ import annotations

import asyncio
import re
import socket
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from sds.backends.sqlite import LockRecord, lock_holder
from sds.client import StoreClient
from sds.tokens import verify_token
from tests.helpers import (
    TEST_SECRET,
    clean_env,
    free_port,
    http_get,
    run_sds,
    spawn_server,
)

pytestmark = pytest.mark.slow


def assert_config_error(result: subprocess.CompletedProcess[str], *, mentions: str) -> None:
    """Exit 2, exactly one line on stderr that names the problem, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("sds: ")
    assert mentions in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_missing_secret_exits_2(tmp_path: Path) -> None:
    result = run_sds("serve", "--port", str(free_port()), env=clean_env(), cwd=tmp_path)
    assert_config_error(result, mentions="SDS_JWT_SECRET")


def test_short_secret_exits_2(tmp_path: Path) -> None:
    result = run_sds(
        "serve", "--port", str(free_port()), env=clean_env(secret="too-short"), cwd=tmp_path
    )
    assert_config_error(result, mentions="at least 32 characters")


def test_short_secret_file_exits_2(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("short\n")
    result = run_sds(
        "serve",
        "--port",
        str(free_port()),
        "--jwt-secret-file",
        str(secret_file),
        env=clean_env(),
        cwd=tmp_path,
    )
    assert_config_error(result, mentions="at least 32 characters")


def test_unreadable_secret_file_exits_2(tmp_path: Path) -> None:
    result = run_sds(
        "serve",
        "--port",
        str(free_port()),
        env=clean_env({"SDS_JWT_SECRET_FILE": str(tmp_path / "missing")}),
        cwd=tmp_path,
    )
    assert_config_error(result, mentions="cannot read the JWT secret file")


@pytest.mark.parametrize(
    ("args", "env", "mentions"),
    [
        (["--port", "abc"], {}, "--port"),
        ([], {"SDS_PORT": "3000x"}, "SDS_PORT"),
        (["--port", "70000"], {}, "port must be between"),
    ],
)
def test_port_not_a_number_exits_2(
    tmp_path: Path, args: list[str], env: dict[str, str], mentions: str
) -> None:
    result = run_sds("serve", *args, env=clean_env(env, secret=TEST_SECRET), cwd=tmp_path)
    assert_config_error(result, mentions=mentions)


def test_persist_dir_not_writable_exits_2(tmp_path: Path) -> None:
    # Tests run as root, so file modes do not stop writes: a path below a regular
    # file can never be created, whoever runs it.
    (tmp_path / "file").write_text("not a directory")
    result = run_sds(
        "serve",
        "--port",
        str(free_port()),
        "--persist-dir",
        str(tmp_path / "file" / "sub"),
        cwd=tmp_path,
    )
    assert_config_error(result, mentions="persist dir")


def test_persist_dir_from_alias_env_not_writable_exits_2(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    env = clean_env({"SDS_PERSISTENCE_DIR": str(tmp_path / "file" / "sub")}, secret=TEST_SECRET)
    result = run_sds("serve", "--port", str(free_port()), env=env, cwd=tmp_path)
    assert_config_error(result, mentions="persist dir")


def test_bad_choice_exits_2(tmp_path: Path) -> None:
    env = clean_env({"SDS_VALUE_MODE": "sometimes"}, secret=TEST_SECRET)
    result = run_sds("serve", "--port", str(free_port()), env=env, cwd=tmp_path)
    assert_config_error(result, mentions="SDS_VALUE_MODE")


def test_port_in_use_exits_2_without_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_sds("serve", "--port", str(port), cwd=tmp_path)
    assert_config_error(result, mentions="Address already in use")


def test_unknown_option_is_a_usage_error(tmp_path: Path) -> None:
    result = run_sds("serve", "--no-such-option", cwd=tmp_path)
    assert_config_error(result, mentions="--no-such-option")


DEV_TOKEN = re.compile(r"^\s*(admin|write) token:\s+(\S+)$", re.MULTILINE)
DEV_URL = re.compile(r"(ws://127\.0\.0\.1:(\d+)/ws/(\S+?)\?token=(\S+))")


def dev_output(stdout: str) -> tuple[dict[str, str], str]:
    tokens = {kind: value for kind, value in DEV_TOKEN.findall(stdout)}
    match = DEV_URL.search(stdout)
    assert match is not None, "no ws:// URL printed"
    return tokens, match.group(1)


async def test_dev_server_first_try_and_restart(tmp_path: Path) -> None:
    env = clean_env()
    with spawn_server(["--dev"], env=env, cwd=tmp_path, log_dir=tmp_path / "logs") as first:
        tokens, url = dev_output(first.stdout)
        assert set(tokens) == {"admin", "write"}
        assert url.startswith(f"ws://127.0.0.1:{first.port}/ws/")
        secret_file = tmp_path / "sds-data" / "jwt-secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        secret = secret_file.read_text().strip()
        assert len(secret) >= 32
        assert verify_token(tokens["admin"], secret).scope == "admin"
        write = verify_token(tokens["write"], secret)
        assert write.scope == "write"
        body = first.healthz()[1]
        assert body["persistence"] is True
        # The printed URL works as is, and the write lands in ./sds-data.
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            await ws.send_bytes(b"\x01dev-patch")
            await ws.close()
        assert first.stop() == 0
    assert list((tmp_path / "sds-data").glob("*.db")), "no store file in ./sds-data"
    modified = secret_file.stat().st_mtime_ns

    with spawn_server(["--dev"], env=env, cwd=tmp_path, log_dir=tmp_path / "logs2") as second:
        assert secret_file.read_text().strip() == secret
        assert secret_file.stat().st_mtime_ns == modified
        again, url = dev_output(second.stdout)
        assert verify_token(again["write"], secret).aud == write.aud
        # A token from the first start still opens the store after the restart.
        old_url = f"{second.ws_url}/ws/{write.aud}?token={tokens['write']}"
        async with aiohttp.ClientSession() as session, session.ws_connect(old_url) as ws:
            await ws.close()


def test_dev_listens_on_loopback_only(tmp_path: Path) -> None:
    with spawn_server(["--dev"], env=clean_env(), cwd=tmp_path) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=2):
            pass
        addresses = _listening_addresses(server.port)
        if addresses is not None:
            assert addresses == {"127.0.0.1"}


def test_dev_refuses_a_public_host(tmp_path: Path) -> None:
    result = run_sds(
        "serve",
        "--dev",
        "--host",
        "0.0.0.0",
        "--port",
        str(free_port()),
        env=clean_env(),
        cwd=tmp_path,
    )
    assert_config_error(result, mentions="loopback")
    assert not (tmp_path / "sds-data").exists() or not list((tmp_path / "sds-data").glob("*.db"))


def _listening_addresses(port: int) -> set[str] | None:
    """Local addresses listening on ``port`` per /proc/net/tcp{,6} (None when unavailable)."""
    found: set[str] = set()
    for table_name in ("tcp", "tcp6"):
        try:
            table = Path("/proc/net", table_name).read_text()
        except OSError:
            return None
        for line in table.splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] == "0A" and int(port_hex, 16) == port:
                if table_name == "tcp":
                    found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
                else:
                    found.add(f"ipv6:{address}")
    return found


def test_dev_on_a_busy_port_prints_one_line_and_no_tokens(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_sds("serve", "--dev", "--port", str(port), env=clean_env(), cwd=tmp_path)
    assert_config_error(result, mentions="Address already in use")
    assert "token" not in result.stdout
    assert result.stdout == ""


def test_dev_banner_names_the_real_port_when_port_0_is_asked(tmp_path: Path) -> None:
    env = clean_env(SDS_PORT="0")
    with spawn_server(["--dev"], env=env, cwd=tmp_path, port_option=False, wait=False) as server:
        deadline = time.monotonic() + 20
        while "write token" not in server.stdout and time.monotonic() < deadline:
            time.sleep(0.05)
        _tokens, url = dev_output(server.stdout)
        port = int(url.split(":")[2].split("/")[0])
        assert port != 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert response.status == 200


async def test_second_server_on_one_persist_dir_says_so_and_forwards_to_the_owner(
    tmp_path: Path,
) -> None:
    stores = tmp_path / "stores"
    args = ["--persist-dir", str(stores)]
    with spawn_server(args, cwd=tmp_path, log_dir=tmp_path / "a") as first:
        async with StoreClient(first.ws_url, "held", first.token("held")) as held:
            with spawn_server(args, cwd=tmp_path, log_dir=tmp_path / "b") as second:
                notice = [line for line in second.stderr.splitlines() if "also served" in line]
                assert len(notice) == 1, second.stderr
                assert "INFO" in notice[0] and f"pid {first.pid}" in notice[0]
                assert first.http_url in notice[0]
                async with StoreClient(second.ws_url, "held", second.token("held")) as other:
                    await other.send(b"\x01patch")
                    assert await held.receive(timeout=10) == b"\x01patch"
                assert "WARNING" not in second.stderr


async def test_server_on_port_0_records_its_real_url_in_the_lock_files_it_takes(
    tmp_path: Path,
) -> None:
    stores = tmp_path / "stores"
    env = clean_env(SDS_PORT="0", SDS_JWT_SECRET=TEST_SECRET)
    with spawn_server(
        ["--persist-dir", str(stores)], env=env, cwd=tmp_path, port_option=False, wait=False
    ) as server:
        deadline = time.monotonic() + 20
        records: list[Path] = []
        while not records and time.monotonic() < deadline:
            records = list(stores.glob(".sds-server-*.lock")) if stores.is_dir() else []
            time.sleep(0.05)
        (record,) = records
        holder = LockRecord.from_json(record.read_text())
        assert holder is not None and holder.pid == server.pid and holder.url is not None
        assert not holder.url.endswith(":0")
        assert holder.persist_dir == str(stores.resolve())
        status, _ = await asyncio.to_thread(http_get, f"{holder.url}/healthz", 5)
        assert status == 200
        token = server.token("notes", "read")
        async with StoreClient(holder.url, "notes", token):
            store_lock = LockRecord.from_json((stores / "notes.db.lock").read_text())
            assert store_lock == holder
        server.stop()
    assert not list(stores.glob(".sds-server-*"))
    # Nobody holds it; what stays says the stopped server handed it over.
    assert lock_holder(stores / "notes.db") is None
    left = LockRecord.from_json((stores / "notes.db.lock").read_text())
    assert left is not None and left.command == "handover"
