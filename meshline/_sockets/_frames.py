"""Frames of meshline's socket protocol, their two encodings, and the protocol errors.

One WebSocket message carries exactly one frame. A frame is a map (a JSON object,
or a msgpack map) whose ``t`` field names its kind; every kind is a frozen
:class:`msgspec.Struct` below, and :data:`Frame` is their tagged union, so a
message decodes into the right class in a single msgspec call. The frame table,
field by field, is in ``docs/protocol.rst``.

Payloads
    The ``data`` (and ``details``) fields carry application values. On a frame
    this side builds, ``data`` may hold any value msgspec can encode (or a
    :class:`msgspec.Raw` already encoded *in the same encoding*; it is spliced in
    verbatim). On a decoded frame it is a :class:`msgspec.Raw` holding the value's
    bytes in the connection's encoding, or ``None`` when the field was absent:
    the frame decodes before anyone knows which type the payload should become,
    and the handler decodes it into its declared input type later with
    :meth:`Codec.decode_data` (a bad payload is then the handler's typed
    ``bad_input`` error, never a protocol error). A Raw from one encoding must not
    be sent on a connection of the other: decode it and send the value.

    (To mypy, ``data`` is ``Any``; at run time msgspec sees :class:`msgspec.Raw`.)

Encodings
    Two codecs, one per WebSocket subprotocol: :data:`MSGPACK` for
    ``meshline.v1.msgpack`` (binary messages, used by the Python client) and
    :data:`JSON` for ``meshline.v1.json`` (text messages, for browsers). Every
    envelope field is JSON-safe by construction: strings, numbers, ids below
    2**53, no bytes, no non-string keys. :func:`select_codec` picks the codec from
    the subprotocols a client offers.

Errors
    Decoding raises :class:`MalformedFrameError` (the message is not a frame:
    not valid msgpack/JSON, not a map, an unknown ``t``, a missing or wrongly
    typed envelope field, a frame kind the sender may not send, a text message on
    msgpack or a binary one on JSON) or :class:`FrameTooLargeError`; both are
    :class:`RemoteProtocolError` and carry the close code to send. Encoding
    raises :class:`FrameEncodeError` when the data cannot be encoded (nothing is
    sent), or :class:`PeerLimitExceededError` when the encoded frame is bigger
    than the peer accepts. :meth:`Codec.decode_data` raises
    :class:`PayloadDecodeError`.

Nothing here does I/O, reads a clock or keeps state between calls; codecs are
shared, immutable singletons.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeAlias, TypeVar

import msgspec

from .._errors import MeshlineError
from ._codes import CloseCode

__all__ = [
    "JSON",
    "JSON_SUBPROTOCOL",
    "MAX_ID",
    "MSGPACK",
    "MSGPACK_SUBPROTOCOL",
    "PROTOCOL_VERSION",
    "SUBPROTOCOLS",
    "CallFrame",
    "CancelFrame",
    "ClientFrame",
    "Codec",
    "ErrorFrame",
    "EventFrame",
    "Frame",
    "FrameEncodeError",
    "FrameTooLargeError",
    "HelloFrame",
    "LocalProtocolError",
    "MalformedFrameError",
    "Message",
    "PayloadDecodeError",
    "PeerLimitExceededError",
    "PingFrame",
    "PongFrame",
    "PresenceDiffFrame",
    "PresenceMember",
    "PresenceStateFrame",
    "ProtocolClosedError",
    "ProtocolError",
    "RemoteProtocolError",
    "ReplyErrorFrame",
    "ReplyFrame",
    "RequestFrame",
    "ResultFrame",
    "ServerFrame",
    "Side",
    "SubscribeFrame",
    "UnsubscribeFrame",
    "UnwatchFrame",
    "WatchFrame",
    "WelcomeFrame",
    "codec_for_subprotocol",
    "select_codec",
]

logger = logging.getLogger("meshline.sockets")

PROTOCOL_VERSION = 2
"""The protocol revision this module speaks (2 added room presence: ``watch``,
``unwatch``, ``presence_state`` and ``presence_diff``). The subprotocol names the major
version (``v1``); revisions within it only add optional fields and frame kinds,
and both sides use the lower of their two revisions (see :class:`HelloFrame`)."""

MSGPACK_SUBPROTOCOL = "meshline.v1.msgpack"
JSON_SUBPROTOCOL = "meshline.v1.json"

MAX_ID = 2**53 - 1
"""The largest id, sequence number or size on the wire: exact in a JSON number
(an IEEE double), so a JavaScript client reads it back unchanged."""

Message: TypeAlias = bytes | str
"""One WebSocket message: ``bytes`` for a binary message, ``str`` for a text one."""

MAX_REASON_BYTES = 123
"""The longest reason a WebSocket close frame can carry, in UTF-8 bytes."""


class Side(enum.StrEnum):
    """Which end of a connection a protocol machine (or a frame's sender) is."""

    SERVER = "server"
    CLIENT = "client"

    @property
    def peer(self) -> Side:
        """The other side."""
        return Side.CLIENT if self is Side.SERVER else Side.SERVER


# --- Errors -----------------------------------------------------------------------


def _truncate_reason(text: str) -> str:
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= MAX_REASON_BYTES:
        return text
    return encoded[: MAX_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."


class ProtocolError(MeshlineError):
    """Base class of the socket protocol's errors."""


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol forbids (a bug in the caller).

    Raised before anything is encoded or recorded: no bytes are produced, the
    machine's state is unchanged, and the connection may go on.
    """


class ProtocolClosedError(LocalProtocolError):
    """Something was to be sent after the protocol machine closed.

    Expected in shells where an answer races the connection's end: there is
    nobody left to send it to, and nothing else to do.
    """


class PeerLimitExceededError(LocalProtocolError):
    """The encoded frame is bigger than the peer's ``max_message_size``.

    Nothing was sent and no state changed: answer a call with an error instead
    (:attr:`ErrorCode.TOO_LARGE <meshline._sockets._codes.ErrorCode.TOO_LARGE>`).
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes is over the peer's limit of {limit} bytes")
        self.size = size
        self.limit = limit


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; the connection must close with :attr:`close_code`.

    :attr:`reason` is a short description that fits in a WebSocket close frame
    (at most 123 UTF-8 bytes); ``str(error)`` is the full description, for logs.
    A protocol machine that raises it has already moved to its closed state.
    """

    def __init__(self, message: str, close_code: CloseCode = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.reason = _truncate_reason(message)


class MalformedFrameError(RemoteProtocolError):
    """A message that is not a valid frame for its receiver.

    Not valid msgpack or JSON; not a map; an unknown ``t``; an envelope field
    missing, of the wrong type or out of range; a frame kind the sender may not
    send; nesting too deep; a text message on the msgpack subprotocol or a binary
    one on JSON (close code 1003). Close code 1002 otherwise.
    """


class FrameTooLargeError(RemoteProtocolError):
    """A message over the receiver's ``max_message_size`` (close code 1009).

    Text messages are measured in characters (at most their size in bytes); the
    WebSocket layer below usually enforces the limit in bytes first.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"message of {size} bytes is over the limit of {limit} bytes",
            CloseCode.MESSAGE_TOO_BIG,
        )
        self.size = size
        self.limit = limit


class FrameEncodeError(MeshlineError, ValueError):
    """A frame could not be encoded: its data holds values the encoding cannot carry.

    (msgspec's own message says which.) Also raised for strings holding lone
    surrogates, which neither encoding can carry. Nothing was sent and no
    state changed.
    """


class PayloadDecodeError(MeshlineError, ValueError):
    """A payload did not decode into the type asked for (:meth:`Codec.decode_data`).

    The message is msgspec's, which names the path of the bad value. On the
    server this becomes a ``bad_input`` error answer, never a protocol error.
    """


# --- Frames -----------------------------------------------------------------------

Id = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
"""Call and request ids, ping sequence numbers, node ids, sizes."""
Version = Annotated[int, msgspec.Meta(ge=1, le=MAX_ID)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=1e9)]
"""A duration in seconds: finite and not negative (JSON cannot carry infinity)."""
Count = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]

