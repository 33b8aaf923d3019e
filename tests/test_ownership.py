"""Several processes on one machine: every store (and signalling room) has one owner.

Real `sds serve` processes share a persist dir (or, relay-only, a --lock-dir) on
loopback; clients connect to each process directly, as a round-robin proxy would
spread them. Whatever process a client reached, the clients of one store exchange
every frame through the one owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import aiohttp
import pytest

from sds.backends.sqlite import LockRecord, lock_holder
from sds.client import ClientClosed, StoreClient
from tests.helpers import ServerProcess, http_get, spawn_server

pytestmark = pytest.mark.slow


@contextmanager
def cluster(tmp_path: Path, args: Sequence[str], count: int = 3) -> Iterator[list[ServerProcess]]:
    """``count`` servers started with the same ``args``, each logging into its own dir."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(
                spawn_server(
                    [*args, "--handover-grace", "0.5"], cwd=tmp_path, log_dir=tmp_path / f"p{i}"
                )
            )
            for i in range(count)
        ]


def metric(server: ServerProcess, name: str, labels: str = "") -> float:
    """The value of one sample of the server's /metrics (0 when absent)."""
    _status, body = http_get(f"{server.http_url}/metrics", timeout=5)
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", re.MULTILINE)
    match = pattern.search(body.decode())
    return float(match.group(1)) if match else 0.0


async def eventually(server: ServerProcess, name: str, labels: str, value: float) -> None:
    """Wait (bounded) until a metric has ``value``."""
    async with asyncio.timeout(10):
        while await asyncio.to_thread(metric, server, name, labels) != value:
            await asyncio.sleep(0.05)


def frame(sender: int, n: int) -> bytes:
    return b"\x01" + bytes([sender]) + n.to_bytes(4, "big") + b"p" * 16


async def kill_the_owner_mid_stream(
    owner: ServerProcess, writer: StoreClient, reader: StoreClient, *, after: int
) -> list[bytes]:
    """Stream from ``writer`` (on the store's owner) to ``reader`` (forwarded by another
    process), SIGKILL the owner once the reader saw ``after`` frames; return what it saw.

    The forwarder tells its client to reconnect (service restart), and what the reader
    saw is in order without a gap.
    """
    seen: list[bytes] = []
    closed: list[int | None] = []

    async def stream() -> None:
        with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
            for n in range(100_000):
                await writer.send(frame(0, n))
                if n % 20 == 0:
                    await asyncio.sleep(0.001)

    async def record() -> None:
        try:
            while True:
                seen.append(await reader.receive(timeout=10))
        except ClientClosed as exc:
            closed.append(exc.code)

    streaming = asyncio.create_task(stream())
    recording = asyncio.create_task(record())
    async with asyncio.timeout(20):
        while len(seen) < after:
            await asyncio.sleep(0.01)
    owner.send_signal(signal.SIGKILL)
    await asyncio.to_thread(owner.wait, 10)
    await asyncio.wait_for(recording, 15)
    streaming.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await streaming
    await writer.close()
    await reader.close()
    assert closed == [1012]
    assert seen == [frame(0, n) for n in range(len(seen))]
    return seen


async def sigterm_the_owner(
    owner: ServerProcess, other: ServerProcess, store_id: str
) -> list[int | None]:
    """50 frames from a direct client of ``owner`` reach a client forwarded by ``other``;
    then SIGTERM the owner. The close codes the two clients got (direct one first)."""
    direct = StoreClient(owner.ws_url, store_id, owner.token(store_id, sub="d"))
    await direct.connect()
    via = StoreClient(other.ws_url, store_id, other.token(store_id, sub="v"))
    await via.connect()
    for n in range(50):
        await direct.send(frame(0, n))
    for n in range(50):
        assert await via.receive(timeout=10) == frame(0, n)
    owner.send_signal(signal.SIGTERM)
    codes = [await direct.wait_closed(timeout=15), await via.wait_closed(timeout=15)]
    await direct.close()
    await via.close()
    return codes


async def hand_over_to_the_forwarder(
    first: ServerProcess, second: ServerProcess, store_id: str
) -> None:
    """A store owned by ``first`` with one direct client and one client forwarded by
    ``second``: when the direct client leaves, after the grace the store goes to the
    forwarder (its client is told to reconnect with 1012)."""
    direct = StoreClient(first.ws_url, store_id, first.token(store_id, sub="d"))
    await direct.connect()
    moved = StoreClient(second.ws_url, store_id, second.token(store_id, sub="m"))
    await moved.connect()
    await direct.send(frame(0, 0))
    assert await moved.receive(timeout=10) == frame(0, 0)
    assert metric(second, "sds_forwarded_connections") == 1
    await direct.close()
    assert await moved.wait_closed(timeout=15) == 1012
    await moved.close()
    await eventually(first, "sds_ownership_changes_total", '{reason="handed_over"}', 1)


