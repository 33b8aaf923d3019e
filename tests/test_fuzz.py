"""Fuzzing a live server: random frames, chunk headers, signalling text and token-API bodies.

Each property checks that the server stays up (/healthz 200, a fresh pair of clients
relays), relays what it should byte for byte, and stores nothing malformed.
"""

from __future__ import annotations

import itertools
import json
import struct
import uuid
from collections import defaultdict
from typing import Any

import aiohttp
import jwt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sds.backends.sqlite import store_filename
from sds.client import StoreClient
from sds.protocol import KEY_BYTES, SCOPES, parse_chunk
from sds.tokens import parse_duration
from tests.conftest import SECRET, RunningServer
from tests.store_files import read_rows

FUZZ = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_stores = itertools.count()

KEYS = [bytes([n]) * KEY_BYTES for n in range(3)]
"""A small pool of value keys so that chunk sequences collide, restart and complete."""

any_frame = st.binary(min_size=0, max_size=600)
patch = st.binary(max_size=300).map(lambda b: b"\x01" + b)
value = st.tuples(st.sampled_from(KEYS), st.binary(max_size=200)).map(
    lambda kv: b"\x02" + kv[0] + kv[1]
)
short_value = st.binary(max_size=KEY_BYTES).map(lambda b: b"\x02" + b)
chunk = st.builds(
    lambda key, index, count, body: b"\x05" + key + struct.pack(">II", index, count) + body,
    st.sampled_from(KEYS),
    st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1)),
    st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1)),
    st.binary(max_size=64),
)
truncated_chunk = st.binary(max_size=KEY_BYTES + 7).map(lambda b: b"\x05" + b)
complete_sequence = st.builds(
    lambda key, parts: [
        b"\x05" + key + struct.pack(">II", i, len(parts)) + part for i, part in enumerate(parts)
    ],
    st.sampled_from(KEYS),
    st.lists(st.binary(max_size=64), min_size=1, max_size=4),
)
write_frames = st.lists(
    st.one_of(
        patch,
        value,
        short_value,
        chunk,
        truncated_chunk,
        any_frame,
        complete_sequence,
        st.text(max_size=20),
    ),
    max_size=25,
).map(lambda items: [f for item in items for f in (item if isinstance(item, list) else [item])])


def _store() -> str:
    return f"fuzz-{next(_stores)}-{uuid.uuid4().hex[:6]}"


async def _pair(server: RunningServer, store: str) -> tuple[StoreClient, StoreClient]:
    sender = await server.connect(store, sub="fuzz-sender")
    receiver = await server.connect(store, scope="read", sub="fuzz-receiver")
    return sender, receiver


async def _send_all(sender: StoreClient, frames: list[bytes | str]) -> bytes:
    """Send every frame (text too), then a sentinel; the sentinel to wait for."""
    for frame in frames:
        if isinstance(frame, str):
            await sender.send_text(frame)
        else:
            await sender.send(frame)
    sentinel = b"\x04sentinel-" + uuid.uuid4().bytes
    await sender.send(sentinel)
    return sentinel


async def _until(receiver: StoreClient, sentinel: bytes) -> list[bytes]:
    got: list[bytes] = []
    for _ in range(10_000):
        frame = await receiver.receive(timeout=10)
        if frame == sentinel:
            return got
        got.append(frame)
    raise AssertionError("sentinel never arrived")


async def _assert_healthy(server: RunningServer) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.http_url + "/healthz") as response,
    ):
        assert response.status == 200, await response.text()


async def _close(*clients: StoreClient) -> None:
    for client in clients:
        await client.close()
        assert client.close_code in (1000, None)


@FUZZ
@given(frames=st.lists(st.one_of(any_frame, st.text(max_size=30)), max_size=30))
async def test_random_frames_reach_the_peer_byte_identical(
    server: RunningServer, frames: list[bytes | str]
) -> None:
    sender, receiver = await _pair(server, _store())
    sentinel = await _send_all(sender, frames)
    assert await _until(receiver, sentinel) == [f for f in frames if isinstance(f, bytes) and f]
    assert await _until(sender, await _send_all(receiver, [b"\x04still-open"])) == [
        b"\x04still-open"
    ]
    await _close(sender, receiver)
    await _assert_healthy(server)


@FUZZ
@given(frames=write_frames)
async def test_random_writes_store_only_well_formed_values(
    persistent_server: RunningServer, frames: list[bytes | str]
) -> None:
    store = _store()
    sender, receiver = await _pair(persistent_server, store)
    sentinel = await _send_all(sender, frames)
    binary = [f for f in frames if isinstance(f, bytes)]
    assert await _until(receiver, sentinel) == [f for f in binary if f]
    await _close(sender, receiver)
    await _assert_healthy(persistent_server)

    persist = persistent_server.config.persist_dir
    assert persist is not None
    db = persist / store_filename(store)
    patches = read_rows(db, "SELECT data FROM patches WHERE store_id = ? ORDER BY clock", (store,))
    assert [bytes(row[0]) for row in patches] == [f[1:] for f in binary if f[:1] == b"\x01"]
    assert read_rows(db, "SELECT count(*) FROM snapshots") == [(0,)]
    blobs = {key: bytes(data) for key, data in read_rows(db, "SELECT hash, data FROM blobs")}
    _assert_blobs_well_formed(blobs, binary)


