"""/healthz (200, or 503 with the reason) and /metrics (Prometheus text, no ids in labels)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import platform
import resource
import signal
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sds.client import StoreClient
from sds.tokens import mint_token
from tests.conftest import RunningServer, ServerFactory
from tests.helpers import spawn_server

STORE = "zebra-store-7f3a9c"
SUBJECT = "sub-unicorn-42b1"


async def _get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


async def _health(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(url + "/healthz") as response:
        return response.status, await response.json()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page, by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_healthz_reports_ok_and_the_sqlite_version(persistent_server: RunningServer) -> None:
    status, body = await _health(persistent_server.http_url)
    assert status == 200
    assert body["status"] == "ok"
    assert body["persistence"] is True
    assert body["sqlite_version"] == sqlite3.sqlite_version
    assert "problems" not in body


async def test_healthz_relay_only(server: RunningServer) -> None:
    status, body = await _health(server.http_url)
    assert status == 200
    assert body["persistence"] is False
    assert body["sqlite_version"] == sqlite3.sqlite_version


async def test_healthz_is_503_with_the_reason_when_the_persist_dir_is_gone(
    persistent_server: RunningServer, tmp_path: Path
) -> None:
    persist = persistent_server.config.persist_dir
    assert persist is not None
    client = await persistent_server.connect("healthy-store")
    await client.send(b"\x01before")
    moved = tmp_path / "stores-moved"
    persist.rename(moved)
    persist.write_bytes(b"not a directory")
    try:
        status, body = await _health(persistent_server.http_url)
        assert status == 503
        assert body["status"] == "unavailable"
        assert any("persist dir" in problem for problem in body["problems"])
        assert body["sqlite_version"] == sqlite3.sqlite_version
        assert str(persist) not in str(body)
    finally:
        persist.unlink()
        moved.rename(persist)
    # A failure stays reported until a later write succeeds: the next probe, within a second.
    for _ in range(50):
        status, body = await _health(persistent_server.http_url)
        if status == 200:
            break
        await asyncio.sleep(0.1)
    assert status == 200


def _limit_file_size() -> None:
    """In the server child: writes past 512 KiB fail with EFBIG (a full disk, for real)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))


@pytest.mark.slow
async def test_failed_store_write_closes_sender_1011_is_not_relayed_and_healthz_is_503(
    tmp_path: Path,
) -> None:
    persist = tmp_path / "stores"
    with spawn_server(
        ["--persist-dir", str(persist)], cwd=tmp_path, preexec=_limit_file_size
    ) as server:
        store = "full-disk"
        writer = StoreClient(server.ws_url, store, server.token(store, sub="writer"))
        peer = StoreClient(server.ws_url, store, server.token(store, sub="peer"))
        await writer.connect()
        await peer.connect()
        try:
            closed = asyncio.create_task(writer.wait_closed(timeout=15))
            sent: list[bytes] = []
            for index in range(64):
                if closed.done():
                    break
                frame = b"\x01" + index.to_bytes(4, "big") + b"w" * 32 * 1024
                await writer.send(frame)
                sent.append(frame)
                await asyncio.sleep(0.02)
            code = await closed
            relayed = await peer.receive_all(0.5)
        finally:
            await writer.close()
            await peer.close()
        assert code == 1011
        assert 0 < len(relayed) < len(sent)
        assert relayed == sent[: len(relayed)]
        status, body = await _health(server.http_url)
        assert status == 503
        assert any("storage write failed" in problem for problem in body["problems"])
        _, _, text = await _get(server.http_url + "/metrics")
        assert _value(_samples(text), "sds_storage_failures_total") >= 1
        assert "storage write failed" in server.stderr