async def exchange(clients: list[StoreClient], per_client: int) -> list[list[bytes]]:
    """Every client sends ``per_client`` patches; what each client received from the others."""
    received: list[list[bytes]] = [[] for _ in clients]
    expected = per_client * (len(clients) - 1)

    async def read(i: int) -> None:
        while len(received[i]) < expected:
            received[i].append(await clients[i].receive(timeout=10))

    async def write(i: int) -> None:
        for n in range(per_client):
            await clients[i].send(frame(i, n))
            if n % 10 == 0:
                await asyncio.sleep(0.001)

    async with asyncio.timeout(60):
        readers = [asyncio.create_task(read(i)) for i in range(len(clients))]
        await asyncio.gather(*(write(i) for i in range(len(clients))))
        await asyncio.gather(*readers)
    return received


def from_sender(frames: list[bytes], sender: int) -> list[bytes]:
    return [f for f in frames if f[1] == sender]


async def connect_all(
    servers: list[ServerProcess], store: str, count: int, path: str = "ws"
) -> list[StoreClient]:
    """``count`` clients of ``store``, connected to the servers in turn (round robin)."""
    clients = []
    for i in range(count):
        server = servers[i % len(servers)]
        client = StoreClient(server.ws_url, store, server.token(store, sub=f"c{i}"), path=path)
        await client.connect()
        clients.append(client)
    return clients


async def close_all(clients: list[StoreClient]) -> None:
    for client in clients:
        with contextlib.suppress(Exception):
            await client.close()


async def assert_every_frame_exchanged(servers: list[ServerProcess], store: str) -> None:
    clients = await connect_all(servers, store, 6)
    try:
        received = await exchange(clients, 100)
    finally:
        await close_all(clients)
    for i, frames in enumerate(received):
        for sender in range(len(clients)):
            if sender != i:
                assert from_sender(frames, sender) == [frame(sender, n) for n in range(100)]


async def test_clients_of_one_store_on_three_processes_exchange_every_frame(
    tmp_path: Path,
) -> None:
    stores = tmp_path / "stores"
    with cluster(tmp_path, ["--persist-dir", str(stores)]) as servers:
        await assert_every_frame_exchanged(servers, "shared")
        forwarded = [metric(s, "sds_forwarded_connections_opened_total") for s in servers]
        # One owner served its two clients directly; the four others were forwarded to it.
        assert sorted(forwarded) == [0.0, 2.0, 2.0]
        # Everything is stored once, in one order, by the one owner.
        joiner = StoreClient(servers[1].ws_url, "shared", servers[1].token("shared"))
        async with joiner:
            history = await joiner.receive_all(window=1.0)
        assert len(history) == 600
        for sender in range(6):
            assert from_sender(history, sender) == [frame(sender, n) for n in range(100)]


async def test_relay_only_processes_sharing_a_lock_dir_never_split_a_store(
    tmp_path: Path,
) -> None:
    with cluster(tmp_path, ["--lock-dir", str(tmp_path / "locks")]) as servers:
        await assert_every_frame_exchanged(servers, "live")
        holders = [metric(s, "sds_forwarded_connections_opened_total") for s in servers]
        assert sorted(holders) == [0.0, 2.0, 2.0]


async def test_signalling_peers_on_three_processes_share_one_room(tmp_path: Path) -> None:
    with cluster(tmp_path, ["--lock-dir", str(tmp_path / "locks")]) as servers:
        peers = await connect_all(servers, "room", 3, path="signal")
        try:
            for i, peer in enumerate(peers):
                await peer.send_text(json.dumps({"type": "hello", "from": f"p{i}"}))
                for j, other in enumerate(peers):
                    if j != i:
                        message = await other.receive_message(timeout=10)
                        assert json.loads(message.data) == {"type": "hello", "from": f"p{i}"}
        finally:
            await close_all(peers)


async def test_owner_killed_mid_stream_loses_nothing_a_peer_saw(tmp_path: Path) -> None:
    stores = tmp_path / "stores"
    with cluster(tmp_path, ["--persist-dir", str(stores)], count=2) as servers:
        owner, other = servers
        writer = StoreClient(owner.ws_url, "crash", owner.token("crash", sub="w"))
        await writer.connect()
        reader = StoreClient(other.ws_url, "crash", other.token("crash", sub="r"))
        await reader.connect()
        holder = lock_holder(stores / "crash.db")
        assert holder is not None and holder.pid == owner.pid
        seen = await kill_the_owner_mid_stream(owner, writer, reader, after=1000)

        # The next connection takes the store; a fresh joiner gets every frame the
        # reader saw, in order, once (and possibly more that committed after).
        joiner = StoreClient(other.ws_url, "crash", other.token("crash", sub="j"))
        async with joiner:
            history = await joiner.receive_all(window=1.0)
        assert history[: len(seen)] == seen
        assert history == [frame(0, n) for n in range(len(history))]
        holder = lock_holder(stores / "crash.db")
        assert holder is not None and holder.pid == other.pid