if TYPE_CHECKING:
    Payload: TypeAlias = Any
else:
    Payload = msgspec.Raw


class _FrameBase(msgspec.Struct, tag_field="t", omit_defaults=True, frozen=True, gc=False):
    """Fields equal to their default are left out when encoding; absent ones take
    the default when decoding. Unknown fields are ignored (later revisions of v1
    may add optional ones).

    Frames are not tracked by the garbage collector (``gc=False``): every message
    makes one, and a frame never takes part in a reference cycle (its fields are
    strings, numbers, raw payloads, or the data being encoded, which does not
    refer back to the frame)."""

    senders: ClassVar[frozenset[Side]]
    """Which sides may send this kind of frame."""


_BOTH = frozenset({Side.SERVER, Side.CLIENT})
_FROM_CLIENT = frozenset({Side.CLIENT})
_FROM_SERVER = frozenset({Side.SERVER})


class HelloFrame(_FrameBase, tag="hello", frozen=True):
    """Client to server, first frame of every connection: who the client is."""

    senders = _FROM_CLIENT
    version: Version = PROTOCOL_VERSION
    """The highest protocol revision the client speaks; the server answers with
    the revision both use (the lower of the two)."""
    client_id: str = ""
    """The client's stable id, the same across reconnects ("" to leave it to the
    server's ``authenticate`` hook)."""
    client_name: str = ""
    """Free-form name of the client software, for logs and introspection."""
    client_version: str = ""
    """Free-form version of the client software."""
    previous_connection_id: str = ""
    """The connection id this client had before, when reconnecting (""
    otherwise): lets the server tell a reconnect from a new arrival."""
    max_message_size: Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)] = 0
    """The largest message the client accepts, in bytes (0: not stated). The
    server does not send bigger frames."""


