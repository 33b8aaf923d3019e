"""Three real `sds serve` processes on one persist dir behind the real HAProxy (shipped config).

Clients reconnect like the SDS clients (on a close, again after a short delay, a
bounded number of times). What must hold whatever happens to one process: the
clients of one store are never split, a store is served again as soon as HAProxy
has removed a dead process, and nothing any peer saw is lost or repeated.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from sds.client import StoreClient
from sds.cluster import cluster_status
from sds.pg_ownership import database_status
from tests.cluster import Cluster, ReconnectingPeer

pytestmark = pytest.mark.slow

STORES = 30
PATCH_PREFIX = b"\x01"


def patch(store_id: str, index: int) -> bytes:
    return PATCH_PREFIX + f"{store_id}:{index:06d}".encode()


def indexes(store_id: str, frames: list[bytes]) -> list[int]:
    """The writer's patch numbers among ``frames``, in the order they came."""
    prefix = PATCH_PREFIX + f"{store_id}:".encode()
    return [int(frame[len(prefix) :]) for frame in frames if frame.startswith(prefix)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three processes sharing a persist dir (SQLite store files)."""
    with Cluster(tmp_path) as running:
        yield running


@pytest.fixture(params=["sqlite", "postgresql", "postgresql-machines"])
def any_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """Three processes on SQLite files in a shared persist dir, then on one PostgreSQL
    database with a shared lock dir, then on one PostgreSQL database that holds the
    ownership too, with nothing else shared (standing in for three machines)."""
    url = request.getfixturevalue("database_url") if request.param != "sqlite" else None
    machines = request.param == "postgresql-machines"
    with Cluster(tmp_path, database_url=url, database_ownership=machines) as running:
        yield running


class Traffic:
    """A writer and a listener per store, all through HAProxy; writers send every ``period``."""

    def __init__(
        self, cluster: Cluster, stores: list[str], period: float = 0.05, first: int = 0
    ) -> None:
        self.stores = stores
        self.period = period
        self.writers = {
            s: ReconnectingPeer(cluster.ws_url, s, cluster.token(s), delay=0.2) for s in stores
        }
        self.listeners = {
            s: ReconnectingPeer(cluster.ws_url, s, cluster.token(s, scope="read"), delay=0.2)
            for s in stores
        }
        self.sent = dict.fromkeys(stores, first)
        """The number of the next patch of each store (numbers start at ``first``)."""
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Traffic:
        for peer in (*self.writers.values(), *self.listeners.values()):
            peer.start()
        async with asyncio.timeout(20):
            for peer in (*self.writers.values(), *self.listeners.values()):
                await peer.connected.wait()
        self._tasks = [asyncio.create_task(self._write(s)) for s in self.stores]
        return self

    async def _write(self, store_id: str) -> None:
        writer = self.writers[store_id]
        while not self._stop.is_set():
            if await writer.send(patch(store_id, self.sent[store_id])):
                self.sent[store_id] += 1
            await asyncio.sleep(self.period)

    async def stop_writing(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 10)

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(
            *(peer.stop() for peer in (*self.writers.values(), *self.listeners.values()))
        )

    def seen(self, store_id: str) -> set[int]:
        """Every patch number of ``store_id`` that any peer has received."""
        frames = self.writers[store_id].received + self.listeners[store_id].received
        return set(indexes(store_id, frames))

    async def wait_all_seen_beyond(self, marks: dict[str, int], timeout: float = 20.0) -> None:
        """Wait until every store's listener got a patch numbered above its mark (bounded)."""
        async with asyncio.timeout(timeout):
            while True:
                behind = [
                    s
                    for s in self.stores
                    if max(indexes(s, self.listeners[s].received), default=-1) <= marks[s]
                ]
                if not behind:
                    return
                await asyncio.sleep(0.1)


JOIN_ATTEMPTS = 10


async def joiner_patches(cluster: Cluster, store_id: str) -> list[int]:
    """What a fresh client of ``store_id`` receives through HAProxy on joining (catch-up).

    A 502/503 answer to the upgrade ("try again", e.g. while HAProxy has not yet
    noticed a stopped process, on a loaded machine) is retried, as clients do, a
    bounded number of times; any other refusal fails the test at once.
    """
    token = cluster.token(store_id, scope="read")
    for attempt in range(JOIN_ATTEMPTS):
        try:
            async with StoreClient(cluster.ws_url, store_id, token, bearer=True) as c:
                return indexes(store_id, await c.receive_all(window=1.0))
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status not in (502, 503) or attempt == JOIN_ATTEMPTS - 1:
                raise
            await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


async def check_nothing_lost(cluster: Cluster, traffic: Traffic) -> None:
    """Stop writing and let the last frames land; then every store's fresh joiner gets
    every patch any peer saw, in order, exactly once."""
    await traffic.stop_writing()
    await asyncio.sleep(0.5)
    joined = await asyncio.gather(*(joiner_patches(cluster, s) for s in traffic.stores))
    for store_id, got in zip(traffic.stores, joined, strict=True):
        assert got == sorted(set(got)), f"{store_id}: out of order or repeated: {got}"
        missing = traffic.seen(store_id) - set(got)
        assert not missing, f"{store_id}: peers saw {sorted(missing)} but a joiner does not get it"
        assert got, f"{store_id}: nothing stored"


def owners(cluster: Cluster) -> dict[str, str | None]:
    """The URL of the process holding each store (from the lock records, or the database)."""
    if cluster.database_url is not None:
        url = cluster.database_url
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            status = pool.submit(asyncio.run, database_status(url)).result(timeout=30)
    else:
        status = cluster_status(cluster.ownership_dir)
    return {store.store: process.url for process in status.processes for store in process.stores}


def forwarded_open(cluster: Cluster, index: int) -> float:
    """Connections process ``index`` holds open as a forwarded hop to another owner."""
    text = cluster.metrics(index)
    match = re.search(r"^sds_forwarded_connections(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
    assert match, "no sds_forwarded_connections gauge in /metrics"
    return float(match.group(1))


async def kill_and_bring_back(cluster: Cluster, traffic: Traffic, victim: int) -> None:
    """SIGKILL ``victim`` under traffic, wait until its stores are served elsewhere,
    restart it and wait until HAProxy routes to it again."""
    await traffic.wait_all_seen_beyond(dict.fromkeys(traffic.stores, 3))
    cluster.sigkill(victim)
    await cluster.wait_proxy_sees_async(victim, up=False)
    await traffic.wait_all_seen_beyond(dict(traffic.sent))
    await asyncio.to_thread(cluster.restart, victim)
    await cluster.wait_proxy_sees_async(victim, up=True)


async def routes_of(cluster: Cluster, stores: list[str]) -> dict[str, str]:
    """The URL of the process HAProxy routes each store's clients to."""
    return await asyncio.to_thread(
        lambda: {s: cluster.processes[cluster.routed_to(f"/ws/{s}")].http_url for s in stores}
    )


async def wait_served_where_routed(cluster: Cluster, routes: dict[str, str]) -> None:
    """Within 10 s every store is owned by the process HAProxy routes it to, and no
    process holds a forwarded connection (no permanent extra hop)."""
    back_at = time.monotonic()
    while True:
        held = owners(cluster)
        wrong = {s: held.get(s) for s in routes if held.get(s) != routes[s]}
        if not wrong or time.monotonic() - back_at > 10:
            break
        await asyncio.sleep(0.2)
    assert not wrong, f"not served where HAProxy routes them within 10 s: {wrong}"
    async with asyncio.timeout(10):
        while any(forwarded_open(cluster, i) for i in range(len(cluster.processes))):
            await asyncio.sleep(0.2)


@pytest.mark.parametrize("ownership", ["persist-dir", "database"])
async def test_never_split_with_round_robin_every_client_of_a_store_gets_every_frame(
    tmp_path: Path, request: pytest.FixtureRequest, ownership: str
) -> None:
    url = request.getfixturevalue("database_url") if ownership == "database" else None
    with Cluster(
        tmp_path, balance="roundrobin", database_url=url, database_ownership=url is not None
    ) as cluster:
        store_id = "shared-doc"
        clients = [
            StoreClient(cluster.ws_url, store_id, cluster.token(store_id, sub=f"u{i}"))
            for i in range(6)
        ]
        try:
            for client in clients:
                await client.connect()
            for i, client in enumerate(clients):
                await client.send(patch(store_id, i))
            for i, client in enumerate(clients):
                got: list[int] = []
                async with asyncio.timeout(15):
                    while len(got) < len(clients) - 1:
                        got += indexes(store_id, [await client.receive(timeout=None)])
                assert sorted(got) == [j for j in range(len(clients)) if j != i]
            # Round robin put two connections on each process: one owns the store and
            # serves its two directly, the other two forward their four to it.
            assert len(owners(cluster)) == 1
            assert sum(forwarded_open(cluster, i) for i in range(3)) == 4
        finally:
            for client in clients:
                await client.close()


async def test_failover_after_sigkill_every_store_is_served_again_and_nothing_seen_is_lost(
    any_cluster: Cluster,
) -> None:
    cluster = any_cluster
    stores = [f"doc-{i:02d}" for i in range(STORES)]
    routed = {s: cluster.routed_to(f"/ws/{s}") for s in stores}
    victim = 0
    assert any(index == victim for index in routed.values())
    async with Traffic(cluster, stores) as traffic:
        await traffic.wait_all_seen_beyond(dict.fromkeys(stores, 5))
        cluster.sigkill(victim)
        killed_at = time.monotonic()
        marks = dict(traffic.sent)
        await cluster.wait_proxy_sees_async(victim, up=False)
        # Served again: every store's listener gets patches written after the kill.
        await traffic.wait_all_seen_beyond(marks)
        served_again_after = time.monotonic() - killed_at
        await check_nothing_lost(cluster, traffic)
    assert served_again_after < 15
    moved = [s for s in stores if routed[s] == victim]
    assert moved and all(
        owners(cluster).get(s) != cluster.processes[victim].http_url for s in moved
    )


async def test_failback_stores_return_to_the_process_the_proxy_routes_them_to(
    any_cluster: Cluster,
) -> None:
    """HAProxy leaves open tunnels where they are when a process comes back: a store
    moves back when its clients come through the proxy again (here: they all reconnect)."""
    cluster = any_cluster
    stores = [f"doc-{i:02d}" for i in range(STORES)]
    victim = 1
    async with Traffic(cluster, stores) as traffic:
        await kill_and_bring_back(cluster, traffic, victim)
        # Back in the ring: a new client of every store is served at its first connect
        # (forwarded where the interim owner still has clients), and sees every patch.
        await check_nothing_lost(cluster, traffic)
    routes = await routes_of(cluster, stores)
    victim_url = cluster.processes[victim].http_url
    assert victim_url in routes.values()
    async with Traffic(cluster, stores, first=10**5) as again:
        await wait_served_where_routed(cluster, routes)
        await again.wait_all_seen_beyond(dict(again.sent))
        await check_nothing_lost(cluster, again)
        # No 503 loop: a client needed at most one reconnect (a handover's 1012).
        for peer in (*again.writers.values(), *again.listeners.values()):
            assert peer.connects <= 2, (peer.store_id, peer.close_codes, peer.failed_connects)
            assert not peer.failed_connects, (peer.store_id, peer.failed_connects)


async def test_failback_a_new_client_brings_each_store_back_with_its_old_clients(
    cluster: Cluster,
) -> None:
    """The interim owner of a killed process's store hands it back, old clients
    included, once a client of it comes through the restarted process."""
    stores = [f"doc-{i:02d}" for i in range(STORES)]
    victim = 2
    async with Traffic(cluster, stores) as traffic:
        await kill_and_bring_back(cluster, traffic, victim)
        routes = await routes_of(cluster, stores)
        victim_url = cluster.processes[victim].http_url
        assert victim_url in routes.values()
        newcomers = [
            ReconnectingPeer(cluster.ws_url, s, cluster.token(s, scope="read"), delay=0.2).start()
            for s in stores
        ]
        try:
            await wait_served_where_routed(cluster, routes)
            # The stores still relay to their old clients.
            await traffic.wait_all_seen_beyond(dict(traffic.sent))
            await check_nothing_lost(cluster, traffic)
        finally:
            await asyncio.gather(*(peer.stop() for peer in newcomers))
        # No 503 loop: first connect, one after the kill, one after the handover.
        for peer in (*traffic.writers.values(), *traffic.listeners.values(), *newcomers):
            assert peer.connects <= 3, (peer.store_id, peer.close_codes, peer.failed_connects)


async def test_sigterm_hands_stores_to_the_others_with_one_reconnect_and_nothing_lost(
    any_cluster: Cluster,
) -> None:
    cluster = any_cluster
    stores = [f"doc-{i:02d}" for i in range(STORES)]
    routed = {s: cluster.routed_to(f"/ws/{s}") for s in stores}
    victim = 2
    async with Traffic(cluster, stores) as traffic:
        await traffic.wait_all_seen_beyond(dict.fromkeys(stores, 3))
        assert await asyncio.to_thread(cluster.sigterm, victim) == 0
        await traffic.wait_all_seen_beyond(dict(traffic.sent))
        await check_nothing_lost(cluster, traffic)
        for store_id in stores:
            for peer in (traffic.writers[store_id], traffic.listeners[store_id]):
                expected = 2 if routed[store_id] == victim else 1
                assert peer.connects == expected, (
                    store_id,
                    peer.connects,
                    peer.close_codes,
                    peer.failed_connects,
                )


async def test_hung_process_resumed_serves_again_and_nothing_seen_is_lost(
    cluster: Cluster,
) -> None:
    """SIGSTOP: HAProxy takes the process out, but it keeps its stores' locks; after
    SIGCONT every store is served again (docs/scaling.md, failure table)."""
    stores = [f"doc-{i:02d}" for i in range(STORES)]
    victim = 0
    async with Traffic(cluster, stores) as traffic:
        await traffic.wait_all_seen_beyond(dict.fromkeys(stores, 3))
        cluster.sigstop(victim)
        await cluster.wait_proxy_sees_async(victim, up=False)
        marks = dict(traffic.sent)
        await asyncio.sleep(1.0)
        cluster.sigcont(victim)
        await cluster.wait_proxy_sees_async(victim, up=True)
        await traffic.wait_all_seen_beyond(marks, timeout=30)
        await check_nothing_lost(cluster, traffic)