def _assert_blobs_well_formed(blobs: dict[str, bytes], frames: list[bytes]) -> None:
    """Every stored blob is a sent VALUE or a complete chunk sequence; clean sequences are stored."""
    values: dict[str, list[bytes]] = defaultdict(list)
    chunks: dict[str, list[tuple[int, int, bytes]]] = defaultdict(list)
    for frame in frames:
        if frame[:1] == b"\x02" and len(frame) > 1 + KEY_BYTES:
            values[frame[1 : 1 + KEY_BYTES].hex()].append(frame[1 + KEY_BYTES :])
        elif frame[:1] == b"\x05":
            parsed = parse_chunk(frame)
            if parsed is not None:
                header, body = parsed
                chunks[header.key].append((header.index, header.count, bytes(body)))
    for key, data in blobs.items():
        assert data in values[key] or _from_chunks(data, chunks[key]), f"blob {key[:8]} invented"
    for key, parts in chunks.items():
        counts = {count for _, count, _ in parts}
        indexes = sorted(index for index, _, _ in parts)
        if counts == {len(parts)} and indexes == list(range(len(parts))) and not values[key]:
            whole = b"".join(body for _, _, body in sorted(parts))
            assert blobs.get(key) == whole, f"clean sequence {key[:8]} not stored"


def _from_chunks(data: bytes, parts: list[tuple[int, int, bytes]]) -> bool:
    """Whether ``data`` is index 0..n-1 of one count's chunk bodies (any resend per index)."""
    for count in {count for _, count, _ in parts}:
        bodies: dict[int, set[bytes]] = defaultdict(set)
        for index, c, body in parts:
            if c == count:
                bodies[index].add(body)
        if len(bodies) == count and _concat_matches(data, [bodies[i] for i in range(count)]):
            return True
    return False


def _concat_matches(data: bytes, options: list[set[bytes]]) -> bool:
    if not options:
        return data == b""
    return any(
        data.startswith(body) and _concat_matches(data[len(body) :], options[1:])
        for body in options[0]
    )


json_scalar = st.one_of(
    st.none(),
    st.sampled_from(["peer-a", "peer-b", "peer-c", "", "hello", "offer"]),
    st.integers(),
    st.text(max_size=10),
)
signal_message = st.one_of(
    st.text(max_size=40),
    st.builds(
        json.dumps,
        st.dictionaries(
            st.sampled_from(["type", "from", "to", "sdp", "candidate"]), json_scalar, max_size=5
        ),
    ),
    st.builds(json.dumps, st.lists(json_scalar, max_size=3)),
    st.builds(json.dumps, json_scalar),
)


def _signal_model(messages: list[str], taken: str) -> tuple[list[str], str | None]:
    """What peer B (id ``taken``) should receive of A's messages, and the id A ends up with."""
    own: str | None = None
    delivered = []
    for text in messages:
        try:
            message = json.loads(text)
        except ValueError:
            continue
        if not isinstance(message, dict):
            continue
        claimed = message.get("from")
        if not isinstance(claimed, str) or not claimed:
            continue
        if own is None:
            if claimed == taken:
                continue
            own = claimed
        elif claimed != own:
            continue
        target = message.get("to")
        if target is None or target == taken:
            delivered.append(text)
    return delivered, own


@FUZZ
@given(messages=st.lists(signal_message, max_size=20), noise=st.lists(any_frame, max_size=3))
async def test_random_signalling_messages_are_routed_by_the_rules(
    server: RunningServer, messages: list[str], noise: list[bytes]
) -> None:
    room = _store()
    a = await server.connect(room, sub="a", path="signal")
    b = await server.connect(room, sub="b", path="signal")
    hello_b = json.dumps({"type": "hello", "from": "peer-b"})
    await b.send_text(hello_b)
    assert (await a.receive_message(timeout=5)).data == hello_b
    for text in messages:
        await a.send_text(text)
    for frame in noise:
        await a.send(frame)
    expected, own = _signal_model(messages, "peer-b")
    own = own or "peer-a"
    sentinel = json.dumps({"type": "hello", "from": own, "sentinel": uuid.uuid4().hex})
    await a.send_text(sentinel)
    got: list[str] = []
    for _ in range(1000):
        msg = await b.receive_message(timeout=10)
        assert msg.type is aiohttp.WSMsgType.TEXT
        if msg.data == sentinel:
            break
        got.append(msg.data)
    assert got == expected
    await _close(a, b)
    await _assert_healthy(server)


token_body = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda d: json.dumps(d).encode(),
        st.dictionaries(
            st.sampled_from(["sub", "scope", "exp", "aud", "iss"]),
            st.one_of(
                json_scalar,
                st.sampled_from(["read", "write", "admin", "90s", "1h", "2 days", "1.5h", "-1h"]),
                st.floats(allow_nan=False),
            ),
            max_size=5,
        ),
    ),
)


def _expected_token_status(raw: bytes) -> int:
    try:
        body = json.loads(raw)
    except ValueError:
        return 400
    if not isinstance(body, dict):
        return 400
    sub = body.get("sub")
    if not isinstance(sub, str) or not sub.strip() or body.get("scope") not in SCOPES:
        return 400
    try:
        parse_duration(body.get("exp", "24h"))
    except (ValueError, TypeError):
        return 400
    return 200


@FUZZ
@given(raw=token_body)
async def test_random_token_api_bodies_get_200_or_400_never_500(
    server: RunningServer, raw: bytes
) -> None:
    admin = server.token("fuzz-api", scope="admin", sub="fuzz-admin")
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.http_url + "/api/token",
            data=raw,
            headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"},
        ) as response,
    ):
        status = response.status
        body: Any = await response.json(content_type=None)
    assert status == _expected_token_status(raw), body
    if status == 200:
        request = json.loads(raw)
        claims = jwt.decode(body["token"], SECRET, algorithms=["HS256"], audience="fuzz-api")
        assert claims["aud"] == "fuzz-api"
        assert claims["sub"] == request["sub"]
        assert claims["scope"] == request["scope"]
    else:
        assert set(body) == {"error"}
    await _assert_healthy(server)
