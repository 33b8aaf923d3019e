"""`sds cluster status`: the live processes of a shared persist dir and the stores each owns.

Real `sds serve` processes on one persist dir, real clients holding their stores open.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sds.client import StoreClient
from tests.helpers import ServerProcess, clean_env, one_error_line, run_sds_async, spawn_server

pytestmark = pytest.mark.slow


@contextmanager
def two_processes(tmp_path: Path, args: list[str]) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two sds processes started with the same ``args``, each in its own working dir."""
    with (
        spawn_server(args, cwd=tmp_path / "a") as first,
        spawn_server(args, cwd=tmp_path / "b") as second,
    ):
        yield first, second


async def run_status(persist: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return await run_sds_async(
        "cluster", "status", "--persist-dir", str(persist), *extra, env=clean_env()
    )


async def status(persist: Path, *extra: str) -> tuple[int, str, str]:
    result = await run_status(persist, *extra)
    return result.returncode, result.stdout, result.stderr


async def test_cluster_status_lists_each_live_process_with_its_url_and_the_stores_it_holds(
    tmp_path: Path,
) -> None:
    persist = tmp_path / "persist"
    persist.mkdir()
    args = ["--persist-dir", str(persist)]
    with two_processes(tmp_path, args) as (first, second):
        async with (
            StoreClient(first.ws_url, "alpha", first.token("alpha")) as alpha,
            StoreClient(second.ws_url, "beta", second.token("beta")) as beta,
            StoreClient(second.ws_url, "gamma", second.token("gamma")) as gamma,
        ):
            for client in (alpha, beta, gamma):
                await client.send(b"\x01patch")
            # A patch is relayed only after its store file is open (and locked).
            for server, store_id in ((second, "gamma"), (first, "alpha"), (second, "beta")):
                token = server.token(store_id)
                async with StoreClient(server.ws_url, store_id, token) as joiner:
                    assert await joiner.receive(timeout=10) == b"\x01patch"

            code, out, err = await status(persist, "--json")
            assert code == 0, err
            report = json.loads(out)
            by_url = {p["url"]: p for p in report["processes"]}
            assert set(by_url) == {first.http_url, second.http_url}
            assert by_url[first.http_url]["pid"] == first.pid
            assert [s["store"] for s in by_url[first.http_url]["stores"]] == ["alpha"]
            assert [s["store"] for s in by_url[second.http_url]["stores"]] == ["beta", "gamma"]
            assert report["others"] == []

            code, out, err = await status(persist)
            assert code == 0, err
            assert "2 process(es) alive" in out
            line = next(row for row in out.splitlines() if row.startswith(second.http_url))
            assert "beta gamma" in line

            # A killed process leaves its record files behind; it no longer counts.
            first.send_signal(signal.SIGKILL)
            first.wait()
            code, out, err = await status(persist, "--json")
            assert code == 0, err
            report = json.loads(out)
            assert [p["url"] for p in report["processes"]] == [second.http_url]
            assert not any("alpha" in s["file"] for p in report["processes"] for s in p["stores"])


async def test_cluster_status_exits_1_when_no_process_serves_the_persist_dir(
    tmp_path: Path,
) -> None:
    persist = tmp_path / "persist"
    persist.mkdir()
    with spawn_server(["--persist-dir", str(persist)], cwd=tmp_path) as server:
        async with StoreClient(server.ws_url, "left", server.token("left")) as client:
            await client.send(b"\x01patch")
    result = await run_status(persist, "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["processes"] == []
    assert one_error_line(result) == f"sds: no sds process is serving {persist}"


async def test_cluster_status_of_a_missing_persist_dir_is_a_one_line_error(tmp_path: Path) -> None:
    code, _, err = await status(tmp_path / "nowhere")
    assert code == 2
    assert err.strip() == f"sds: persist dir {tmp_path / 'nowhere'} does not exist"


async def test_cluster_status_of_relay_only_processes_reads_their_lock_dir(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    args = ["--lock-dir", str(locks)]
    with two_processes(tmp_path, args) as (first, second):
        async with (
            StoreClient(first.ws_url, "live", first.token("live")) as a,
            # Reaches the second process, which forwards it to the owner.
            StoreClient(second.ws_url, "live", second.token("live")) as b,
            StoreClient(second.ws_url, "room", second.token("room"), path="signal"),
        ):
            await a.send(b"\x01patch")
            assert await b.receive(timeout=10) == b"\x01patch"
            result = await run_sds_async(
                "cluster", "status", "--lock-dir", str(locks), "--json", env=clean_env()
            )
            assert result.returncode == 0, result.stderr
            by_url = {p["url"]: p for p in json.loads(result.stdout)["processes"]}
            assert set(by_url) == {first.http_url, second.http_url}
            assert [s["store"] for s in by_url[first.http_url]["stores"]] == ["live"]
            assert by_url[second.http_url]["stores"] == []
            assert by_url[second.http_url]["rooms"] == ["room"]


async def test_cluster_status_without_a_dir_is_a_one_line_usage_error(tmp_path: Path) -> None:
    result = await run_sds_async("cluster", "status", env=clean_env())
    assert result.returncode == 2
    assert "no persist dir or lock dir" in one_error_line(result)


async def test_cluster_status_with_both_a_persist_dir_and_a_lock_dir_is_a_usage_error(
    tmp_path: Path,
) -> None:
    result = await run_status(tmp_path, "--lock-dir", str(tmp_path / "locks"))
    assert result.returncode == 2
    assert one_error_line(result).startswith("sds: lock-dir is for relay-only processes")


async def test_cluster_status_with_an_unreachable_database_says_so_without_the_password() -> None:
    env = clean_env(SDS_DATABASE_URL="postgresql://sds:pw-not-shown@127.0.0.1:1/sds")
    result = await run_sds_async("cluster", "status", env=env)
    assert result.returncode == 2
    line = one_error_line(result)
    assert "cannot connect to PostgreSQL at postgresql://sds:***@127.0.0.1:1/sds" in line
    assert "pw-not-shown" not in result.stderr + result.stdout