class WelcomeFrame(_FrameBase, tag="welcome", frozen=True):
    """Server to client, the answer to ``hello``: the connection is open."""

    senders = _FROM_SERVER
    connection_id: str
    """Assigned by the server: unique across the cluster, never reused."""
    node_id: Id
    """The node the connection is on."""
    client_id: str = ""
    """The client id the server recorded for this connection."""
    version: Version = PROTOCOL_VERSION
    """The protocol revision both sides use from now on."""
    heartbeat_interval: Seconds = 0.0
    """The server pings every this many seconds (0: no heartbeat)."""
    heartbeat_max_missed: Count = 2
    """How many heartbeat intervals (beyond one) a side may stay silent before the
    other declares it dead: see the heartbeat rules in ``docs/protocol.rst``."""
    max_message_size: Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)] = 0
    """The largest message the server accepts, in bytes (0: not stated)."""
    max_buffered_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)] = 0
    """How many bytes may wait in the server's outgoing queue for this client
    before backpressure applies (0: not stated)."""
    call_timeout: Seconds | None = None
    """The server's default timeout for calls, in seconds (None: none): a client
    may use it as the default for its own."""


class CallFrame(_FrameBase, tag="call", frozen=True):
    """Client to server: call ``name`` with ``data``; answered by ``result`` or ``error``."""

    senders = _FROM_CLIENT
    id: Id
    """Chosen by the client: increasing, never reused on this connection."""
    name: str
    data: Payload = None


class ResultFrame(_FrameBase, tag="result", frozen=True):
    """Server to client: the call (or subscription) ``id`` succeeded."""

    senders = _FROM_SERVER
    id: Id
    data: Payload = None


class ErrorFrame(_FrameBase, tag="error", frozen=True):
    """Server to client: the call (or subscription) ``id`` failed."""

    senders = _FROM_SERVER
    id: Id
    code: str
    """One of :class:`~meshline._sockets._codes.ErrorCode`, or an application's code."""
    message: str = ""
    details: Payload = None
    """Optional structured details (where ``bad_input`` went wrong, say)."""


