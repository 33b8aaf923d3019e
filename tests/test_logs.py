"""Logs: text or JSON lines, one per connection open and close, never a token or the secret."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
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


def _raw_request(port: int, request: bytes) -> bytes:
    """Send ``request`` as it is over a fresh socket; the start of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        return sock.recv(200)


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_malformed_requests_with_tokens_leave_no_token_or_traceback_and_one_summary(
    tmp_path: Path, log_format: str
) -> None:
    with spawn_server(["--log-format", log_format], cwd=tmp_path) as server:
        token = server.token(STORE, sub=SUB)
        malformed = [
            # A trailing CR on the Bearer header.
            f"GET /ws/{STORE} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\r\n\r\n",
            # An unencoded space in the store id, the token in the query.
            f"GET /ws/a b?token={token} HTTP/1.1\r\nHost: a\r\n\r\n",
        ]
        for _ in range(10):
            for request in malformed:
                answer = await asyncio.to_thread(_raw_request, server.port, request.encode())
                assert answer.startswith(b"HTTP/1.") and b" 400 " in answer
        await asyncio.to_thread(_wait_for_lines, server, "bad HTTP requests", 1)
        assert await asyncio.to_thread(server.stop) == 0
    stderr = server.stderr
    _assert_no_secrets(stderr, [token])
    assert "Traceback" not in stderr, stderr
    assert "Error handling request" not in stderr
    summaries = [line for line in stderr.splitlines() if "bad HTTP requests" in line]
    # The first at once, the rest of the interval when the server stops.
    assert len(summaries) == 2, summaries
    counts = [
        sum(int(part.rsplit("=", 1)[1].strip('"}')) for part in line.split(": ")[-1].split(", "))
        for line in summaries
    ]
    assert counts == [1, 19]


@pytest.mark.parametrize(
    "text",
    [
        "GET /ws/x?token=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl HTTP/1.1",
        "Authorization: Bearer opaque-credential-123",
        "header eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl in a message",
        "/signal/x?a=1&token=opaque-credential-123&b=2",
    ],
)
def test_every_token_shape_is_redacted(text: str) -> None:
    from sds.logs import redact

    redacted = redact(text)
    assert "[redacted]" in redacted
    assert "c2lnbmF0dXJl" not in redacted
    assert "opaque-credential-123" not in redacted


def _forged_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("FORGED")]


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_control_characters_in_paths_and_subs_cannot_forge_log_lines(
    tmp_path: Path, log_format: str
) -> None:
    forged_sub = "mallory\nFORGED ERROR sds.auth: admin token leaked\r"
    with spawn_server(["--log-format", log_format], cwd=tmp_path) as server:
        admin = server.token(STORE, scope="admin", sub="admin")
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                server.http_url + "/api/token",
                json={"sub": forged_sub, "scope": "write"},
                headers={"Authorization": f"Bearer {admin}"},
            ) as response,
        ):
            assert response.status == 200
            minted = (await response.json())["token"]
        client = StoreClient(server.ws_url, STORE, minted)
        await client.connect()
        await client.close()
        answer = await asyncio.to_thread(
            _raw_request,
            server.port,
            b"GET /metrics%0AFORGED%20ERROR%20x%0D HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        assert b" 404 " in answer
        await asyncio.to_thread(_wait_for_lines, server, "close store=", 1)
        assert await asyncio.to_thread(server.stop) == 0
    stderr = server.stderr
    assert _forged_lines(stderr) == []
    assert "\r" not in stderr
    escaped = "\\\\x0a" if log_format == "json" else "\\x0a"
    assert stderr.count(f"mallory{escaped}FORGED ERROR") >= 2, "the open and close lines"
    assert f"/metrics{escaped}FORGED ERROR x" in stderr
    if log_format == "json":
        entries = [json.loads(line) for line in stderr.splitlines()]
        opened = [e for e in entries if e.get("event") == "open"]
        assert opened[0]["sub"] == "mallory\\x0aFORGED ERROR sds.auth: admin token leaked\\x0d"


def test_text_formatter_indents_tracebacks_and_escapes_their_lines() -> None:
    from sds.logs import TextFormatter

    try:
        raise ValueError("bad\nFORGED line")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "sds.test", logging.ERROR, __file__, 1, "failed: %s", ("a\nb",), sys.exc_info()
        )
    lines = TextFormatter().format(record).splitlines()
    assert lines[0].endswith("ERROR sds.test: failed: a\\x0ab")
    assert all(line.startswith("  ") for line in lines[1:])
    assert _forged_lines("\n".join(lines)) == []


