#!/usr/bin/env python3
"""Load generator for SDS relay servers: fan-out throughput, latency, connections, replay.

    python benchmarks/sds_bench.py SCENARIO --url ws://127.0.0.1:PORT --secret SECRET [options]

Scenarios: fanout, latency (fanout at a fixed rate), connect, replay. One JSON object per
run on stdout, a short summary on stderr. Works against any server that speaks the SDS
wire protocol (GET /ws/{store}?token=JWT, binary frames, byte 0 = type). Loopback only;
every loop is bounded in count and time, and a watchdog ends the run after --max-wall.
See docs/performance.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import math
import multiprocessing as mp
import os
import resource
import secrets
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableSequence, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp import WSMsgType

from sds.tokens import mint_token

PATCH = 0x01
PRESENCE = 0x04
MAGIC = b"SDSB"
# type, magic, run id, stream (store index), sequence number, send time (perf_counter_ns)
STAMP = struct.Struct("!B4sQIQq")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SECRET_ENV = "SDS_JWT_SECRET"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
TOOL_VERSION = 1


class UsageError(Exception):
    """A bad command line: exit code 2, message on stderr."""


# --- pure logic ------------------------------------------------------------------------


class Histogram:
    """Latency counts in microseconds: exact below 2048 us, then about 0.1 % wide buckets."""

    LINEAR = 2048
    SUB = 1024
    SIZE = LINEAR + 30 * SUB

    def __init__(self) -> None:
        self.counts = [0] * self.SIZE
        self.n = 0
        self.total = 0
        self.max = 0

    @classmethod
    def index(cls, us: int) -> int:
        if us < cls.LINEAR:
            return max(us, 0)
        e = min(us.bit_length() - 11, 30)
        return cls.LINEAR + (e - 1) * cls.SUB + min((us >> e) - cls.SUB, cls.SUB - 1)

    @classmethod
    def value(cls, idx: int) -> float:
        """The middle of a bucket, in microseconds."""
        if idx < cls.LINEAR:
            return float(idx)
        e = (idx - cls.LINEAR) // cls.SUB + 1
        m = (idx - cls.LINEAR) % cls.SUB + cls.SUB
        return (m << e) + (1 << e) / 2

    def add(self, us: int) -> None:
        self.counts[self.index(us)] += 1
        self.n += 1
        self.total += us
        if us > self.max:
            self.max = us

    def merge(self, other: Histogram) -> None:
        for i, c in enumerate(other.counts):
            if c:
                self.counts[i] += c
        self.n += other.n
        self.total += other.total
        self.max = max(self.max, other.max)

    def percentile(self, p: float) -> float | None:
        if self.n == 0:
            return None
        rank = max(1, math.ceil(self.n * p / 100))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return min(self.value(i), float(self.max))
        return float(self.max)

    def summary_ms(self) -> dict[str, Any]:
        def ms(us: float | None) -> float | None:
            return None if us is None else round(us / 1000, 3)

        return {
            "samples": self.n,
            "p50": ms(self.percentile(50)),
            "p90": ms(self.percentile(90)),
            "p99": ms(self.percentile(99)),
            "max": ms(float(self.max)) if self.n else None,
            "mean": ms(self.total / self.n) if self.n else None,
        }

    def to_wire(self) -> dict[str, Any]:
        return {
            "counts": {i: c for i, c in enumerate(self.counts) if c},
            "n": self.n,
            "total": self.total,
            "max": self.max,
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Histogram:
        h = cls()
        for i, c in wire["counts"].items():
            h.counts[int(i)] = c
        h.n, h.total, h.max = wire["n"], wire["total"], wire["max"]
        return h


@dataclass
class StreamStats:
    """What one receiver saw of its store's writer stream."""

    received: int = 0
    in_window: int = 0
    last_seq: int = -1
    gaps: int = 0
    out_of_order: int = 0
    cross_store: int = 0
    foreign: int = 0
    other: int = 0
    presence: int = 0

    def add(self, other: StreamStats) -> None:
        for name in self.__dataclass_fields__:
            if name != "last_seq":
                setattr(self, name, getattr(self, name) + getattr(other, name))


def stamp_frame(buf: bytearray, run_id: int, stream: int, seq: int) -> bytes:
    """A PATCH frame of len(buf) bytes carrying run id, stream, sequence and send time."""
    STAMP.pack_into(buf, 0, PATCH, MAGIC, run_id, stream, seq, time.perf_counter_ns())
    return bytes(buf)


def probe_frame(run_id: int, stream: int) -> bytes:
    """A PRESENCE frame the readiness barrier sends until every receiver has seen one."""
    body = json.dumps({"bench": f"{run_id:016x}", "stream": stream}).encode()
    return bytes([PRESENCE]) + body


def check_loopback(url: str) -> str:
    """The URL without a trailing slash, or UsageError unless it is ws:// on loopback."""
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise UsageError(f"--url must start with ws:// (got {parts.scheme or 'nothing'}://)")
    if parts.hostname not in LOOPBACK:
        raise UsageError(
            f"refusing to load {parts.hostname!r}: only loopback servers "
            f"({', '.join(LOOPBACK)}) may be benchmarked"
        )
    return url.rstrip("/")


def store_url(base: str, path: str, store_id: str, token: str) -> str:
    return f"{base}{path}{quote(store_id, safe='')}?token={token}"


def failure_reason(exc: BaseException) -> str:
    """A short reason for a failed connect; never the URL (it carries the token)."""
    if isinstance(exc, aiohttp.WSServerHandshakeError | HandshakeFailed):
        return f"http_{exc.status}"
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"os_{exc.errno}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connect_{exc.os_error.errno}"
    return type(exc).__name__


# --- process and machine figures from /proc --------------------------------------------


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process in clock ticks, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KIB
    except (OSError, IndexError, ValueError):
        return None


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine since boot."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    total = sum(values[:8])
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return total - idle, total


@dataclass
class CpuSnapshot:
    at: float
    server: int | None
    generator: int
    machine_busy: int
    machine_total: int