async def test_store_with_only_forwarded_clients_is_handed_to_their_process(
    tmp_path: Path,
) -> None:
    stores = tmp_path / "stores"
    with cluster(tmp_path, ["--persist-dir", str(stores)], count=2) as servers:
        first, second = servers
        await hand_over_to_the_forwarder(first, second, "doc")

        again = StoreClient(second.ws_url, "doc", second.token("doc", sub="m"))
        async with again:
            assert await again.receive(timeout=10) == frame(0, 0)
            holder = lock_holder(stores / "doc.db")
            assert holder is not None and holder.pid == second.pid
            assert metric(second, "sds_forwarded_connections") == 0
            # A client that now reaches the first process is forwarded to the second.
            late = StoreClient(first.ws_url, "doc", first.token("doc", sub="l"))
            async with late:
                assert await late.receive(timeout=10) == frame(0, 0)
                await late.send(frame(1, 0))
                assert await again.receive(timeout=10) == frame(1, 0)
                assert metric(first, "sds_forwarded_connections") == 1


async def test_idle_store_is_released_at_once_to_a_process_that_forwards_to_it(
    tmp_path: Path,
) -> None:
    stores = tmp_path / "stores"
    with cluster(tmp_path, ["--persist-dir", str(stores), "--store-close-grace", "60"], 2) as (
        first,
        second,
    ):
        async with StoreClient(first.ws_url, "idle", first.token("idle")) as client:
            await client.send(frame(0, 0))
            await asyncio.sleep(0.2)
        # The first process keeps the file open (close grace), but nobody uses it.
        holder = lock_holder(stores / "idle.db")
        assert holder is not None and holder.pid == first.pid
        async with StoreClient(second.ws_url, "idle", second.token("idle")) as client:
            assert await client.receive(timeout=10) == frame(0, 0)
            holder = lock_holder(stores / "idle.db")
            assert holder is not None and holder.pid == second.pid
        assert metric(second, "sds_forwarded_connections_opened_total") == 0


async def test_sigterm_hands_stores_over_with_one_reconnect(tmp_path: Path) -> None:
    stores = tmp_path / "stores"
    with cluster(tmp_path, ["--persist-dir", str(stores)], count=2) as servers:
        owner, other = servers
        for code in await sigterm_the_owner(owner, other, "roll"):
            assert code in (1001, 1012)
        # Each client reconnects once (to the process left) and finds everything.
        first = StoreClient(other.ws_url, "roll", other.token("roll", sub="d"))
        second = StoreClient(other.ws_url, "roll", other.token("roll", sub="v"))
        async with first, second:
            assert await first.receive_all(window=1.0) == [frame(0, n) for n in range(50)]
            assert await second.receive_all(window=0.5) == [frame(0, n) for n in range(50)]
            await first.send(frame(1, 0))
            assert await second.receive(timeout=10) == frame(1, 0)
        assert owner.wait(15) == 0
        holder = lock_holder(stores / "roll.db")
        assert holder is None or holder.pid == other.pid


async def test_owner_without_a_url_gives_503_never_a_second_copy(tmp_path: Path) -> None:
    from sds.backends.sqlite import file_lock

    stores = tmp_path / "stores"
    stores.mkdir()
    record = LockRecord(pid=1, instance="0123456789abcdef", command="sds store compact")
    with (
        file_lock(stores / "held.db", timeout=1, record=record),
        spawn_server(["--persist-dir", str(stores)], cwd=tmp_path) as server,
    ):
        url = f"{server.http_url}/ws/held?token={server.token('held')}"
        status, _body = await asyncio.to_thread(http_get, url, 15)
        assert status == 503


