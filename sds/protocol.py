"""The SDS wire protocol: frame types, scope rules and header parsing. Pure, no I/O.

A frame is one binary WebSocket message: byte 0 is the type, the rest the payload.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

KEY_BYTES = 32
CHUNK_HEADER_BYTES = KEY_BYTES + 8
CHUNK_BYTES = 1024 * 1024
MAX_VALUE_FRAME_BYTES = CHUNK_BYTES
"""A VALUE frame carries at most 1 MiB of value; larger values travel as VALUE_CHUNK frames."""

SCOPES = ("read", "write", "admin")


PATCH = 0x01
VALUE = 0x02
REQ_VALUE = 0x03
PRESENCE = 0x04
VALUE_CHUNK = 0x05
SYNC_REQ = 0x06
"""Frame type bytes as plain ints: comparing with an IntEnum member costs ten times more."""


class FrameType(IntEnum):
    PATCH = PATCH
    VALUE = VALUE
    REQ_VALUE = REQ_VALUE
    PRESENCE = PRESENCE
    VALUE_CHUNK = VALUE_CHUNK
    SYNC_REQ = SYNC_REQ


FRAME_NAMES = {member.value: member.name for member in FrameType}
WRITE_FRAME_TYPES = frozenset({PATCH, VALUE, VALUE_CHUNK})


def frame_name(msg_type: int) -> str:
    """A readable name for a frame type byte, e.g. PATCH or 0x7f."""
    return FRAME_NAMES.get(msg_type, f"0x{msg_type:02x}")


def reject_write_frame(msg_type: int) -> bool:
    """True for the frame types a read-scope client may not send (they are dropped)."""
    return msg_type in WRITE_FRAME_TYPES


def scope_can_write(scope: str) -> bool:
    """Write and admin scopes may send every frame type; read scope may not write."""
    return scope in ("write", "admin")


def value_key_hex(frame: bytes) -> str | None:
    """The lowercase hex of the 32 key bytes of a VALUE / REQ_VALUE / VALUE_CHUNK frame."""
    if len(frame) < 1 + KEY_BYTES:
        return None
    return frame[1 : 1 + KEY_BYTES].hex()


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """The header of a VALUE_CHUNK frame: which part of which value it carries."""

    key: str
    index: int
    count: int


_CHUNK_NUMBERS = struct.Struct(">II")


def parse_chunk(frame: bytes) -> tuple[ChunkHeader, memoryview] | None:
    """Split a VALUE_CHUNK frame into its header and chunk bytes; None when malformed.

    Malformed means: too short, a count of 0, an index not below the count, or a
    chunk larger than 1 MiB. Such frames are still relayed, never stored.
    """
    if len(frame) < 1 + CHUNK_HEADER_BYTES or frame[0] != VALUE_CHUNK:
        return None
    index, count = _CHUNK_NUMBERS.unpack_from(frame, 1 + KEY_BYTES)
    body = memoryview(frame)[1 + CHUNK_HEADER_BYTES :]
    if count == 0 or index >= count or len(body) > CHUNK_BYTES:
        return None
    return ChunkHeader(frame[1 : 1 + KEY_BYTES].hex(), index, count), body


def value_frame(key_hex: str, value: bytes) -> bytes:
    """A VALUE frame carrying a whole value (<= 1 MiB)."""
    return bytes([FrameType.VALUE]) + bytes.fromhex(key_hex) + value


def value_chunk_frames(key_hex: str, value: bytes) -> list[bytes]:
    """The VALUE_CHUNK frames (1 MiB each) that carry a value larger than 1 MiB."""
    key = bytes.fromhex(key_hex)
    count = max(1, -(-len(value) // CHUNK_BYTES))
    return [
        bytes([FrameType.VALUE_CHUNK])
        + key
        + _CHUNK_NUMBERS.pack(index, count)
        + value[index * CHUNK_BYTES : (index + 1) * CHUNK_BYTES]
        for index in range(count)
    ]


def value_answer_frames(key_hex: str, value: bytes) -> list[bytes]:
    """How a stored value is sent to a client: one VALUE, or VALUE_CHUNK frames above 1 MiB."""
    if len(value) <= MAX_VALUE_FRAME_BYTES:
        return [value_frame(key_hex, value)]
    return value_chunk_frames(key_hex, value)


_LEN1 = struct.Struct("!BB")
_LEN2 = struct.Struct("!BBH")
_LEN3 = struct.Struct("!BBQ")
_BINARY_FIN = 0x82
BINARY_FIN = _BINARY_FIN
"""The first header byte of a binary message (FIN, opcode 2)."""
_TEXT_FIN = 0x81


def encode_server_frame(payload: bytes, *, text: bool = False) -> bytes:
    """The bytes of one unmasked WebSocket message (binary, or text) from the server.

    aiohttp offers no public way to encode a frame once and write it to many
    transports; a broadcast to N clients would otherwise build N identical frames.
    Server frames are never masked (RFC 6455 5.1), so the header is all there is.
    """
    return _frame_header(len(payload), _TEXT_FIN if text else _BINARY_FIN) + payload


def encode_server_frames(payloads: Sequence[bytes]) -> bytes:
    """Binary messages back to back in one buffer: a run of relayed frames, one write."""
    parts: list[bytes] = []
    append = parts.append
    for payload in payloads:
        length = len(payload)
        append(_BINARY_HEADERS[length] if length < 126 else _frame_header(length, _BINARY_FIN))
        append(payload)
    return b"".join(parts)


def _frame_header(length: int, first: int) -> bytes:
    if length < 126:
        return _LEN1.pack(first, length)
    if length < 65536:
        return _LEN2.pack(first, 126, length)
    return _LEN3.pack(first, 127, length)


_BINARY_HEADERS = tuple(_frame_header(length, _BINARY_FIN) for length in range(126))


def server_frame_spans(buffer: bytes) -> list[tuple[int, int, int]]:
    """(start, payload start, end) of each message in a buffer of encoded server frames.

    The inverse of ``encode_server_frame(s)``: unmasked, unfragmented messages back
    to back, as a client's held-back frames are kept.
    """
    spans = []
    at, end = 0, len(buffer)
    while at < end:
        length = buffer[at + 1] & 0x7F
        payload = at + 2
        if length == 126:
            length = int.from_bytes(buffer[payload : payload + 2], "big")
            payload += 2
        elif length == 127:
            length = int.from_bytes(buffer[payload : payload + 8], "big")
            payload += 8
        spans.append((at, payload, payload + length))
        at = payload + length
    return spans


def binary_frame_header(length: int) -> bytes:
    """The header of one binary message of ``length`` payload bytes (written before the payload)."""
    return _BINARY_HEADERS[length] if length < 126 else _frame_header(length, _BINARY_FIN)