class EventFrame(_FrameBase, tag="event", frozen=True):
    """Either direction: a one-way event ``name`` with ``data``; never answered."""

    senders = _BOTH
    name: str
    data: Payload = None
    key: str | None = None
    """Coalescing key: under backpressure mode ``latest``, only the newest event
    per key waits in the queue. Only meaningful from the server."""
    topic: str | None = None
    """Server to client only: the topic this event was published to; the client
    receives it because it subscribed. Clients leave it unset."""


class RequestFrame(_FrameBase, tag="request", frozen=True):
    """Server to client: request ``name``; answered by ``reply`` or ``reply_error``."""

    senders = _FROM_SERVER
    id: Id
    """Chosen by the server: increasing, never reused on this connection. A
    separate id space from call ids."""
    name: str
    data: Payload = None
    timeout: Seconds | None = None
    """How long the server waits for the reply, in seconds (None: not stated)."""


class ReplyFrame(_FrameBase, tag="reply", frozen=True):
    """Client to server: the request ``id`` succeeded."""

    senders = _FROM_CLIENT
    id: Id
    data: Payload = None


class ReplyErrorFrame(_FrameBase, tag="reply_error", frozen=True):
    """Client to server: the request ``id`` failed."""

    senders = _FROM_CLIENT
    id: Id
    code: str
    message: str = ""
    details: Payload = None


class CancelFrame(_FrameBase, tag="cancel", frozen=True):
    """Either direction: the sender gave up on its call or request ``id``.

    ``of`` names the id space, and must match the sender: a client cancels its
    own calls (``"call"``), a server its own requests (``"request"``). The other
    side still answers (with an error of code ``cancelled``, or with what it had),
    and the canceller ignores that answer.
    """

    senders = _BOTH
    id: Id
    of: Literal["call", "request"]


class SubscribeFrame(_FrameBase, tag="subscribe", frozen=True):
    """Client to server: subscribe to ``topic``; answered like a call, by
    ``result`` (subscribed) or ``error`` (refused). ``id`` is a call id."""

    senders = _FROM_CLIENT
    id: Id
    topic: str


class UnsubscribeFrame(_FrameBase, tag="unsubscribe", frozen=True):
    """Client to server: leave ``topic`` (also withdraws a subscription not yet
    answered). Server to client: the server ended the subscription. Never answered."""

    senders = _BOTH
    topic: str


class PresenceMember(msgspec.Struct, omit_defaults=True, frozen=True, gc=False):
    """One connection in a room's presence, as ``presence_state`` and
    ``presence_diff`` carry it."""

    connection_id: str
    client_id: str
    node_id: Id
    connected_at: Annotated[float, msgspec.Meta(ge=0.0, le=1e12)] = 0.0
    """When the connection's WebSocket was accepted (Unix time, in seconds)."""
    user_id: str | None = None
    fields: dict[str, Any] = {}
    """The fields of the server's ``describe`` hook it lets watchers see."""


class WatchFrame(_FrameBase, tag="watch", frozen=True):
    """Client to server (revision 2): watch who is in ``room``; answered like a
    call, by ``result`` (then ``presence_state`` follows) or ``error``
    (refused). ``id`` is a call id. Watching a room already watched asks for a
    fresh ``presence_state``."""

    senders = _FROM_CLIENT
    id: Id
    room: str


class UnwatchFrame(_FrameBase, tag="unwatch", frozen=True):
    """Revision 2. Client to server: stop watching ``room`` (also withdraws a
    watch not yet answered). Server to client: the server ended the watch,
    ``code`` says why (``forbidden``: the client may no longer watch the room;
    ``too_large``: a change of it did not fit the client's message limit).
    Never answered."""

    senders = _BOTH
    room: str
    code: str = ""