class CpuMeter:
    """CPU use of the server, of this load generator (all its processes) and of the rest."""

    def __init__(self, server_pid: int | None, generator_pids: Sequence[int]) -> None:
        self.server_pid = server_pid
        self.generator_pids = list(generator_pids)

    def snapshot(self) -> CpuSnapshot:
        server = cpu_ticks(self.server_pid) if self.server_pid else None
        gen = sum(t or 0 for t in (cpu_ticks(p) for p in self.generator_pids))
        busy, total = machine_ticks()
        return CpuSnapshot(time.perf_counter(), server, gen, busy, total)

    @staticmethod
    def report(a: CpuSnapshot, b: CpuSnapshot) -> dict[str, Any]:
        """Percentages of one core (100 = one core busy) over the interval a..b."""
        secs = max(b.at - a.at, 1e-9)

        def pct(ticks: float) -> float:
            return round(100 * ticks / CLK_TCK / secs, 1)

        server = None if a.server is None or b.server is None else b.server - a.server
        gen = b.generator - a.generator
        busy = b.machine_busy - a.machine_busy
        other = max(0, busy - gen - (server or 0))
        return {
            "seconds": round(secs, 3),
            "server_pct": None if server is None else pct(server),
            "server_cpu_s": None if server is None else round(server / CLK_TCK, 3),
            "generator_pct": pct(gen),
            "machine_busy_pct": pct(busy),
            "other_pct": pct(other),
            "cpus": os.cpu_count(),
        }


class RssSampler:
    """Samples the server's RSS every 100 ms while running; keeps the peak."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.peak: int | None = None
        self._task: asyncio.Task[None] | None = None

    def read(self) -> int | None:
        value = rss_kib(self.pid) if self.pid else None
        if value is not None and (self.peak is None or value > self.peak):
            self.peak = value
        return value

    def start(self) -> None:
        if self.pid:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        for _ in range(100_000):
            self.read()
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# --- connecting ------------------------------------------------------------------------


def new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))


async def open_ws(
    session: aiohttp.ClientSession, url: str, timeout: float
) -> aiohttp.ClientWebSocketResponse:
    return await asyncio.wait_for(
        session.ws_connect(
            url,
            autoping=True,
            heartbeat=None,
            max_msg_size=0,
            compress=0,
            timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
        ),
        timeout,
    )


async def open_many(
    session: aiohttp.ClientSession,
    urls: Sequence[str],
    concurrency: int,
    timeout: float,
    on_open: Callable[[int, aiohttp.ClientWebSocketResponse], None] | None = None,
) -> tuple[list[aiohttp.ClientWebSocketResponse | None], Counter[str], list[float]]:
    """Open every URL, at most `concurrency` at a time; (sockets or None, failures, ms each)."""
    sem = asyncio.Semaphore(max(1, concurrency))
    result: list[aiohttp.ClientWebSocketResponse | None] = [None] * len(urls)
    failures: Counter[str] = Counter()
    times: list[float] = []

    async def one(i: int) -> None:
        async with sem:
            t = time.perf_counter()
            try:
                ws = await open_ws(session, urls[i], timeout)
            except Exception as exc:
                failures[failure_reason(exc)] += 1
                return
            times.append((time.perf_counter() - t) * 1000)
            result[i] = ws
            if on_open is not None:
                on_open(i, ws)

    await asyncio.gather(*(one(i) for i in range(len(urls))))
    return result, failures, times


async def close_all(sockets: Sequence[aiohttp.ClientWebSocketResponse | None]) -> None:
    async def one(ws: aiohttp.ClientWebSocketResponse) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 3)

    await asyncio.gather(*(one(ws) for ws in sockets if ws is not None))


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- receiving -------------------------------------------------------------------------


async def receive_stream(
    ws: aiohttp.ClientWebSocketResponse,
    *,
    run_id: int,
    stream: int,
    slot: int,
    acks: MutableSequence[int],
    ready: MutableSequence[int],
    times: Sequence[int],
    hist: Histogram,
    stats: StreamStats,
) -> None:
    """Read one receiver's socket until it closes: check order, stamp latency, ack progress."""
    perf = time.perf_counter_ns
    unpack = STAMP.unpack_from
    size = STAMP.size
    last = -1
    while True:
        msg = await ws.receive()
        if msg.type is not WSMsgType.BINARY:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR):
                break
            continue
        data: bytes = msg.data
        now = perf()
        kind = data[0] if data else -1
        if kind == PATCH and len(data) >= size:
            _, magic, rid, src, seq, sent = unpack(data)
            if magic != MAGIC or rid != run_id:
                stats.foreign += 1
                continue
            if src != stream:
                stats.cross_store += 1
                continue
            stats.received += 1
            if seq == last + 1:
                last = seq
            elif seq > last:
                stats.gaps += seq - last - 1
                last = seq
            else:
                stats.out_of_order += 1
                continue
            acks[slot] = last
            hist.add((now - sent) // 1000)
            end = times[1]
            if end == 0 or now <= end:
                stats.in_window += 1
        elif kind == PRESENCE:
            stats.presence += 1
            ready[slot] = 1
        else:
            stats.other += 1
    stats.last_seq = last


class HandshakeFailed(Exception):
    """The server answered the upgrade with something other than 101."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class RawReceiver(asyncio.Protocol):
    """A receive-only WebSocket client that checks stamps straight from the socket buffer.

    aiohttp's client costs several microseconds per message (a message object, a queue, a
    future), which made the load generator, not the server, the bottleneck at fan-out
    rates. This parses the frames of one read in a loop and reads the stamp in place. It
    sends only what the protocol requires of a client: pongs and a close, masked.
    """

    def __init__(
        self,
        request: bytes,
        key: bytes,
        *,
        run_id: int,
        stream: int,
        slot: int,
        acks: MutableSequence[int],
        ready: MutableSequence[int],
        times: Sequence[int],
        hist: Histogram,
        stats: StreamStats,
    ) -> None:
        self.request = request
        self.accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        self.run_id, self.stream, self.slot = run_id, stream, slot
        self.acks, self.ready, self.times = acks, ready, times
        self.hist, self.stats = hist, stats
        self.buf = bytearray()
        self.upgraded = False
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.last = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionResetError("closed during handshake"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded and not self._handshake():
            return
        now = time.perf_counter_ns()
        stats = self.stats
        unpack = STAMP.unpack_from
        size = STAMP.size
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, ln = buf[pos], buf[pos + 1] & 0x7F
            start = pos + 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln, start = (buf[pos + 2] << 8) | buf[pos + 3], pos + 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln, start = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
            end = start + ln
            if end > n:
                break
            pos = end
            opcode = b0 & 0x0F
            if opcode != 2 or not b0 & 0x80:
                self._control(opcode, bytes(buf[start:end]))
                continue
            kind = buf[start] if ln else -1
            if kind == PATCH and ln >= size:
                _, magic, rid, src, seq, sent = unpack(buf, start)
                if magic != MAGIC or rid != self.run_id:
                    stats.foreign += 1
                    continue
                if src != self.stream:
                    stats.cross_store += 1
                    continue
                stats.received += 1
                last = self.last
                if seq == last + 1:
                    self.last = seq
                elif seq > last:
                    stats.gaps += seq - last - 1
                    self.last = seq
                else:
                    stats.out_of_order += 1
                    continue
                self.hist.add((now - sent) // 1000)
                window_end = self.times[1]
                if window_end == 0 or now <= window_end:
                    stats.in_window += 1
            elif kind == PRESENCE:
                stats.presence += 1
                self.ready[self.slot] = 1
            else:
                stats.other += 1
        if self.last >= 0:
            self.acks[self.slot] = self.last
            stats.last_seq = self.last
        del buf[:pos]

    def _handshake(self) -> bool:
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0:
            if len(self.buf) > 65536 and not self.opened.done():
                self.opened.set_exception(HandshakeFailed(0))
            return False
        head = bytes(self.buf[:head_end]).split(b"\r\n")
        del self.buf[: head_end + 4]
        parts = head[0].split()
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in head[1:])
        }
        if status != 101 or headers.get(b"sec-websocket-accept") != self.accept:
            if not self.opened.done():
                self.opened.set_exception(HandshakeFailed(status))
            if self.transport is not None:
                self.transport.close()
            return False
        self.upgraded = True
        self.opened.set_result(None)
        return True

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x9:
            self._send(0xA, payload)
        elif opcode == 0x8:
            self._send(0x8, payload[:2])
            if self.transport is not None:
                self.transport.close()
        else:
            # text, fragments (the relay never fragments) and unsolicited pongs
            self.stats.other += 1

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    async def close(self) -> None:
        self._send(0x8, (1000).to_bytes(2, "big"))
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.lost), 2)
        if self.transport is not None:
            self.transport.abort()


async def open_raw(url: str, timeout: float, **receiver: Any) -> RawReceiver:
    """Connect a RawReceiver to a ws:// URL and finish the upgrade within `timeout`."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    key = base64.b64encode(os.urandom(16))
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()

    async def connect() -> RawReceiver:
        _, proto = await loop.create_connection(
            lambda: RawReceiver(request, key, **receiver), host, port
        )
        try:
            await proto.opened
        except BaseException:
            if proto.transport is not None:
                proto.transport.abort()
            raise
        return proto

    return await asyncio.wait_for(connect(), timeout)


