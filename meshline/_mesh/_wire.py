"""What mesh nodes send each other, as msgspec structs (msgpack on the wire).

Frames are ``array_like`` tagged structs: compact, and decoded in one pass into the
right class. User payloads travel as :class:`msgspec.Raw`, so the frame decodes
before the receiver knows which type the payload should become.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

__all__ = [
    "BroadcastFrame",
    "CancelFrame",
    "ErrorReply",
    "FailureKind",
    "LeaderRecord",
    "NodeFrame",
    "NodeRecord",
    "OkReply",
    "Reply",
    "RequestFrame",
    "decode_payload",
    "encode",
    "encode_broadcast",
    "encode_ok_reply",
    "encode_payload",
    "encode_request",
]


class RequestFrame(msgspec.Struct, array_like=True, tag=0, frozen=True):
    request_id: int
    sender: int
    kind: str
    timeout: float
    data: msgspec.Raw


class CancelFrame(msgspec.Struct, array_like=True, tag=1, frozen=True):
    request_id: int
    sender: int


NodeFrame = RequestFrame | CancelFrame
"""Everything that arrives on a node's own subject."""


class OkReply(msgspec.Struct, array_like=True, tag=0, frozen=True):
    data: msgspec.Raw


class FailureKind(enum.IntEnum):
    NO_HANDLER = 1
    HANDLER_RAISED = 2
    BAD_PAYLOAD = 3
    REPLY_TOO_LARGE = 4
    """The handler answered, but its answer exceeds what the transport can carry."""
    REPLY_FAILED = 5
    """The handler answered, but the answer could not be sent."""


class ErrorReply(msgspec.Struct, array_like=True, tag=1, frozen=True):
    kind: FailureKind
    error_type: str
    message: str


Reply = OkReply | ErrorReply


class BroadcastFrame(msgspec.Struct, array_like=True, frozen=True):
    sender: int
    kind: str
    skip_sender: bool
    data: msgspec.Raw


class NodeRecord(msgspec.Struct, frozen=True):
    """The value of a node's liveness key."""

    node_id: int
    ttl: int
    started_at_ms: int
    incarnation: int = 1
    """Grows each time the node re-asserts itself after a gap in its heartbeats."""


class LeaderRecord(msgspec.Struct, frozen=True):
    """The value of the leader key."""

    node_id: int
    ttl: int


_encoder = msgspec.msgpack.Encoder()
_REQUEST_TAG = 0
_OK_TAG = 0
encode = _encoder.encode


def encode_request(request_id: int, sender: int, kind: str, timeout: float, data: object) -> bytes:
    """Encode a :class:`RequestFrame` and its payload in one pass.

    The bytes are exactly those of ``encode(RequestFrame(..., encode_payload(data)))``
    (an ``array_like`` struct is an array led by its tag), without encoding the
    payload separately first. Raises ``TypeError`` for what msgspec cannot encode.
    """
    return _encoder.encode((_REQUEST_TAG, request_id, sender, kind, timeout, data))


def encode_broadcast(sender: int, kind: str, skip_sender: bool, data: object) -> bytes:
    """Encode a :class:`BroadcastFrame` and its payload in one pass (see above)."""
    return _encoder.encode((sender, kind, skip_sender, data))


def encode_ok_reply(result: object) -> bytes:
    """Encode an :class:`OkReply` carrying ``result`` in one pass (see above)."""
    return _encoder.encode((_OK_TAG, result))


def encode_payload(data: object) -> msgspec.Raw:
    """Encode user data; raises ``TypeError`` for what msgspec cannot encode."""
    return msgspec.Raw(_encoder.encode(data))


_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def decode_payload(raw: msgspec.Raw | bytes, data_type: Any) -> Any:
    """Decode user data into ``data_type``; raises ``msgspec.ValidationError``/``DecodeError``."""
    try:
        decoder = _decoders.get(data_type)
    except TypeError:  # an unhashable type annotation: decode without the cache
        return msgspec.msgpack.decode(raw, type=data_type)
    if decoder is None:
        decoder = _decoders[data_type] = msgspec.msgpack.Decoder(data_type)
    return decoder.decode(raw)
