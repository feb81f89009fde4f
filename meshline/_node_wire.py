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
    "encode_payload",
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


class LeaderRecord(msgspec.Struct, frozen=True):
    """The value of the leader key."""

    node_id: int
    ttl: int


_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode


def encode_payload(data: object) -> msgspec.Raw:
    """Encode user data; raises ``TypeError`` for what msgspec cannot encode."""
    return msgspec.Raw(_encoder.encode(data))


def decode_payload(raw: msgspec.Raw | bytes, data_type: Any) -> Any:
    """Decode user data into ``data_type``; raises ``msgspec.ValidationError``/``DecodeError``."""
    return msgspec.msgpack.decode(raw, type=data_type)