@dataclass
class Receivers:
    """A group of receivers in one event loop (a worker process, or the coordinator)."""

    run_id: int
    acks: MutableSequence[int]
    ready: MutableSequence[int]
    times: MutableSequence[int]
    hist: Histogram = field(default_factory=Histogram)
    stats: dict[int, StreamStats] = field(default_factory=dict)
    raw: bool = True
    sockets: list[aiohttp.ClientWebSocketResponse | None] = field(default_factory=list)
    raw_sockets: list[RawReceiver] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def connect(
        self,
        session: aiohttp.ClientSession,
        members: Sequence[tuple[int, int, str]],
        concurrency: int,
        timeout: float,
    ) -> Counter[str]:
        """Connect (slot, stream, url) members and start reading each as soon as it is open."""

        def start(i: int, ws: aiohttp.ClientWebSocketResponse) -> None:
            slot, stream, _ = members[i]
            stats = self.stats.setdefault(slot, StreamStats())
            self.tasks.append(
                asyncio.create_task(
                    receive_stream(
                        ws,
                        run_id=self.run_id,
                        stream=stream,
                        slot=slot,
                        acks=self.acks,
                        ready=self.ready,
                        times=self.times,
                        hist=self.hist,
                        stats=stats,
                    )
                )
            )

        if not self.raw:
            self.sockets, failures, _ = await open_many(
                session, [m[2] for m in members], concurrency, timeout, start
            )
            return failures
        sem = asyncio.Semaphore(max(1, concurrency))
        failures = Counter[str]()

        async def one(slot: int, stream: int, url: str) -> None:
            async with sem:
                try:
                    proto = await open_raw(
                        url,
                        timeout,
                        run_id=self.run_id,
                        stream=stream,
                        slot=slot,
                        acks=self.acks,
                        ready=self.ready,
                        times=self.times,
                        hist=self.hist,
                        stats=self.stats.setdefault(slot, StreamStats()),
                    )
                except Exception as exc:
                    failures[failure_reason(exc)] += 1
                    return
                self.raw_sockets.append(proto)

        await asyncio.gather(*(one(*m) for m in members))
        return failures

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.raw_sockets))
        await close_all(self.sockets)
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=5)
            for task in pending:
                task.cancel()

    def result(self) -> dict[str, Any]:
        total = StreamStats()
        for s in self.stats.values():
            total.add(s)
        return {
            "stats": total.__dict__,
            "last_seq": {slot: s.last_seq for slot, s in self.stats.items()},
            "hist": self.hist.to_wire(),
        }


def worker_main(
    conn: Connection,
    spec: dict[str, Any],
    acks: MutableSequence[int],
    ready: MutableSequence[int],
    times: MutableSequence[int],
) -> None:
    """A receiver worker process: connect, report, read until told to finish, report stats."""
    use_uvloop(spec["uvloop"])
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_worker(conn, spec, acks, ready, times))