async def test_metrics_count_traffic_drops_and_refusals_without_ids(
    make_server: ServerFactory,
) -> None:
    server = await make_server(persist=True, max_connections_per_store=3)
    writer = await server.connect(STORE, sub=SUBJECT)
    reader = await server.connect(STORE, scope="read", sub=SUBJECT + "-reader")
    for index in range(5):
        await writer.send(b"\x01" + bytes([index]) * 100)
    assert len([await reader.receive() for _ in range(5)]) == 5
    await reader.send(b"\x01read-scope-patch")
    await reader.send_text("text is dropped")
    await reader.send(b"")
    await reader.send(b"\x04presence")
    assert await writer.receive() == b"\x04presence"

    refusals = [
        ("bad_signature", mint_token("x" * 40, store_id=STORE, scope="write", sub=SUBJECT)),
        ("missing", ""),
        ("malformed", "not-a-jwt"),
        ("wrong_store", server.token("another-" + STORE, sub=SUBJECT)),
    ]
    for _, token in refusals:
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await StoreClient(server.ws_url, STORE, token).connect()
    third = await server.connect(STORE, sub=SUBJECT + "-third")
    assert len([await third.receive() for _ in range(5)]) == 5, "the stored patches, replayed"
    with pytest.raises(aiohttp.WSServerHandshakeError) as full:
        await server.connect(STORE, sub=SUBJECT + "-fourth")
    assert full.value.status == 503

    status, content_type, text = await _get(server.http_url + "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert "version=0.0.4" in content_type
    samples = _samples(text)
    assert _value(samples, "sds_connections") == 3
    assert _value(samples, "sds_stores") == 1
    assert _value(samples, "sds_store_files_open") == 1
    assert _value(samples, "sds_connections_opened_total") == 3
    assert _value(samples, "sds_frames_relayed_total") >= 6
    assert _value(samples, "sds_bytes_relayed_total") >= 5 * 101
    assert _value(samples, "sds_frames_received_total") >= 7
    # 5 patches to the reader (perhaps written as one run), the presence to the writer,
    # and the 5 stored patches replayed to the third client: every frame counts once.
    assert _value(samples, "sds_frames_sent_total") == 11
    for reason in ("read_scope", "text", "empty"):
        assert _value(samples, "sds_frames_dropped_total", reason=reason) == 1, reason
    for reason, _ in refusals:
        assert _value(samples, "sds_auth_failures_total", reason=reason) == 1, reason
    assert _value(samples, "sds_connections_refused_total", reason="max_connections_per_store") == 1
    assert _value(samples, "sds_storage_commits_total") >= 1
    assert _value(samples, "sds_storage_commit_seconds_count") >= 1
    assert _value(samples, "sds_storage_commit_seconds_sum") > 0
    assert ("sds_storage_queue_depth", ()) in samples
    assert ("sds_storage_commit_seconds_max", ()) in samples

    assert STORE not in text
    assert SUBJECT not in text
    label_names = {
        name
        for sample, labels in samples
        if sample.startswith("sds_") and sample != "sds_build_info"
        for name, _ in labels
    }
    assert label_names <= {"reason", "le"}


async def test_metrics_exposes_every_family_before_any_traffic(server: RunningServer) -> None:
    _, _, text = await _get(server.http_url + "/metrics")
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "sds_connections",
        "sds_stores",
        "sds_frames_relayed",
        "sds_bytes_relayed",
        "sds_frames_dropped",
        "sds_auth_failures",
        "sds_storage_commit_seconds",
        "sds_storage_queue_depth",
    } <= names


async def test_metrics_have_process_families_build_info_and_a_commit_histogram(
    persistent_server: RunningServer,
) -> None:
    client = await persistent_server.connect(STORE)
    reader = await persistent_server.connect(STORE, scope="read", sub="reader")
    for index in range(3):
        await client.send(b"\x01" + bytes([index]) * 10)
    assert len([await reader.receive() for _ in range(3)]) == 3, "relayed: so committed"
    _, _, text = await _get(persistent_server.http_url + "/metrics")
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["sds_storage_commit_seconds"].type == "histogram"
    samples = _samples(text)
    assert _value(samples, "sds_storage_commit_seconds_count") >= 1
    assert _value(samples, "sds_storage_commit_seconds_bucket", le="+Inf") == _value(
        samples, "sds_storage_commit_seconds_count"
    )
    for name in ("process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds"):
        assert name in families, name
    assert "python_info" in families
    (build,) = families["sds_build_info"].samples
    assert build.name == "sds_build_info"
    assert build.value == 1
    assert build.labels["sqlite"] == sqlite3.sqlite_version
    assert build.labels["python"] == platform.python_version()
    assert build.labels["version"] == importlib.metadata.version("sds-relay")


async def test_signal_connections_are_counted(server: RunningServer) -> None:
    peer = StoreClient(server.ws_url, STORE, server.token(STORE, sub=SUBJECT), path="signal")
    await peer.connect()
    try:
        _, _, text = await _get(server.http_url + "/metrics")
        assert _value(_samples(text), "sds_signal_connections") == 1
        assert SUBJECT not in text
    finally:
        await peer.close()
