"""Logs: text or JSON lines, one per connection open and close, never a token or the secret."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sds.appkeys import RELAY
from sds.client import StoreClient
from sds.tokens import mint_token
from tests.conftest import ServerFactory
from tests.helpers import TEST_SECRET, ServerProcess, clean_env, spawn_server

STORE = "log-store-5e1d"
SUB = "log-subject-93c2"


async def _session_traffic(server: ServerProcess) -> list[str]:
    """Open and close two clients, make refusals and mint a token; the tokens used."""
    tokens = [
        server.token(STORE, sub=SUB),
        server.token(STORE, scope="read", sub=SUB + "-reader"),
    ]
    writer = StoreClient(server.ws_url, STORE, tokens[0])
    reader = StoreClient(server.ws_url, STORE, tokens[1], bearer=True)
    await writer.connect()
    await reader.connect()
    await writer.send(b"\x01logged")
    assert await reader.receive() == b"\x01logged"
    await writer.close()
    await reader.close()

    bad = [
        mint_token("wrong-secret-" + "x" * 32, store_id=STORE, scope="write", sub=SUB),
        server.token(STORE, sub=SUB, expires_in=1, now=time.time() - 3600),
        server.token("another-store", sub=SUB),
    ]
    for token in bad:
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await StoreClient(server.ws_url, STORE, token).connect()
    tokens += bad

    admin = server.token(STORE, scope="admin", sub=SUB + "-admin")
    tokens.append(admin)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.http_url + "/api/token",
            json={"sub": "minted", "scope": "read"},
            headers={"Authorization": f"Bearer {admin}"},
        ) as response,
    ):
        assert response.status == 200
        tokens.append((await response.json())["token"])
    return tokens


def _wait_for_lines(server: ServerProcess, text: str, count: int) -> None:
    for _ in range(100):
        if server.stderr.count(text) >= count:
            return
        time.sleep(0.05)


def _assert_no_secrets(stderr: str, tokens: list[str]) -> None:
    assert TEST_SECRET not in stderr, "the JWT secret appears in the log"
    for index, token in enumerate(tokens):
        assert token not in stderr, f"token #{index} appears in the log"
        signature = token.rsplit(".", 1)[-1]
        assert signature not in stderr, f"the signature of token #{index} appears in the log"


@pytest.mark.slow
async def test_json_logs_have_open_and_close_lines_with_fields_and_no_tokens(
    tmp_path: Path,
) -> None:
    with spawn_server(["--log-format", "json", "--log-level", "info"], cwd=tmp_path) as server:
        tokens = await _session_traffic(server)
        await asyncio.to_thread(_wait_for_lines, server, '"event": "close"', 2)
        assert await asyncio.to_thread(server.stop) == 0
    stderr = server.stderr
    entries = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry)

    opens = [e for e in entries if e.get("event") == "open"]
    closes = [e for e in entries if e.get("event") == "close"]
    assert sorted((e["store_id"], e["scope"], e["sub"]) for e in opens) == [
        (STORE, "read", SUB + "-reader"),
        (STORE, "write", SUB),
    ]
    assert sorted((e["store_id"], e["scope"], e["sub"]) for e in closes) == sorted(
        (e["store_id"], e["scope"], e["sub"]) for e in opens
    )
    for entry in closes:
        assert isinstance(entry["duration_s"], float | int)
        assert entry["duration_s"] >= 0
        assert entry["code"] in (1000, 1001, 1005, 1006)
        assert entry["level"] == "info"
    assert any("refused tokens" in e["message"] for e in entries)
    _assert_no_secrets(stderr, tokens)


@pytest.mark.slow
async def test_text_logs_have_one_line_per_open_and_close(tmp_path: Path) -> None:
    with spawn_server(["--log-format", "text"], cwd=tmp_path) as server:
        tokens = await _session_traffic(server)
        await asyncio.to_thread(_wait_for_lines, server, " close store=", 2)
        assert await asyncio.to_thread(server.stop) == 0
    stderr = server.stderr
    assert stderr.count(f"open store={STORE} scope=write sub={SUB}\n") == 1
    assert stderr.count(f"open store={STORE} scope=read sub={SUB}-reader\n") == 1
    assert stderr.count(f"close store={STORE} scope=write sub={SUB} code=") == 1
    assert stderr.count(f"close store={STORE} scope=read sub={SUB}-reader code=") == 1
    assert " duration=" in stderr
    with pytest.raises(ValueError):
        json.loads(stderr.splitlines()[0])
    _assert_no_secrets(stderr, tokens)


@pytest.mark.slow
async def test_log_level_warning_hides_connection_lines(tmp_path: Path) -> None:
    env = clean_env({"SDS_LOG_LEVEL": "warning", "SDS_LOG_FORMAT": "json"}, secret=TEST_SECRET)
    with spawn_server(env=env, cwd=tmp_path) as server:
        tokens = await _session_traffic(server)
        assert await asyncio.to_thread(server.stop) == 0
    stderr = server.stderr
    entries = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert not [e for e in entries if e.get("event") in ("open", "close")]
    assert all(e["level"] in ("warning", "error", "critical") for e in entries)
    assert any("refused tokens" in e["message"] for e in entries)
    _assert_no_secrets(stderr, tokens)


async def test_many_refusals_give_at_most_a_couple_of_log_lines(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = await make_server(persist=True)
    persist = server.config.persist_dir
    assert persist is not None
    bad = mint_token("wrong-secret-" + "x" * 32, store_id="retry", scope="write", sub="retrier")
    caplog.set_level(logging.INFO)
    for _ in range(50):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await StoreClient(server.ws_url, "retry", bad).connect()
        assert refused.value.status == 401
    auth_lines = [r for r in caplog.records if r.name == "sds.auth"]
    assert 1 <= len(auth_lines) <= 2
    # The test server uses aiohttp's own access log; `sds serve` uses sds.app.AccessLogger.
    ours = [r for r in caplog.records if r.name.startswith("sds")]
    assert all(bad not in r.getMessage() for r in ours)
    assert "bad_signature=1" in auth_lines[0].getMessage()
    assert not server.app[RELAY].stores
    assert not list(persist.glob("*.db"))


def _json_line(record: logging.LogRecord) -> dict[str, Any]:
    from sds.logs import JsonFormatter

    parsed: dict[str, Any] = json.loads(JsonFormatter().format(record))
    return parsed


def test_json_formatter_emits_extra_fields_as_keys() -> None:
    record = logging.LogRecord("sds.test", logging.INFO, __file__, 1, "hello %s", ("x",), None)
    record.__dict__.update({"store_id": "s", "code": None, "duration_s": 1.5, "obj": object()})
    entry = _json_line(record)
    assert entry["message"] == "hello x"
    assert entry["store_id"] == "s"
    assert entry["code"] is None
    assert entry["duration_s"] == 1.5
    assert isinstance(entry["obj"], str)
    assert "args" not in entry
    assert "msg" not in entry


def test_auth_failure_summary_is_logged_once_the_interval_passes_even_without_new_refusals(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import time as _time

    from sds.auth import AuthFailures
    from sds.metrics import Metrics

    caplog.set_level(logging.WARNING, logger="sds.auth")
    failures = AuthFailures(Metrics(), interval=0.2)
    for _ in range(5):
        failures.record("expired")
    failures.record("bad_signature")
    lines = [r.getMessage() for r in caplog.records if r.name == "sds.auth"]
    assert lines == ["refused tokens since last report: expired=1"]
    failures.flush_if_due()
    assert len([r for r in caplog.records if r.name == "sds.auth"]) == 1
    _time.sleep(0.25)
    failures.flush_if_due()
    lines = [r.getMessage() for r in caplog.records if r.name == "sds.auth"]
    assert lines[-1] == "refused tokens since last report: bad_signature=1, expired=4"
    failures.flush_if_due()
    assert len([r for r in caplog.records if r.name == "sds.auth"]) == 2
