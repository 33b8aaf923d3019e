"""`sds watch` as a real subprocess against a running server."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess

from sds.cli.watch import describe_frame, watch_url
from tests.conftest import RunningServer
from tests.helpers import SDS, SUBPROCESS_TIMEOUT, clean_env, one_error_line, run_sds_async

LINE_TIMEOUT = 10.0


async def watch_with_a_read_token(
    server: RunningServer, store_id: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """``sds watch store_id --token <read token> *args`` to its end (bounded)."""
    token = server.token(store_id, "read")
    return await asyncio.wait_for(
        run_sds_async("watch", store_id, "--token", token, *args), SUBPROCESS_TIMEOUT
    )


def test_describe_frame_names_the_type_and_shows_presence() -> None:
    when = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert describe_frame(b"\x01abc", when) == {
        "time": "2025-01-02T03:04:05.000+00:00",
        "type": "PATCH",
        "type_byte": 1,
        "bytes": 4,
    }
    presence = describe_frame(b"\x04" + json.dumps({"name": "ann"}).encode(), when)
    assert presence["type"] == "PRESENCE" and presence["presence"] == {"name": "ann"}
    assert describe_frame(b"\x04\xff", when)["presence_error"]
    assert describe_frame(b"\x7f", when)["type"] == "0x7f"
    assert watch_url("http://h:1") == "ws://h:1" and watch_url("https://h") == "wss://h"


async def test_watch_prints_each_frame_live_as_json(server: RunningServer) -> None:
    process = await asyncio.create_subprocess_exec(
        *SDS,
        "watch",
        "w",
        "--url",
        server.http_url,
        "--json",
        "--count",
        "3",
        env=clean_env(SDS_TOKEN=server.token("w", "read", "watcher")),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None and process.stdout is not None
        ready = await asyncio.wait_for(process.stderr.readline(), LINE_TIMEOUT)
        assert b"watching store 'w'" in ready
        writer = await server.connect("w", sub="writer")
        await writer.send(b"\x01" + b"p" * 99)
        await writer.send(b"\x04" + json.dumps({"cursor": [1, 2]}).encode())
        await writer.send(b"\x06")
        lines = [
            json.loads(await asyncio.wait_for(process.stdout.readline(), LINE_TIMEOUT))
            for _ in range(3)
        ]
        assert [(line["type"], line["bytes"]) for line in lines] == [
            ("PATCH", 100),
            ("PRESENCE", 19),
            ("SYNC_REQ", 1),
        ]
        assert lines[1]["presence"] == {"cursor": [1, 2]}
        assert await asyncio.wait_for(process.wait(), LINE_TIMEOUT) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_watch_human_output_shows_type_and_size(persistent_server: RunningServer) -> None:
    server = persistent_server
    await server.hold("h", b"\x01" + b"x" * 9)
    result = await watch_with_a_read_token(server, "h", "--url", server.ws_url, "--count", "1")
    assert result.returncode == 0, result.stderr
    assert "PATCH" in result.stdout and "10 B" in result.stdout


async def test_watch_with_a_refused_token_exits_1_with_one_line(server: RunningServer) -> None:
    result = await run_sds_async(
        "watch", "w", "--token", server.token("other"), "--url", server.http_url
    )
    assert result.returncode == 1
    assert "HTTP 403" in one_error_line(result)


async def test_watch_without_a_server_or_token_fails_cleanly() -> None:
    result = await run_sds_async("watch", "w", "--token", "t", "--url", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert "cannot connect" in one_error_line(result)
    missing = await run_sds_async("watch", "w")
    assert missing.returncode == 2
    one_error_line(missing)


async def test_watch_shows_the_servers_reason_for_a_refusal(server: RunningServer) -> None:
    result = await run_sds_async("watch", "w", "--token", "not-a-jwt", "--url", server.http_url)
    assert result.returncode == 1
    line = one_error_line(result)
    assert "HTTP 401: " in line
    reason = line.split("HTTP 401: ", 1)[1]
    assert reason and reason != "None"


async def test_watch_until_idle_ends_with_exit_0_on_a_quiet_store(
    persistent_server: RunningServer,
) -> None:
    server = persistent_server
    await server.hold("quiet", b"\x01one")
    result = await watch_with_a_read_token(
        server, "quiet", "--url", server.http_url, "--count", "5", "--until-idle", "0.5", "--json"
    )
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["type"] for line in result.stdout.splitlines()] == ["PATCH"]


async def test_watch_warns_when_the_persist_dir_has_no_file_for_the_id(
    persistent_server: RunningServer,
) -> None:
    server = persistent_server
    await server.connect("notes", sub="writer")
    directory = server.config.persist_dir
    assert directory is not None
    env = clean_env(SDS_PERSIST_DIR=str(directory))
    args = ["--url", server.http_url, "--until-idle", "0.2"]
    typo = await run_sds_async(
        "watch", "ntoes", "--token", server.token("ntoes", "read"), *args, env=env
    )
    assert typo.returncode == 0, typo.stderr
    assert "no file for store 'ntoes'" in typo.stderr
    known = await run_sds_async(
        "watch", "notes", "--token", server.token("notes", "read"), *args, env=env
    )
    assert known.returncode == 0, known.stderr
    assert "no file for store" not in known.stderr