class PresenceStateFrame(_FrameBase, tag="presence_state", frozen=True):
    """Server to client (revision 2): everyone in ``room`` as of revision ``rev``.

    Sent after a watch is accepted. It replaces whatever the client knew of the
    room; ``presence_diff`` frames numbered up to ``rev`` are already in it."""

    senders = _FROM_SERVER
    room: str
    rev: Id
    members: tuple[PresenceMember, ...] = ()


class PresenceDiffFrame(_FrameBase, tag="presence_diff", frozen=True):
    """Server to client (revision 2): ``room`` changed; its revision is now ``rev``.

    Revisions of a room count up by one per diff on a connection. A diff may
    arrive before the ``presence_state`` it follows: the client keeps it until
    the state is in, then applies the diffs numbered above the state's. Apply
    ``leaves`` (connection ids) first, then ``joins`` (a connection already
    present is updated)."""

    senders = _FROM_SERVER
    room: str
    rev: Id
    joins: tuple[PresenceMember, ...] = ()
    leaves: tuple[str, ...] = ()


class PingFrame(_FrameBase, tag="ping", frozen=True):
    """Either direction: a heartbeat; the receiver answers ``pong`` with the same ``seq``."""

    senders = _BOTH
    seq: Id


class PongFrame(_FrameBase, tag="pong", frozen=True):
    """Either direction: the answer to ``ping`` ``seq``."""

    senders = _BOTH
    seq: Id


Frame: TypeAlias = (
    HelloFrame
    | WelcomeFrame
    | CallFrame
    | ResultFrame
    | ErrorFrame
    | EventFrame
    | RequestFrame
    | ReplyFrame
    | ReplyErrorFrame
    | CancelFrame
    | SubscribeFrame
    | UnsubscribeFrame
    | WatchFrame
    | UnwatchFrame
    | PresenceStateFrame
    | PresenceDiffFrame
    | PingFrame
    | PongFrame
)
"""Every frame kind."""

ClientFrame: TypeAlias = (
    HelloFrame
    | CallFrame
    | EventFrame
    | ReplyFrame
    | ReplyErrorFrame
    | CancelFrame
    | SubscribeFrame
    | UnsubscribeFrame
    | WatchFrame
    | UnwatchFrame
    | PingFrame
    | PongFrame
)
"""The frame kinds a client may send (what a server decodes)."""

ServerFrame: TypeAlias = (
    WelcomeFrame
    | ResultFrame
    | ErrorFrame
    | EventFrame
    | RequestFrame
    | CancelFrame
    | UnsubscribeFrame
    | UnwatchFrame
    | PresenceStateFrame
    | PresenceDiffFrame
    | PingFrame
    | PongFrame
)
"""The frame kinds a server may send (what a client decodes)."""

_FRAMES_BY_SENDER: dict[Side | None, Any] = {
    None: Frame,
    Side.CLIENT: ClientFrame,
    Side.SERVER: ServerFrame,
}

# --- Codecs -----------------------------------------------------------------------

T = TypeVar("T")

_DECODE_FAILURES = (msgspec.DecodeError, RecursionError, UnicodeError)
"""What msgspec raises on bad input: DecodeError (ValidationError included),
RecursionError for nesting deeper than the interpreter's limit, UnicodeError for
text holding lone surrogates."""

_ENCODE_FAILURES = (TypeError, ValueError, OverflowError, RecursionError)
"""What msgspec raises on values it cannot encode (UnicodeError is a ValueError)."""