async def _worker(
    conn: Connection,
    spec: dict[str, Any],
    acks: MutableSequence[int],
    ready: MutableSequence[int],
    times: MutableSequence[int],
) -> None:
    raise_fd_limit()
    deadline = time.monotonic() + spec["max_wall"]
    group = Receivers(spec["run_id"], acks, ready, times, raw=spec["raw"])
    async with new_session() as session:
        failures = await group.connect(
            session, spec["members"], spec["concurrency"], spec["connect_timeout"]
        )
        conn.send(("connected", dict(failures)))
        loop = asyncio.get_running_loop()
        while time.monotonic() < deadline:
            ready_to_read = await loop.run_in_executor(None, conn.poll, 0.2)
            if ready_to_read:
                conn.recv()
                break
        await group.close()
    conn.send(("result", group.result()))


# --- writing ---------------------------------------------------------------------------


@dataclass
class Writer:
    """The one writer of a store: stamped PATCH frames, at a fixed rate or window-limited."""

    ws: aiohttp.ClientWebSocketResponse
    run_id: int
    stream: int
    slots: range
    frame_bytes: int
    sent: int = 0
    echoed: int = 0
    other: int = 0
    behind_ms: float = 0.0
    reader: asyncio.Task[None] | None = None

    def start_reader(self) -> None:
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        """The writer must never get its own frames back (relay rule); count any that come."""
        while True:
            msg = await self.ws.receive()
            if msg.type is WSMsgType.BINARY:
                data: bytes = msg.data
                if len(data) >= STAMP.size and data[0] == PATCH:
                    _, magic, rid, src, _, _ = STAMP.unpack_from(data)
                    if magic == MAGIC and rid == self.run_id and src == self.stream:
                        self.echoed += 1
                        continue
                self.other += 1
            elif msg.type in (
                WSMsgType.CLOSE,
                WSMsgType.CLOSED,
                WSMsgType.CLOSING,
                WSMsgType.ERROR,
            ):
                return

    async def run(
        self,
        *,
        end_ns: int,
        rate: float | None,
        window: int,
        acks: Sequence[int],
    ) -> None:
        buf = bytearray(self.frame_bytes)
        perf = time.perf_counter_ns
        send = self.ws.send_bytes
        if rate:
            interval = 1e9 / rate
            start = perf()
            for _ in range(10**9):
                now = perf()
                if now >= end_ns:
                    break
                due = start + int(self.sent * interval)
                if due > now:
                    await asyncio.sleep(min(due, end_ns) / 1e9 - now / 1e9)
                    continue
                self.behind_ms = max(self.behind_ms, (now - due) / 1e6)
                await send(stamp_frame(buf, self.run_id, self.stream, self.sent))
                self.sent += 1
            return
        lo, hi = self.slots.start, self.slots.stop
        floor = -1
        for _ in range(10**10):
            if self.sent - floor > window:
                floor = min(acks[lo:hi]) if hi > lo else self.sent
                if self.sent - floor > window:
                    if perf() >= end_ns:
                        break
                    # no cheap cross-process wake-up exists; poll the receivers' acks
                    await asyncio.sleep(0.0005)
                    continue
            if perf() >= end_ns:
                break
            await send(stamp_frame(buf, self.run_id, self.stream, self.sent))
            self.sent += 1
            if self.sent & 63 == 0:
                await asyncio.sleep(0)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 3)
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader


async def readiness_barrier(writers: Sequence[Writer], ready: Sequence[int], timeout: float) -> int:
    """Send PRESENCE probes until every receiver saw one; the number still not ready."""
    deadline = time.monotonic() + timeout
    waiting = list(writers)
    while waiting and time.monotonic() < deadline:
        for w in waiting:
            with contextlib.suppress(Exception):
                await w.ws.send_bytes(probe_frame(w.run_id, w.stream))
        await asyncio.sleep(0.05)
        waiting = [w for w in waiting if not all(ready[s] for s in w.slots)]
    return sum(1 for w in waiting for s in w.slots if not ready[s])


# --- catch-up (replay) -----------------------------------------------------------------


async def catch_up(
    session: aiohttp.ClientSession,
    url: str,
    *,
    run_id: int,
    stream: int,
    expected: int,
    timeout: float,
    quiet: float,
) -> dict[str, Any]:
    """A fresh client joins; it must get the stream's `expected` patches in order, once."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "expected": expected,
        "replayed": 0,
        "duplicates": 0,
        "out_of_order": 0,
        "gaps": 0,
        "other_frames": 0,
        "seconds": None,
        "error": None,
    }
    try:
        ws = await open_ws(session, url, timeout)
    except Exception as exc:
        out["error"] = failure_reason(exc)
        return out
    last = -1
    deadline = t0 + timeout
    done_at: float | None = None
    try:
        for _ in range(expected * 4 + 100_000):
            now = time.perf_counter()
            limit = (done_at + quiet) if done_at is not None else deadline
            if now >= limit:
                break
            try:
                msg = await asyncio.wait_for(ws.receive(), limit - now)
            except TimeoutError:
                break
            if msg.type is not WSMsgType.BINARY:
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
                continue
            data: bytes = msg.data
            if len(data) < STAMP.size or data[0] != PATCH:
                out["other_frames"] += 1
                continue
            _, magic, rid, src, seq, _ = STAMP.unpack_from(data)
            if magic != MAGIC or rid != run_id or src != stream:
                out["other_frames"] += 1
                continue
            if seq == last + 1:
                out["replayed"] += 1
                last = seq
            elif seq > last:
                out["replayed"] += 1
                out["gaps"] += seq - last - 1
                last = seq
            elif seq == last:
                out["duplicates"] += 1
            else:
                out["out_of_order"] += 1
            if out["replayed"] >= expected and done_at is None:
                done_at = time.perf_counter()
                out["seconds"] = round(done_at - t0, 3)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 3)
    out["complete"] = (
        out["replayed"] == expected
        and out["gaps"] == 0
        and out["duplicates"] == 0
        and out["out_of_order"] == 0
    )
    return out


async def replay_writers(
    session: aiohttp.ClientSession,
    env: Env,
    writers: Sequence[Writer],
    timeout: float,
    *,
    concurrent: bool,
) -> dict[str, Any]:
    """A fresh read client per writer's store must get back every frame that writer sent."""

    def one(w: Writer) -> Any:
        return catch_up(
            session,
            env.url_for(env.store_id(w.stream), "read", "replay"),
            run_id=env.run_id,
            stream=w.stream,
            expected=w.sent,
            timeout=timeout,
            quiet=0.3,
        )

    if concurrent:
        parts = list(await asyncio.gather(*(one(w) for w in writers)))
    else:
        parts = [await one(w) for w in writers]
    return merge_replays(parts)


