"""``GET /signal/{store_id}``: WebRTC signalling rooms (hello, offer, answer, candidate).

Text frames carry JSON objects. Without ``to`` a message goes to every other
peer of the room; with ``to`` only to the peer that announced that id with its
``from``. A connection's id is fixed by its first ``from`` and cannot be taken
while another open connection of the room holds it. Nothing is persisted.
"""

from __future__ import annotations

import json
import logging

from aiohttp import WSMsgType, web

from sds.appkeys import CONFIG, OWNERSHIP, RELAY, SIGNALLING, STATE
from sds.auth import CloseRefusal, admit, http_error, refuse_with_close
from sds.connections import Client, accept_client
from sds.forwarding import Forwarded, place_client
from sds.ownership import SIGNAL
from sds.protocol import encode_server_frame
from sds.tokens import Claims

log = logging.getLogger(__name__)


class Peer:
    """One signalling connection and the id it claimed."""

    __slots__ = ("client", "peer_id")

    def __init__(self, client: Client) -> None:
        self.client = client
        self.peer_id: str | None = None


class Room:
    """The signalling peers of one store."""

    def __init__(self) -> None:
        self.peers: list[Peer] = []
        self.by_id: dict[str, Peer] = {}

    def route(self, sender: Peer, text: str) -> str | None:
        """Deliver one text message from ``sender`` by the rules of the module docstring.

        A message that is dropped returns why: ``invalid`` (not a JSON object, or
        nested too deeply to parse), ``no_from`` or ``wrong_from``.
        """
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):
            return "invalid"
        if not isinstance(message, dict):
            return "invalid"
        claimed = message.get("from")
        if not isinstance(claimed, str) or not claimed:
            return "no_from"
        if sender.peer_id is None:
            if claimed in self.by_id:
                return "wrong_from"
            sender.peer_id = claimed
            self.by_id[claimed] = sender
        elif claimed != sender.peer_id:
            return "wrong_from"
        frame = encode_server_frame(text.encode(), text=True)
        target = message.get("to")
        if target is None:
            for peer in self.peers:
                if peer is not sender:
                    peer.client.deliver(frame)
            return None
        receiver = self.by_id.get(target) if isinstance(target, str) else None
        if receiver is not None and receiver is not sender:
            receiver.client.deliver(frame)
        return None

    def leave(self, peer: Peer) -> None:
        self.peers.remove(peer)
        if peer.peer_id is not None and self.by_id.get(peer.peer_id) is peer:
            del self.by_id[peer.peer_id]


class Signalling:
    """All signalling rooms, separate from the /ws stores."""

    def __init__(self, *, max_peers_per_room: int) -> None:
        self.max_peers_per_room = max_peers_per_room
        self.rooms: dict[str, Room] = {}

    def join(self, store_id: str, peer: Peer) -> Room:
        room = self.rooms.setdefault(store_id, Room())
        room.peers.append(peer)
        return room

    def leave(self, store_id: str, peer: Peer) -> None:
        room = self.rooms.get(store_id)
        if room is None:
            return
        room.leave(peer)
        if not room.peers:
            del self.rooms[store_id]

    def is_full(self, store_id: str) -> bool:
        room = self.rooms.get(store_id)
        return room is not None and len(room.peers) >= self.max_peers_per_room

    async def close_all(self, code: int) -> None:
        for room in list(self.rooms.values()):
            for peer in list(room.peers):
                peer.client.close(code, "server shutting down")


async def signal_handler(request: web.Request) -> web.StreamResponse:
    """Admit, upgrade and serve one signalling peer until it leaves."""
    config = request.app[CONFIG]
    state = request.app[STATE]
    signalling = request.app[SIGNALLING]
    relay = request.app[RELAY]
    try:
        store_id, claims = admit(request, config, state)
    except CloseRefusal as refusal:
        return await refuse_with_close(request, refusal)
    if signalling.is_full(store_id):
        relay.metrics.connections_refused["signal_limit"] += 1
        raise http_error(503, "signalling room is at its connection limit")
    # --max-connections bounds /ws and /signal together.
    if relay.open_connections() >= config.max_connections:
        relay.metrics.connections_refused["max_connections"] += 1
        raise http_error(503, "server is at its connection limit")

    ownership = request.app.get(OWNERSHIP)
    key = (SIGNAL, store_id)
    via: str | None = None
    if ownership is not None:
        placed, via = await place_client(request, ownership, key, _nothing)
        if isinstance(placed, Forwarded):
            return placed.response
    try:
        return await _serve_peer(request, store_id, claims)
    finally:
        if ownership is not None:
            ownership.left(key, via=via)
            ownership.unclaim(key)


async def _nothing() -> None:
    """A room needs nothing opened: its lock is all."""


async def _serve_peer(request: web.Request, store_id: str, claims: Claims) -> web.StreamResponse:
    config = request.app[CONFIG]
    signalling = request.app[SIGNALLING]
    relay = request.app[RELAY]
    # Counted before the upgrade awaits, so concurrent upgrades cannot pass the limit.
    relay.metrics.signal_connections_open += 1
    try:
        client = await accept_client(
            request,
            config,
            store_id=store_id,
            claims=claims,
            can_write=False,
            flusher=relay.flusher,
            metrics=relay.metrics,
        )
    except BaseException:
        relay.metrics.signal_connections_open -= 1
        raise
    peer = Peer(client)
    room = signalling.join(store_id, peer)
    try:
        while True:
            msg = await client.ws.receive()
            if msg.type is WSMsgType.TEXT:
                dropped = room.route(peer, msg.data)
                if dropped is not None:
                    relay.metrics.frames_dropped["signal_" + dropped] += 1
            elif msg.type is WSMsgType.BINARY:
                relay.metrics.frames_dropped["signal_binary"] += 1
            else:
                break
    finally:
        signalling.leave(store_id, peer)
        client.detach()
        relay.metrics.signal_connections_open -= 1
    return client.ws