class Codec:
    """One encoding of the protocol, bound to its WebSocket subprotocol.

    Use the two instances, :data:`MSGPACK` and :data:`JSON`. Each call is a single
    msgspec encode or decode; codecs hold no per-connection state, so one codec
    serves every connection (and a fan-out encodes a frame once per codec).
    """

    subprotocol: str
    """The WebSocket subprotocol that selects this codec."""
    binary: bool
    """Whether messages are binary (``bytes``) or text (``str``)."""

    def __init__(self) -> None:
        self._data_decoders: dict[Any, Any] = {}

    def encode(self, frame: Frame, *, max_size: int = 0) -> Message:
        """The message carrying ``frame``: ``bytes`` for msgpack, ``str`` for JSON.

        :raises FrameEncodeError: the frame's data cannot be encoded.
        :raises PeerLimitExceededError: the encoded frame is over ``max_size``
            bytes (0: no limit).
        """
        raise NotImplementedError

    def decode(self, message: Message, *, max_size: int = 0, sender: Side | None = None) -> Frame:
        """The frame in ``message``.

        ``sender`` restricts the frame kinds to those that side may send (a server
        decodes with ``sender=Side.CLIENT``); ``max_size`` (0: no limit) bounds
        the message's length.

        :raises MalformedFrameError: ``message`` is not a frame this receiver
            accepts (the reason says why; see the class).
        :raises FrameTooLargeError: ``message`` is over ``max_size``.
        """
        raise NotImplementedError

    def encode_data(self, value: object) -> msgspec.Raw:
        """``value`` encoded once, to put in the ``data`` of many frames of this codec.

        :raises FrameEncodeError: ``value`` cannot be encoded.
        """
        raise NotImplementedError

    def decode_data(self, raw: msgspec.Raw | bytes | None, data_type: type[T]) -> T:
        """A received payload (``frame.data``, ``frame.details``) as ``data_type``.

        ``None`` (the field was absent) decodes as null. ``data_type`` is anything
        msgspec accepts as a type (``Any`` included).

        :raises PayloadDecodeError: the payload does not validate against
            ``data_type`` (or is not valid in this encoding).
        """
        decoder = self._data_decoders.get(data_type)
        if decoder is None:
            try:
                decoder = self._make_data_decoder(data_type)
            except TypeError as exc:  # not a type msgspec supports
                raise PayloadDecodeError(f"cannot decode into {data_type!r}: {exc}") from None
            with contextlib.suppress(TypeError):  # unhashable annotation: no caching
                self._data_decoders[data_type] = decoder
        try:
            result: T = decoder.decode(self._null if raw is None else raw)
        except _DECODE_FAILURES as exc:
            raise PayloadDecodeError(str(exc)) from None
        return result

    _null: bytes

    def _make_data_decoder(self, data_type: Any) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Codec {self.subprotocol}>"


def _malformed(
    exc: BaseException, decoder: Any, message: Message, sender: Side | None
) -> Exception:
    """The error for a message that failed to decode; tells a frame kind sent by
    the wrong side from other failures (only on this failure path)."""
    if isinstance(exc, RecursionError):
        return MalformedFrameError("frame nested too deeply")
    if sender is not None:
        try:
            frame = decoder.decode(message)
        except _DECODE_FAILURES:
            pass
        else:
            tag = type(frame).__struct_config__.tag
            return MalformedFrameError(f"a {sender.value} may not send {tag!r} frames")
    return MalformedFrameError(f"malformed frame: {exc}")


class _MsgpackCodec(Codec):
    subprotocol = MSGPACK_SUBPROTOCOL
    binary = True
    _null = b"\xc0"

    def __init__(self) -> None:
        super().__init__()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoders = {
            sender: msgspec.msgpack.Decoder(frames) for sender, frames in _FRAMES_BY_SENDER.items()
        }

    def encode(self, frame: Frame, *, max_size: int = 0) -> Message:
        try:
            encoded = self._encoder.encode(frame)
        except _ENCODE_FAILURES as exc:
            raise FrameEncodeError(f"cannot encode {type(frame).__name__}: {exc}") from None
        if max_size and len(encoded) > max_size:
            raise PeerLimitExceededError(len(encoded), max_size)
        return encoded

    def decode(self, message: Message, *, max_size: int = 0, sender: Side | None = None) -> Frame:
        if isinstance(message, str):
            raise MalformedFrameError(
                "text message on the msgpack subprotocol", CloseCode.UNSUPPORTED_DATA
            )
        if max_size and len(message) > max_size:
            raise FrameTooLargeError(len(message), max_size)
        try:
            frame: Frame = self._decoders[sender].decode(message)
        except _DECODE_FAILURES as exc:
            raise _malformed(exc, self._decoders[None], message, sender) from None
        return frame

    def encode_data(self, value: object) -> msgspec.Raw:
        try:
            return msgspec.Raw(self._encoder.encode(value))
        except _ENCODE_FAILURES as exc:
            raise FrameEncodeError(f"cannot encode data: {exc}") from None

    def _make_data_decoder(self, data_type: Any) -> Any:
        return msgspec.msgpack.Decoder(data_type)


