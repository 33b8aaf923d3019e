"""benchmarks/sds_bench.py: it measures a real server correctly and never leaks a token."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import ServerFactory

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "sds_bench.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sds_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sds_bench"] = module
    spec.loader.exec_module(module)
    return module


bench = load_bench()


async def run_bench(secret: str, *args: str, timeout: float = 30) -> tuple[dict[str, Any], str]:
    """Run sds_bench.py as a subprocess; its JSON result and its stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BENCH),
        *args,
        "--server-pid",
        str(os.getpid()),
        env={**os.environ, "SDS_JWT_SECRET": secret},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode() + err.decode()
    assert secret not in text
    assert "token=" not in text
    assert proc.returncode == 0, err.decode()[-2000:]
    return json.loads(out.decode().strip().splitlines()[-1]), err.decode()


def test_histogram_percentiles_within_a_fraction_of_a_percent() -> None:
    h = bench.Histogram()
    for us in range(1, 100_001):
        h.add(us)
    assert abs(h.percentile(50) - 50_000) <= 50
    assert abs(h.percentile(99) - 99_000) <= 100
    assert h.percentile(100) == 100_000
    merged = bench.Histogram.from_wire(h.to_wire())
    merged.merge(h)
    assert merged.n == 200_000
    assert abs(merged.percentile(50) - 50_000) <= 50


def test_non_loopback_url_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code = bench.main(["fanout", "--url", "ws://192.0.2.1:3160", "--secret", "s" * 32])
    assert code == 2
    assert "only loopback" in capsys.readouterr().err


def test_handshake_failure_reason_is_the_status_not_the_url() -> None:
    assert bench.failure_reason(TimeoutError()) == "timeout"
    assert bench.failure_reason(ConnectionRefusedError(111, "refused")) == "os_111"


@pytest.mark.slow
async def test_fanout_delivers_every_frame_in_order_across_processes(
    make_server: ServerFactory,
) -> None:
    server = await make_server()
    result, err = await run_bench(
        server.config.jwt_secret,
        "fanout",
        "--url",
        server.ws_url,
        "--stores",
        "2",
        "--clients",
        "3",
        "--bytes",
        "64",
        "--duration",
        "1",
        "--procs",
        "1",
    )
    assert result["aborted"] is None
    assert result["not_ready"] == 0
    assert result["deliveries"] > 0
    assert result["delivered_total"] == result["expected_total"]
    assert result["lost"] == 0
    assert result["out_of_order"] == 0
    assert result["echoed"] == 0
    assert result["cross_store"] == 0
    assert result["server"]["cpu_pct"] is not None
    assert "deliveries/s" in err


@pytest.mark.slow
async def test_latency_at_a_fixed_rate_in_one_process(make_server: ServerFactory) -> None:
    server = await make_server()
    result, _ = await run_bench(
        server.config.jwt_secret,
        "latency",
        "--url",
        server.ws_url,
        "--clients",
        "3",
        "--rate",
        "200",
        "--duration",
        "1",
        "--procs",
        "0",
        "--receiver",
        "aiohttp",
    )
    assert result["lost"] == 0
    assert result["echoed"] == 0
    assert 150 <= result["sent"] <= 210
    assert result["latency_ms"]["samples"] == result["sent"] * 2
    assert result["latency_ms"]["p50"] is not None


@pytest.mark.slow
async def test_connect_opens_every_connection(make_server: ServerFactory) -> None:
    server = await make_server()
    result, _ = await run_bench(
        server.config.jwt_secret,
        "connect",
        "--url",
        server.ws_url,
        "--connections",
        "20",
        "--stores",
        "5",
        "--hold",
        "0.2",
    )
    assert result["accepted"] == 20
    assert result["failures"] == {}
    assert result["still_open_after_hold"] == 20
    assert result["server"]["bytes_per_idle_connection"] is not None


@pytest.mark.slow
async def test_connect_counts_refusals_by_http_status(make_server: ServerFactory) -> None:
    server = await make_server()
    result, _ = await run_bench(
        "another-secret-0123456789abcdef0123456789",
        "connect",
        "--url",
        server.ws_url,
        "--connections",
        "20",
        "--hold",
        "0",
    )
    assert result["accepted"] == 0
    assert result["failures"] == {"http_401": 20}


@pytest.mark.slow
async def test_replay_returns_every_patch_once_in_order(make_server: ServerFactory) -> None:
    server = await make_server(persist=True)
    result, _ = await run_bench(
        server.config.jwt_secret,
        "replay",
        "--url",
        server.ws_url,
        "--stores",
        "2",
        "--patches",
        "200",
    )
    assert result["written"] == 400
    assert result["complete"] is True
    assert result["replay"]["replayed"] == 400
    assert result["replay"]["duplicates"] == 0


@pytest.mark.slow
async def test_fanout_replay_check_on_a_persistent_server(make_server: ServerFactory) -> None:
    server = await make_server(persist=True)
    result, _ = await run_bench(
        server.config.jwt_secret,
        "fanout",
        "--url",
        server.ws_url,
        "--clients",
        "2",
        "--bytes",
        "64",
        "--duration",
        "0.5",
        "--procs",
        "0",
        "--replay-check",
    )
    assert result["lost"] == 0
    assert result["replay"]["expected"] == result["sent"] > 0
    assert result["replay"]["complete"] is True