def merge_replays(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"stores": len(parts)}
    for key in ("expected", "replayed", "duplicates", "out_of_order", "gaps", "other_frames"):
        total[key] = sum(p[key] for p in parts)
    seconds = [p["seconds"] for p in parts if p["seconds"] is not None]
    total["seconds_max"] = max(seconds) if seconds else None
    total["frames_per_s"] = (
        round(total["replayed"] / max(seconds), 1) if seconds and max(seconds) > 0 else None
    )
    total["errors"] = dict(Counter(p["error"] for p in parts if p["error"]))
    total["complete"] = all(p["complete"] for p in parts) and bool(parts)
    return total


# --- scenarios -------------------------------------------------------------------------


@dataclass
class Env:
    """What every scenario needs: where the server is, how to sign tokens, what to report."""

    url: str
    path: str
    secret: str
    issuer: str | None
    server_pid: int | None
    label: str | None
    run_id: int = field(default_factory=lambda: secrets.randbits(63))

    def store_id(self, i: int) -> str:
        return f"bench-{self.run_id:016x}-{i}"

    def url_for(self, store: str, scope: str = "write", sub: str = "bench") -> str:
        token = mint_token(self.secret, store_id=store, scope=scope, sub=sub, issuer=self.issuer)
        return store_url(self.url, self.path, store, token)