async def test_store_goes_back_to_a_killed_owner_when_it_returns(tmp_path: Path) -> None:
    stores = tmp_path / "stores"
    with cluster(tmp_path, ["--persist-dir", str(stores)], count=2) as servers:
        home, interim = servers
        first = StoreClient(home.ws_url, "fb", home.token("fb", sub="a"))
        await first.connect()
        await first.send(frame(0, 0))
        await asyncio.sleep(0.2)
        home.send_signal(signal.SIGKILL)
        await asyncio.to_thread(home.wait, 10)
        await first.close()
        # While the home process is down the proxy sends the store's clients elsewhere.
        stayed = StoreClient(interim.ws_url, "fb", interim.token("fb", sub="a"))
        await stayed.connect()
        assert await stayed.receive(timeout=10) == frame(0, 0)
        home.restart()
        await home.wait_ready_async()
        # The proxy routes the store home again: a new client arrives there and is
        # forwarded; the interim owner hands the store back, its old client included.
        returning = StoreClient(home.ws_url, "fb", home.token("fb", sub="b"))
        await returning.connect()
        assert await returning.receive(timeout=10) == frame(0, 0)
        assert await stayed.wait_closed(timeout=15) == 1012
        assert await returning.wait_closed(timeout=15) == 1012
        await stayed.close()
        await returning.close()
        await eventually(interim, "sds_ownership_changes_total", '{reason="handed_over"}', 1)
        back = [StoreClient(home.ws_url, "fb", home.token("fb", sub=sub)) for sub in ("a", "b")]
        for client in back:
            await client.connect()
        try:
            holder = lock_holder(stores / "fb.db")
            assert holder is not None and holder.pid == home.pid
            await back[0].send(frame(1, 0))
            assert await back[1].receive(timeout=10) == frame(0, 0)
            assert await back[1].receive(timeout=10) == frame(1, 0)
            assert metric(home, "sds_forwarded_connections") == 0
        finally:
            await close_all(back)
        # Settled: nothing moves any more.
        await asyncio.sleep(1.0)
        assert metric(interim, "sds_ownership_changes_total", '{reason="handed_over"}') == 1


async def test_store_goes_back_to_a_restarted_process_after_sigterm(tmp_path: Path) -> None:
    stores = tmp_path / "stores"
    with cluster(tmp_path, ["--persist-dir", str(stores)], count=2) as servers:
        home, interim = servers
        async with StoreClient(home.ws_url, "rr", home.token("rr")) as client:
            await client.send(frame(0, 0))
            await asyncio.sleep(0.2)
            home.send_signal(signal.SIGTERM)
            assert await client.wait_closed(timeout=15) == 1001
        assert home.wait(15) == 0
        stayed = StoreClient(interim.ws_url, "rr", interim.token("rr"))
        await stayed.connect()
        assert await stayed.receive(timeout=10) == frame(0, 0)
        home.restart()
        await home.wait_ready_async()
        returning = StoreClient(home.ws_url, "rr", home.token("rr"))
        await returning.connect()
        assert await returning.receive(timeout=10) == frame(0, 0)
        assert await stayed.wait_closed(timeout=15) == 1012
        await stayed.close()
        await returning.close()
        async with StoreClient(home.ws_url, "rr", home.token("rr")) as again:
            assert await again.receive(timeout=10) == frame(0, 0)
            holder = lock_holder(stores / "rr.db")
            assert holder is not None and holder.pid == home.pid


async def test_store_sharing_a_file_with_a_live_store_is_not_handed_over(tmp_path: Path) -> None:
    stores = tmp_path / "stores"
    with cluster(tmp_path, ["--persist-dir", str(stores)], count=2) as (first, second):
        # "x/y" and "x_y" are kept in one file, x_y.db: one lock for both.
        async with (
            StoreClient(first.ws_url, "x/y", first.token("x/y")) as keeper,
            StoreClient(second.ws_url, "x_y", second.token("x_y", sub="f")) as forwarded,
            StoreClient(first.ws_url, "x_y", first.token("x_y", sub="d")) as direct,
        ):
            await direct.close()
            # Only forwarded clients of x_y now, but handing it over would close x/y too.
            await asyncio.sleep(1.5)
            async with StoreClient(first.ws_url, "x_y", first.token("x_y", sub="n")) as new:
                await new.send(frame(0, 0))
                assert await forwarded.receive(timeout=10) == frame(0, 0)
            await keeper.send(frame(1, 0))
            assert metric(first, "sds_ownership_changes_total", '{reason="handed_over"}') == 0


async def test_forwarded_connections_go_to_the_advertised_url(tmp_path: Path) -> None:
    from tests.helpers import free_port

    stores = tmp_path / "stores"
    ports = [free_port(), free_port()]
    with ExitStack() as stack:
        first, second = (
            stack.enter_context(
                spawn_server(
                    ["--persist-dir", str(stores), "--advertise-url", f"http://localhost:{port}"],
                    port=port,
                    cwd=tmp_path,
                    log_dir=tmp_path / f"p{port}",
                )
            )
            for port in ports
        )
        async with StoreClient(first.ws_url, "adv", first.token("adv")) as owner_client:
            holder = lock_holder(stores / "adv.db")
            assert holder is not None and holder.url == f"http://localhost:{ports[0]}"
            async with StoreClient(second.ws_url, "adv", second.token("adv")) as other:
                await other.send(frame(1, 0))
                assert await owner_client.receive(timeout=10) == frame(1, 0)
            assert metric(second, "sds_forwarded_connections_opened_total") == 1