@pytest.mark.slow
async def test_json_access_lines_have_fields_and_trust_forwarded_only_from_trusted_proxies(
    tmp_path: Path,
) -> None:
    forwarded_for = {"X-Forwarded-For": "198.51.100.9, 203.0.113.7"}
    forwarded = {"Forwarded": 'for="[2001:db8::5]:4711";proto=https'}

    async def get(url: str, headers: dict[str, str]) -> None:
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as r:
            assert r.status in (200, 404)

    def access_entries(stderr: str) -> list[dict[str, Any]]:
        entries = [json.loads(line) for line in stderr.splitlines() if line.strip()]
        return [e for e in entries if e["logger"] == "sds.access" and e["path"] != "/healthz"]

    with spawn_server(["--log-format", "json"], cwd=tmp_path / "a") as server:
        await get(server.http_url + "/metrics?token=secret-query-value", forwarded_for)
        await get(server.http_url + "/nothing-here", forwarded)
        await get(server.http_url + "/metrics", {})
        assert await asyncio.to_thread(server.stop) == 0
    first, second, third = access_entries(server.stderr)
    assert first["method"] == "GET"
    assert first["path"] == "/metrics"
    assert first["status"] == 200
    assert isinstance(first["duration_s"], float) and first["duration_s"] >= 0
    assert first["remote"] == "203.0.113.7", "loopback is a trusted proxy by default"
    assert second["remote"] == "2001:db8::5"
    assert second["status"] == 404
    assert third["remote"] == "127.0.0.1"
    assert "secret-query-value" not in server.stderr

    env = clean_env({"SDS_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1"}, secret=TEST_SECRET)
    with spawn_server(["--log-format", "json"], env=env, cwd=tmp_path / "b") as server:
        await get(server.http_url + "/metrics", forwarded_for)
        assert await asyncio.to_thread(server.stop) == 0
    (entry,) = access_entries(server.stderr)
    assert entry["remote"] == "127.0.0.1", "a header from an untrusted peer is ignored"


@pytest.mark.slow
async def test_serve_logs_one_start_line_without_secrets(tmp_path: Path) -> None:
    # (A database URL's password in the start line: test_start_line_shows_a_database_url...)
    env = clean_env(secret=TEST_SECRET)
    args = ["--persist-dir", str(tmp_path / "stores"), "--max-connections", "77"]
    with spawn_server(args, env=env, cwd=tmp_path) as server:
        port = server.port
        assert await asyncio.to_thread(server.stop) == 0
    lines = [line for line in server.stderr.splitlines() if "listening on" in line]
    assert len(lines) == 1
    (line,) = lines
    assert f"http://127.0.0.1:{port}" in line
    assert f"persist dir {tmp_path / 'stores'}" in line
    assert "value mode: blob" in line
    assert "max-connections=77" in line
    assert "max-frame-bytes" not in line, "defaults are not listed"
    assert TEST_SECRET not in server.stderr


def test_start_line_shows_a_database_url_without_its_password() -> None:
    from sds.app import _without_password

    assert (
        _without_password("postgresql://sds:pw-1@db:5432/sds") == "postgresql://sds:***@db:5432/sds"
    )
    assert _without_password("postgresql://db/sds") == "postgresql://db/sds"
    assert _without_password("/var/lib/sds") == "/var/lib/sds"
    assert (
        _without_password("postgresql://db/sds?sslmode=require&password=pw-2")
        == "postgresql://db/sds?sslmode=require&password=***"
    )


def test_other_request_failures_keep_one_traceback_per_interval_and_are_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import sys

    from sds.logs import RequestErrorSummary

    summary = RequestErrorSummary(interval=60)

    def failure() -> logging.LogRecord:
        try:
            raise RuntimeError("handler bug")
        except RuntimeError:
            return logging.LogRecord(
                "aiohttp.server",
                logging.ERROR,
                __file__,
                1,
                "Error handling request from %s",
                ("127.0.0.1",),
                sys.exc_info(),
            )

    caplog.set_level(logging.WARNING, logger="sds.http")
    assert summary.filter(failure()) is True, "the first keeps its traceback"
    assert [summary.filter(failure()) for _ in range(5)] == [False] * 5
    other = logging.LogRecord("sds.app", logging.ERROR, __file__, 1, "other", (), None)
    assert summary.filter(other) is True
    summary.flush()
    # The first suppressed one is reported at once, the rest at the end of the interval.
    assert [r.getMessage() for r in caplog.records if r.name == "sds.http"] == [
        "bad HTTP requests since last report: RuntimeError=1",
        "bad HTTP requests since last report: RuntimeError=4",
    ]