def default_procs() -> int:
    """Receiver processes: one per CPU we may use minus one, none when pinned to one CPU.

    On one CPU a worker process only adds context switches and cross-process polling:
    measured 123-143 k deliveries/s with one worker against 255-381 k in-process.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, (cpus or 1) - 1)


async def fanout(env: Env, a: argparse.Namespace) -> dict[str, Any]:
    """S stores x (1 writer + C-1 receivers); throughput, order, loss and latency."""
    if a.clients < 2:
        raise UsageError("--clients must be at least 2 (one writer and one receiver)")
    if a.bytes < STAMP.size:
        raise UsageError(f"--bytes must be at least {STAMP.size} (the stamp)")
    rate = None if a.rate in (None, "max", "0", 0) else float(a.rate)
    per_store = a.clients - 1
    n_recv = a.stores * per_store
    procs = default_procs() if a.procs is None else a.procs
    procs = min(procs, n_recv)
    slot_store = [slot // per_store for slot in range(n_recv)]
    members = [
        (slot, slot_store[slot], env.url_for(env.store_id(slot_store[slot]), "read", f"r{slot}"))
        for slot in range(n_recv)
    ]
    rss = RssSampler(env.server_pid)
    rss_before = rss.read()
    errors: list[str] = []

    ctx = mp.get_context("spawn")
    acks: MutableSequence[int]
    ready: MutableSequence[int]
    times: MutableSequence[int]
    workers: list[tuple[Any, Connection]] = []
    local: Receivers | None = None
    if procs > 0:
        acks = ctx.RawArray("q", [-1] * n_recv)
        ready = ctx.RawArray("b", n_recv)
        times = ctx.RawArray("q", 2)
        for p in range(procs):
            parent, child = ctx.Pipe()
            spec = {
                "run_id": env.run_id,
                "members": members[p::procs],
                "concurrency": a.connect_concurrency,
                "connect_timeout": a.connect_timeout,
                "max_wall": a.max_wall,
                "uvloop": not a.no_uvloop,
                "raw": a.receiver == "raw",
            }
            proc = ctx.Process(
                target=worker_main, args=(child, spec, acks, ready, times), daemon=True
            )
            proc.start()
            workers.append((proc, parent))
    else:
        acks, ready, times = [-1] * n_recv, [0] * n_recv, [0, 0]
    _WATCHED_PROCS.extend(proc for proc, _ in workers)

    async def from_worker(conn: Connection, kind: str, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(None, conn.poll, timeout)
        if not ok:
            raise RuntimeError(f"a worker sent no {kind!r} within {timeout:.0f}s")
        got, payload = conn.recv()
        if got != kind:
            raise RuntimeError(f"a worker sent {got!r}, expected {kind!r}")
        return payload

    failures: Counter[str] = Counter()
    writers: list[Writer] = []
    async with new_session() as session:
        t_conn = time.perf_counter()
        if workers:
            for _, conn in workers:
                failures.update(await from_worker(conn, "connected", a.connect_timeout + 60))
        else:
            local = Receivers(env.run_id, acks, ready, times, raw=a.receiver == "raw")
            failures.update(
                await local.connect(session, members, a.connect_concurrency, a.connect_timeout)
            )
        urls = [env.url_for(env.store_id(s), "write", f"w{s}") for s in range(a.stores)]
        sockets, wfail, _ = await open_many(session, urls, a.connect_concurrency, a.connect_timeout)
        failures.update(wfail)
        for s, ws in enumerate(sockets):
            if ws is None:
                continue
            w = Writer(ws, env.run_id, s, range(s * per_store, (s + 1) * per_store), a.bytes)
            w.start_reader()
            writers.append(w)
        connect_s = time.perf_counter() - t_conn
        not_ready = await readiness_barrier(writers, ready, a.ready_timeout)
        if not_ready:
            errors.append(f"{not_ready} receivers saw no readiness probe")

        meter = CpuMeter(env.server_pid, [os.getpid(), *(p.pid for p, _ in workers if p.pid)])
        rss.start()
        t0 = time.perf_counter_ns()
        end_ns = t0 + int(a.duration * 1e9)
        times[0], times[1] = t0, end_ns
        cpu0 = meter.snapshot()
        runs = [
            asyncio.create_task(w.run(end_ns=end_ns, rate=rate, window=a.window, acks=acks))
            for w in writers
        ]
        await asyncio.sleep(max(0.0, (end_ns - time.perf_counter_ns()) / 1e9))
        cpu1 = meter.snapshot()
        done, pending = await asyncio.wait(runs, timeout=10)
        for task in pending:
            task.cancel()
            errors.append("a writer did not stop in time")
        for task in done:
            if task.exception() is not None:
                errors.append(f"writer failed: {type(task.exception()).__name__}")

        # drain: until every receiver has the last frame of its store, bounded
        t_drain = time.perf_counter()
        while time.perf_counter() - t_drain < a.drain:
            if all(
                acks[slot] >= writers_sent(writers, slot_store[slot]) - 1 for slot in range(n_recv)
            ):
                break
            await asyncio.sleep(0.02)
        drain_s = time.perf_counter() - t_drain

        hist = Histogram()
        stats = StreamStats()
        if workers:
            for _, conn in workers:
                conn.send(("finish",))
            for _, conn in workers:
                part = await from_worker(conn, "result", 30)
                hist.merge(Histogram.from_wire(part["hist"]))
                stats.add(StreamStats(**part["stats"]))
            for proc, _ in workers:
                proc.join(5)
        elif local is not None:
            await local.close()
            part = local.result()
            hist, stats = local.hist, StreamStats(**part["stats"])
        for w in writers:
            await w.close()
        await rss.stop()
        rss_peak = rss.peak
        await asyncio.sleep(0.5 if env.server_pid else 0)
        rss_after = rss.read()

        replay = None
        if a.replay_check:
            replay = await replay_writers(session, env, writers, a.replay_timeout, concurrent=False)

    cpu = CpuMeter.report(cpu0, cpu1)
    secs = cpu["seconds"]
    sent = sum(w.sent for w in writers)
    expected = sum(w.sent for w in writers) * per_store
    unique = stats.received - stats.out_of_order
    lost = max(0, expected - unique)
    dps = stats.in_window / secs
    server_pct = cpu["server_pct"]
    gen_cores = min(procs + 1, len(os.sched_getaffinity(0)))
    result: dict[str, Any] = {
        "scenario": a.scenario,
        "params": {
            "stores": a.stores,
            "clients_per_store": a.clients,
            "frame_bytes": a.bytes,
            "rate_per_writer": "max" if rate is None else rate,
            "window": a.window if rate is None else None,
            "duration": a.duration,
            "procs": procs,
            "replay_check": bool(a.replay_check),
            "receiver": a.receiver,
        },
        "connections": {
            "wanted": n_recv + a.stores,
            "opened": n_recv + a.stores - sum(failures.values()),
            "failures": dict(failures),
            "seconds": round(connect_s, 3),
        },
        "not_ready": not_ready,
        "sent": sent,
        "sent_per_s": round(sent / secs, 1),
        "deliveries": stats.in_window,
        "deliveries_per_s": round(dps, 1),
        "mib_per_s": round(dps * a.bytes / 2**20, 2),
        "delivered_total": stats.received,
        "expected_total": expected,
        "lost": lost,
        "gaps": stats.gaps,
        "out_of_order": stats.out_of_order,
        "echoed": sum(w.echoed for w in writers),
        "cross_store": stats.cross_store,
        "foreign": stats.foreign,
        "other_frames": stats.other + sum(w.other for w in writers),
        "writer_behind_ms_max": round(max((w.behind_ms for w in writers), default=0.0), 3),
        "drain_s": round(drain_s, 3),
        "latency_ms": hist.summary_ms(),
        "server": {
            "pid": env.server_pid,
            "cpu_pct": server_pct,
            "efficiency": round(dps / (server_pct / 100)) if server_pct else None,
            "rss_kib": {"before": rss_before, "peak": rss_peak, "after": rss_after},
        },
        "generator": {
            "cpu_pct": cpu["generator_pct"],
            "procs": procs + 1,
            "cores_available": gen_cores,
            "saturated": cpu["generator_pct"] >= 85 * gen_cores if gen_cores else False,
        },
        "machine": {k: cpu[k] for k in ("cpus", "machine_busy_pct", "other_pct")},
        "errors": errors,
    }
    if replay is not None:
        result["replay"] = replay
    return result


def writers_sent(writers: Sequence[Writer], stream: int) -> int:
    for w in writers:
        if w.stream == stream:
            return w.sent
    return 0


async def connect(env: Env, a: argparse.Namespace) -> dict[str, Any]:
    """N idle connections over S stores: accept rate, failures, server RSS per connection."""
    raise_fd_limit()
    stores = max(1, a.stores)
    urls_by_store = [env.url_for(env.store_id(s), "read", "idle") for s in range(stores)]
    warm_urls = [env.url_for(f"bench-{env.run_id:016x}-warm{i % 10}", "read") for i in range(50)]
    rss = RssSampler(env.server_pid)
    async with new_session() as session:
        rss_start = rss.read()
        warm, _, _ = await open_many(session, warm_urls[: min(50, a.connections)], 50, 10)
        await close_all(warm)
        await asyncio.sleep(0.5)
        baseline = rss.read()
        meter = CpuMeter(env.server_pid, [os.getpid()])
        cpu0 = meter.snapshot()
        t0 = time.perf_counter()
        urls = [urls_by_store[i % stores] for i in range(a.connections)]
        sockets, failures, ms = await open_many(session, urls, a.concurrency, a.connect_timeout)
        open_s = time.perf_counter() - t0
        cpu1 = meter.snapshot()
        accepted = sum(1 for ws in sockets if ws is not None)
        rss.start()
        await asyncio.sleep(a.hold)
        held = rss.read()
        still_open = sum(1 for ws in sockets if ws is not None and not ws.closed)
        await rss.stop()
        peak = rss.peak
        await close_all(sockets)
        await asyncio.sleep(0.5)
        after = rss.read()
    ms.sort()
    cpu = CpuMeter.report(cpu0, cpu1)
    growth = None if held is None or baseline is None else held - baseline
    return {
        "scenario": "connect",
        "params": {
            "connections": a.connections,
            "concurrency": a.concurrency,
            "stores": stores,
            "hold": a.hold,
        },
        "accepted": accepted,
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "still_open_after_hold": still_open,
        "seconds": round(open_s, 3),
        "accepted_per_s": round(accepted / open_s, 1) if open_s > 0 else None,
        "handshake_ms": {
            "p50": round(ms[len(ms) // 2], 3) if ms else None,
            "p99": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3) if ms else None,
            "max": round(ms[-1], 3) if ms else None,
        },
        "server": {
            "pid": env.server_pid,
            "cpu_pct": cpu["server_pct"],
            "rss_kib": {
                "start": rss_start,
                "baseline": baseline,
                "held": held,
                "peak": peak,
                "after": after,
            },
            "bytes_per_idle_connection": round(growth * 1024 / accepted)
            if growth is not None and accepted
            else None,
        },
        "generator": {"cpu_pct": cpu["generator_pct"], "procs": 1},
        "machine": {k: cpu[k] for k in ("cpus", "machine_busy_pct", "other_pct")},
        "errors": [],
    }


async def replay(env: Env, a: argparse.Namespace) -> dict[str, Any]:
    """Write N patches per store (a witness confirms each), then a fresh client catches up."""
    if a.bytes < STAMP.size:
        raise UsageError(f"--bytes must be at least {STAMP.size} (the stamp)")
    errors: list[str] = []
    acks = [-1] * a.stores
    ready = [0] * a.stores
    times = [0, 0]
    async with new_session() as session:
        witnesses = Receivers(env.run_id, acks, ready, times)
        members = [(s, s, env.url_for(env.store_id(s), "read", "witness")) for s in range(a.stores)]
        failures = await witnesses.connect(session, members, 50, a.connect_timeout)
        urls = [env.url_for(env.store_id(s), "write", f"w{s}") for s in range(a.stores)]
        sockets, wfail, _ = await open_many(session, urls, 50, a.connect_timeout)
        failures.update(wfail)
        writers = [
            Writer(ws, env.run_id, s, range(s, s + 1), a.bytes)
            for s, ws in enumerate(sockets)
            if ws is not None
        ]
        for w in writers:
            w.start_reader()
        not_ready = await readiness_barrier(writers, ready, a.ready_timeout)
        t0 = time.perf_counter()
        end_ns = time.perf_counter_ns() + int(a.max_wall * 1e9)

        async def write_n(w: Writer) -> None:
            # the window bounds the frames in flight; stop after exactly N
            buf = bytearray(w.frame_bytes)
            for _ in range(a.patches * 1000):
                if w.sent >= a.patches or time.perf_counter_ns() >= end_ns:
                    return
                if w.sent - acks[w.stream] > a.window:
                    await asyncio.sleep(0.0005)
                    continue
                await w.ws.send_bytes(stamp_frame(buf, w.run_id, w.stream, w.sent))
                w.sent += 1

        await asyncio.gather(*(write_n(w) for w in writers))
        deadline = time.perf_counter() + a.replay_timeout
        while time.perf_counter() < deadline and any(acks[w.stream] < w.sent - 1 for w in writers):
            await asyncio.sleep(0.01)
        write_s = time.perf_counter() - t0
        if any(acks[w.stream] < w.sent - 1 for w in writers):
            errors.append("the witness did not see every patch")
        for w in writers:
            await w.close()
        await witnesses.close()
        await asyncio.sleep(a.pause)
        total = await replay_writers(session, env, writers, a.replay_timeout, concurrent=True)
    return {
        "scenario": "replay",
        "params": {
            "stores": a.stores,
            "patches": a.patches,
            "frame_bytes": a.bytes,
            "window": a.window,
        },
        "connections": {"failures": dict(failures)},
        "not_ready": not_ready,
        "written": sum(w.sent for w in writers),
        "write_s": round(write_s, 3),
        "writes_per_s": round(sum(w.sent for w in writers) / write_s, 1) if write_s else None,
        "replay": total,
        "complete": total["complete"],
        "errors": errors,
    }


SCENARIOS: dict[str, Callable[[Env, argparse.Namespace], Awaitable[dict[str, Any]]]] = {
    "fanout": fanout,
    "latency": fanout,
    "connect": connect,
    "replay": replay,
}


# --- command line ----------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", required=True, help="server base URL, ws://127.0.0.1:PORT")
    common.add_argument(
        "--secret", help=f"JWT secret (HS256); prefer the {SECRET_ENV} environment variable"
    )
    common.add_argument("--issuer", help="iss claim, when the server checks one")
    common.add_argument("--path", default="/ws/", help="WebSocket path prefix (default /ws/)")
    common.add_argument("--server-pid", type=int, help="server process id: CPU and RSS figures")
    common.add_argument("--label", help="copied into the JSON")
    common.add_argument("--max-wall", type=float, help="watchdog: abort after this many seconds")
    common.add_argument("--connect-timeout", type=float, default=10.0)
    common.add_argument("--connect-concurrency", type=int, default=50)
    common.add_argument("--ready-timeout", type=float, default=10.0)
    common.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")

    p = argparse.ArgumentParser(
        prog="sds_bench.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  sds_bench.py fanout --url ws://127.0.0.1:3160 --stores 1 --clients 50 --bytes 256\n"
        "  sds_bench.py latency --url ws://127.0.0.1:3160 --clients 50 --rate 200\n"
        "  sds_bench.py connect --url ws://127.0.0.1:3160 --connections 2000\n"
        "  sds_bench.py replay --url ws://127.0.0.1:3160 --stores 1 --patches 10000\n"
        f"The secret comes from --secret or ${SECRET_ENV}.",
    )
    sub = p.add_subparsers(dest="scenario", required=True)

    def fanout_options(sp: argparse.ArgumentParser, rate: str | None, duration: float) -> None:
        sp.add_argument("--stores", type=int, default=1)
        sp.add_argument("--clients", type=int, default=50, help="per store: 1 writer + C-1 readers")
        sp.add_argument(
            "--bytes", type=int, default=256, help="PATCH frame size, type byte included"
        )
        sp.add_argument("--rate", default=rate, help="frames per writer per second, or max")
        sp.add_argument("--duration", type=float, default=duration, help="measured seconds")
        sp.add_argument(
            "--window", type=int, default=64, help="max rate: frames in flight per store"
        )
        sp.add_argument("--drain", type=float, default=5.0, help="seconds to wait for stragglers")
        sp.add_argument(
            "--procs",
            type=int,
            help="receiver processes (0 = in-process; default: usable CPUs - 1)",
        )
        sp.add_argument(
            "--replay-check",
            action="store_true",
            help="afterwards a fresh client must get every patch back (persistent server)",
        )
        sp.add_argument("--replay-timeout", type=float, default=30.0)
        sp.add_argument(
            "--receiver",
            choices=("raw", "aiohttp"),
            default="raw",
            help="receiver client: raw (frames parsed in place, default) or aiohttp",
        )

    fanout_options(
        sub.add_parser("fanout", parents=[common], help="throughput and loss"), "max", 10.0
    )
    fanout_options(
        sub.add_parser("latency", parents=[common], help="fanout at a fixed rate"), "200", 10.0
    )
    c = sub.add_parser("connect", parents=[common], help="idle connections")
    c.add_argument("--connections", type=int, default=2000)
    c.add_argument("--concurrency", type=int, default=100)
    c.add_argument("--stores", type=int, default=100)
    c.add_argument("--hold", type=float, default=2.0, help="seconds to hold them open")
    r = sub.add_parser("replay", parents=[common], help="catch-up from a persistent server")
    r.add_argument("--stores", type=int, default=1)
    r.add_argument("--patches", type=int, default=10_000)
    r.add_argument("--bytes", type=int, default=64)
    r.add_argument("--window", type=int, default=256)
    r.add_argument("--pause", type=float, default=0.2, help="seconds between writing and joining")
    r.add_argument("--replay-timeout", type=float, default=60.0)
    return p


def default_max_wall(a: argparse.Namespace) -> float:
    if a.scenario in ("fanout", "latency"):
        extra = a.replay_timeout if a.replay_check else 0
        return float(a.duration + a.drain + a.ready_timeout + 2 * a.connect_timeout + extra + 60)
    if a.scenario == "connect":
        return float(a.hold + a.connections / 50 + 2 * a.connect_timeout + 60)
    return float(2 * a.replay_timeout + a.ready_timeout + 60)


def use_uvloop(wanted: bool) -> str:
    if wanted:
        try:
            import uvloop
        except ImportError:
            return "asyncio"
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    return "asyncio"


_WATCHED_PROCS: list[Any] = []


def _watchdog(seconds: float, base: dict[str, Any]) -> threading.Timer:
    """Hard stop if the event loop itself is stuck: report, end our workers, exit 3."""

    def fire() -> None:
        for proc in _WATCHED_PROCS:
            with contextlib.suppress(Exception):
                proc.kill()
        emit({**base, "aborted": f"watchdog: no result within {seconds:.0f}s (hard stop)"})
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def emit(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def human(r: dict[str, Any]) -> str:
    """The one-line summary on stderr."""
    if r.get("aborted"):
        return f"{r['scenario']}: ABORTED: {r['aborted']}"
    if r["scenario"] in ("fanout", "latency"):
        p = r["params"]
        lat = r["latency_ms"]
        srv = r["server"]
        line = (
            f"{r['scenario']} S={p['stores']} C={p['clients_per_store']} B={p['frame_bytes']} "
            f"rate={p['rate_per_writer']}: {r['deliveries_per_s']:,.0f} deliveries/s "
            f"({r['mib_per_s']} MiB/s), lost {r['lost']}, out-of-order {r['out_of_order']}, "
            f"echoed {r['echoed']}; latency p50 {lat['p50']} p99 {lat['p99']} max {lat['max']} ms"
        )
        if srv["cpu_pct"] is not None:
            line += f"; server CPU {srv['cpu_pct']}% (efficiency {srv['efficiency'] or 0:,}/CPU-s)"
        line += f"; generator CPU {r['generator']['cpu_pct']}%"
        if r["generator"]["saturated"]:
            line += " [GENERATOR SATURATED]"
        line += f"; other processes {r['machine']['other_pct']}%"
        if "replay" in r:
            rp = r["replay"]
            line += f"; replay {rp['replayed']}/{rp['expected']} complete={rp['complete']}"
        return line
    if r["scenario"] == "connect":
        srv = r["server"]
        return (
            f"connect N={r['params']['connections']}: {r['accepted']} accepted "
            f"({r['accepted_per_s']}/s), failures {r['failures'] or 'none'}, "
            f"{srv['bytes_per_idle_connection']} bytes per idle connection"
        )
    rp = r["replay"]
    return (
        f"replay S={r['params']['stores']} N={r['params']['patches']}: "
        f"{rp['replayed']}/{rp['expected']} replayed in {rp['seconds_max']} s, "
        f"duplicates {rp['duplicates']}, out-of-order {rp['out_of_order']}, "
        f"complete={rp['complete']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    secret = a.secret or os.environ.get(SECRET_ENV)
    try:
        if not secret:
            raise UsageError(f"give --secret or set {SECRET_ENV}")
        base_url = check_loopback(a.url)
        if a.scenario == "latency" and a.rate in (None, "max"):
            raise UsageError("latency needs a fixed --rate")
    except UsageError as exc:
        print(f"sds_bench: {exc}", file=sys.stderr)
        return 2
    a.max_wall = a.max_wall or default_max_wall(a)
    loop_name = use_uvloop(not a.no_uvloop)
    env = Env(base_url, a.path, secret, a.issuer, a.server_pid, a.label)
    base: dict[str, Any] = {
        "tool": "sds_bench",
        "version": TOOL_VERSION,
        "scenario": a.scenario,
        "label": a.label,
        "url": base_url,
        "run_id": f"{env.run_id:016x}",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loop": loop_name,
        "python": sys.version.split()[0],
        "aiohttp": aiohttp.__version__,
    }
    timer = _watchdog(a.max_wall + 15, base)

    async def bounded() -> dict[str, Any]:
        return await asyncio.wait_for(SCENARIOS[a.scenario](env, a), a.max_wall)

    try:
        result = {**base, **asyncio.run(bounded()), "aborted": None}
    except UsageError as exc:
        print(f"sds_bench: {exc}", file=sys.stderr)
        return 2
    except TimeoutError:
        result = {**base, "aborted": f"watchdog: no result within {a.max_wall:.0f}s"}
    except (aiohttp.ClientError, OSError, RuntimeError) as exc:
        result = {**base, "aborted": f"{type(exc).__name__}: {failure_reason(exc)}"}
    finally:
        timer.cancel()
        for proc in _WATCHED_PROCS:
            if proc.is_alive():
                proc.kill()
    emit(result)
    print(f"sds_bench: {human(result)}", file=sys.stderr)
    return 1 if result.get("aborted") else 0


if __name__ == "__main__":
    sys.exit(main())