class _JsonCodec(Codec):
    subprotocol = JSON_SUBPROTOCOL
    binary = False
    _null = b"null"

    def __init__(self) -> None:
        super().__init__()
        self._encoder = msgspec.json.Encoder()
        self._decoders = {
            sender: msgspec.json.Decoder(frames) for sender, frames in _FRAMES_BY_SENDER.items()
        }

    def encode(self, frame: Frame, *, max_size: int = 0) -> Message:
        try:
            encoded = self._encoder.encode(frame)
        except _ENCODE_FAILURES as exc:
            raise FrameEncodeError(f"cannot encode {type(frame).__name__}: {exc}") from None
        if max_size and len(encoded) > max_size:
            raise PeerLimitExceededError(len(encoded), max_size)
        return encoded.decode("utf-8")

    def decode(self, message: Message, *, max_size: int = 0, sender: Side | None = None) -> Frame:
        if not isinstance(message, str):
            raise MalformedFrameError(
                "binary message on the JSON subprotocol", CloseCode.UNSUPPORTED_DATA
            )
        if max_size and len(message) > max_size:
            raise FrameTooLargeError(len(message), max_size)
        try:
            frame: Frame = self._decoders[sender].decode(message)
        except _DECODE_FAILURES as exc:
            raise _malformed(exc, self._decoders[None], message, sender) from None
        return frame

    def encode_data(self, value: object) -> msgspec.Raw:
        try:
            return msgspec.Raw(self._encoder.encode(value))
        except _ENCODE_FAILURES as exc:
            raise FrameEncodeError(f"cannot encode data: {exc}") from None

    def _make_data_decoder(self, data_type: Any) -> Any:
        return msgspec.json.Decoder(data_type)


MSGPACK: Codec = _MsgpackCodec()
"""The ``meshline.v1.msgpack`` codec: binary messages."""
JSON: Codec = _JsonCodec()
"""The ``meshline.v1.json`` codec: text messages."""

SUBPROTOCOLS: tuple[str, ...] = (MSGPACK_SUBPROTOCOL, JSON_SUBPROTOCOL)
"""Every subprotocol meshline speaks, msgpack first (what a client offers by default)."""

_CODECS = {codec.subprotocol: codec for codec in (MSGPACK, JSON)}


def select_codec(offered: Iterable[str], supported: Iterable[str] = SUBPROTOCOLS) -> Codec | None:
    """Server side: the codec for the first of the client's ``offered`` subprotocols
    that is in ``supported`` (the client lists them in its order of preference), or
    None when there is none: refuse the upgrade, or close with
    :attr:`~meshline._sockets._codes.CloseCode.UNSUPPORTED_PROTOCOL`."""
    allowed = frozenset(supported)
    for name in offered:
        if name in allowed and name in _CODECS:
            return _CODECS[name]
    return None


def codec_for_subprotocol(subprotocol: str | None) -> Codec:
    """Client side: the codec for the subprotocol the server accepted.

    :raises RemoteProtocolError: the server accepted none, or one meshline does
        not speak (its close code is
        :attr:`~meshline._sockets._codes.CloseCode.UNSUPPORTED_PROTOCOL`).
    """
    codec = _CODECS.get(subprotocol or "")
    if codec is None:
        logger.warning("server accepted subprotocol %r, which meshline does not speak", subprotocol)
        raise RemoteProtocolError(
            f"unsupported subprotocol {subprotocol!r}", CloseCode.UNSUPPORTED_PROTOCOL
        )
    return codec
