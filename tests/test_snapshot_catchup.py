"""Catch-up in ``--value-mode snapshot`` while writers are active (SPEC 4): a VALUE that
commits between the join and the read of the snapshot reaches the joiner once.

The joiner is held between taking its join point and reading the snapshot by the
server's own catch-up budget (the test takes all of it), while a writer commits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sds.appkeys import RELAY
from sds.client import StoreClient
from sds.protocol import encode_server_frames, server_frame_spans
from tests.conftest import ServerFactory

PRESENCE = b"\x04" + b'{"cursor": 3}'


def patch(n: int) -> bytes:
    return b"\x01" + n.to_bytes(4, "big") + b"p" * 8


def value(text: bytes) -> bytes:
    return b"\x02" + bytes([7]) * 32 + text


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait (bounded) until ``condition`` holds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


async def receive_through(client: StoreClient, last: bytes, most: int = 20) -> list[bytes]:
    """The frames a client receives up to and including ``last`` (bounded)."""
    frames: list[bytes] = []
    while len(frames) < most:
        frames.append(await client.receive())
        if frames[-1] == last:
            return frames
    raise AssertionError(f"{last!r} not among {frames!r}")


async def test_a_value_committed_while_a_joiner_waits_for_its_history_reaches_it_once(
    make_server: ServerFactory, storage_options: dict[str, Any]
) -> None:
    server = await make_server(value_mode="snapshot", **storage_options)
    relay = server.app[RELAY]
    writer = await server.connect("seam")
    witness = await server.connect("seam", scope="read", sub="witness")
    # The witness's (empty) catch-up is over once a presence sent now reaches it; a
    # witness still catching up when the VALUE commits would rightly get only the
    # snapshot, which supersedes patch 0.
    await writer.send(PRESENCE)
    assert await receive_through(witness, PRESENCE) == [PRESENCE]
    for frame in (patch(0), value(b"first")):
        await writer.send(frame)
    assert await receive_through(witness, value(b"first")) == [patch(0), value(b"first")]

    # The joiner takes its join point (clock 1) and then waits for catch-up room.
    taken = await relay.catchup.take(relay.catchup.limit)
    waits = relay.catchup.waits
    try:
        joiner = await server.connect("seam", scope="read", sub="joiner")
        await until(lambda: relay.catchup.waits > waits, "the joiner waits for catch-up room")
        # Committed and relayed (held back for the joiner) before its history is read:
        # the snapshot it reads is this VALUE, which pruned patch 1.
        burst = [patch(1), value(b"second"), patch(2)]
        for frame in burst:
            await writer.send(frame)
        assert await receive_through(witness, patch(2)) == burst
        await witness.send(PRESENCE)  # held too, and not a write: it stays
        assert await receive_through(writer, PRESENCE) == [PRESENCE]
    finally:
        relay.catchup.give(taken)
    await writer.send(patch(3))

    received = await receive_through(joiner, patch(3))
    assert received.count(value(b"second")) == 1, received
    assert received == [value(b"second"), patch(2), PRESENCE, patch(3)]


def test_held_messages_split_back_into_the_frames_they_were_encoded_from() -> None:
    payloads = [b"\x01" * 125, b"\x02" * 126, b"", b"\x04" * 65535, b"\x01" * 70000]
    buffer = encode_server_frames(payloads)
    spans = server_frame_spans(buffer)
    assert [buffer[body:end] for _start, body, end in spans] == payloads
    assert b"".join(buffer[start:end] for start, _body, end in spans) == buffer


async def test_joiners_arriving_during_a_stream_of_values_receive_each_frame_once_in_order(
    make_server: ServerFactory, storage_options: dict[str, Any]
) -> None:
    """Joins interleaved with commits in every way the event loop happens to order them.

    Each joiner's frames are a part of what was sent, in order, none twice, and
    everything from the last VALUE it received on (a VALUE replaces the state).
    """
    server = await make_server(value_mode="snapshot", **storage_options)
    writer = await server.connect("stream")
    sent = [value(b"%d" % n) if n % 7 == 3 else patch(n) for n in range(600)]
    joiners: list[StoreClient] = []

    async def write() -> None:
        for n, frame in enumerate(sent):
            await writer.send(frame)
            if n % 5 == 0:
                await asyncio.sleep(0)  # lets joiners in between writes (no waiting on them)

    async def join() -> None:
        for n in range(30):
            joiners.append(await server.connect("stream", scope="read", sub=f"joiner-{n}"))

    await asyncio.gather(write(), join())
    end = patch(100_000)
    await writer.send(end)
    sent.append(end)
    position = {frame: index for index, frame in enumerate(sent)}
    for joiner in joiners:
        received = [position[frame] for frame in await receive_through(joiner, end, most=700)]
        assert len(set(received)) == len(received), "a frame twice"
        assert received == sorted(received), "frames out of order"
        values = [index for index in received if sent[index][0] == 2]
        start = values[-1] if values else 0
        assert [index for index in received if index >= start] == list(range(start, len(sent)))
