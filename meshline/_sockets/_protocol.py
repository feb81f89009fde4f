"""The socket protocol's state machine, one class for both ends: :class:`SocketProtocol`.

Like h11 and wsproto, it does no I/O, reads no clock and imports no async library.
The shell (the trio-websocket server and client built on it) feeds it each
WebSocket message it reads, with the time, and writes out the messages its send
methods return. Everything it knows is in its attributes; tests drive two of them
against each other.

How a shell uses it
    ::

        protocol = SocketProtocol(Side.SERVER, codec, max_message_size=limit)
        ...
        try:
            event = protocol.receive(message, now)
        except RemoteProtocolError as exc:
            await close_websocket(exc.close_code, exc.reason)   # machine is closed
            return
        match event:
            case None: pass                    # nothing for the shell (see below)
            case HelloFrame(): queue(protocol.welcome(conn_id, node_id, now=now, ...))
            case CallFrame(id=id, name=name, data=data): start the handler ...
            case PingFrame(seq=seq): queue(protocol.pong(seq))
            ...

    :meth:`~SocketProtocol.receive` returns the frame that arrived (the frame
    *is* the event), a derived event (:class:`Subscribed`, :class:`SubscribeRefused`,
    :class:`Watching`, :class:`WatchRefused` on the client), or None when the
    frame needs nothing from the shell: an answer to a call the client already
    gave up on, a cancel that came after the answer, an unsubscribe from a topic
    the client was not in, a topic event after the client left the topic,
    presence of a room not watched, anything after close. Those are counted in
    :attr:`~SocketProtocol.counters` and logged at debug level, never errors.

    Pings are not answered automatically: the shell answers ``PingFrame`` with
    :meth:`~SocketProtocol.pong`, through the same outgoing queue as everything
    else (so a client that stops reading also stops answering, and is reaped).

What the events mean, per side
    Server: ``HelloFrame`` (answer with :meth:`~SocketProtocol.welcome`),
    ``CallFrame`` (start the handler; answer exactly once with
    :meth:`~SocketProtocol.result` or :meth:`~SocketProtocol.error`),
    ``SubscribeFrame`` (authorize; answer with
    :meth:`~SocketProtocol.accept_subscribe` or :meth:`~SocketProtocol.error`),
    ``UnsubscribeFrame`` (the client left the topic, or withdrew a subscription
    not yet answered), ``WatchFrame`` (authorize; answer with
    :meth:`~SocketProtocol.accept_watch` or :meth:`~SocketProtocol.error`),
    ``UnwatchFrame`` (the client stopped watching a room, or withdrew a watch
    not yet answered), ``CancelFrame`` (the client gave up on a call: cancel the
    handler, and still answer, usually with error code ``cancelled``),
    ``ReplyFrame`` / ``ReplyErrorFrame`` (the answer to one of the server's
    requests), ``EventFrame``, ``PingFrame``, ``PongFrame``.

    Client: ``WelcomeFrame`` (the connection is open), ``ResultFrame`` /
    ``ErrorFrame`` (the answer to a call), :class:`Subscribed` /
    :class:`SubscribeRefused` (the answer to a subscribe), :class:`Watching` /
    :class:`WatchRefused` (the answer to a watch), ``PresenceStateFrame`` /
    ``PresenceDiffFrame`` (a watched room's presence; they may come before the
    watch's answer), ``RequestFrame`` (run
    the implementation; answer exactly once with :meth:`~SocketProtocol.reply` or
    :meth:`~SocketProtocol.reply_error`), ``CancelFrame`` (the server gave up on a
    request: cancel the implementation, and still answer), ``UnsubscribeFrame``
    (the server ended a subscription), ``EventFrame``, ``PingFrame``,
    ``PongFrame``.

Ids
    Call ids (and subscribe ids, which are call ids) are chosen by the client,
    request ids by the server, each increasing from 1 and never reused on a
    connection; :meth:`~SocketProtocol.call`, :meth:`~SocketProtocol.subscribe`
    and :meth:`~SocketProtocol.request` allocate them. The side that issued an id
    forgets it when the answer arrives or when it cancels
    (:meth:`~SocketProtocol.cancel_call`, :meth:`~SocketProtocol.cancel_request`,
    :meth:`~SocketProtocol.unsubscribe`); the side that received it forgets it when
    it answers. So an answer to a forgotten id (a late result after a timeout or a
    cancel) is ignored, while an answer to an id that was never issued, a second
    call with an id still in progress, or a second request with an id still
    unanswered is a protocol violation.

Heartbeat
    The server pings every ``heartbeat_interval`` seconds from the welcome on
    (:meth:`~SocketProtocol.heartbeat_due`, :meth:`~SocketProtocol.ping`); the
    client only answers. Either side declares the other dead
    (:meth:`~SocketProtocol.is_dead`) once nothing at all has arrived from it for
    ``heartbeat_interval * (heartbeat_max_missed + 1)`` seconds: any frame counts
    as life. :meth:`~SocketProtocol.next_deadline` says when to look again. The
    client learns the interval from the welcome; either side may change it with
    :meth:`~SocketProtocol.configure_heartbeat`.

Fan-out
    An event to many connections is encoded once per codec
    (``codec.encode(EventFrame(...))``) and the same message queued to every
    connection whose machine :attr:`~SocketProtocol.is_open`: events carry no
    per-connection state. Topic events go only to connections whose machine lists
    the topic in :attr:`~SocketProtocol.subscriptions`.

Closing
    :meth:`~SocketProtocol.close` (this side closes, with a code) and
    :meth:`~SocketProtocol.peer_closed` (the WebSocket closed under us) move the
    machine to ``CLOSED``; so does a :class:`RemoteProtocolError` raised by
    :meth:`~SocketProtocol.receive`. From then on, sending raises
    :class:`ProtocolClosedError` and received messages are ignored. The machine
    forgets its pending ids; the shell fails its own waiters.

Errors
    :class:`LocalProtocolError`: this side asked for something the protocol
    forbids (sending before the handshake, answering an id that is not pending);
    nothing changes. :class:`RemoteProtocolError` (with
    :class:`MalformedFrameError` and :class:`FrameTooLargeError`): the peer broke
    the protocol; the machine is closed, and the error carries the close code to
    send. :class:`FrameEncodeError`: data that cannot be encoded; nothing changes.
    A bad *payload* (data that does not fit a handler's input type) is never a
    protocol error: the machine does not look at payloads.

Cancellation: there is nothing to cancel; every method returns at once.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple, NoReturn, TypeAlias

import attrs

from ._codes import CloseCode, ErrorCode, close_reason
from ._frames import (
    MAX_ID,
    PROTOCOL_VERSION,
    CallFrame,
    CancelFrame,
    Codec,
    ErrorFrame,
    EventFrame,
    Frame,
    HelloFrame,
    LocalProtocolError,
    Message,
    PingFrame,
    PongFrame,
    PresenceDiffFrame,
    PresenceMember,
    PresenceStateFrame,
    ProtocolClosedError,
    RemoteProtocolError,
    ReplyErrorFrame,
    ReplyFrame,
    RequestFrame,
    ResultFrame,
    Side,
    SubscribeFrame,
    UnsubscribeFrame,
    UnwatchFrame,
    WatchFrame,
    WelcomeFrame,
)

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_MAX_MISSED",
    "Event",
    "IgnoredFrames",
    "ProtocolState",
    "SocketProtocol",
    "SubscribeAnswer",
    "SubscribeRefused",
    "Subscribed",
    "WatchAnswer",
    "WatchRefused",
    "Watching",
]

logger = logging.getLogger("meshline.sockets")

DEFAULT_HEARTBEAT_INTERVAL = 25.0
"""Seconds between the server's pings (the convention of Socket.IO and Centrifuge)."""
DEFAULT_HEARTBEAT_MAX_MISSED = 2
"""How many intervals, beyond one, a side may stay silent before it is declared dead."""

_MAX_SECONDS = 1e9


class ProtocolState(enum.Enum):
    """Where a :class:`SocketProtocol` is in a connection's life."""

    START = "start"
    """Nothing exchanged yet: the client has not sent ``hello`` (server: not received it)."""
    HELLO = "hello"
    """``hello`` went out (server: came in); ``welcome`` is awaited (server: owed)."""
    OPEN = "open"
    """The handshake is done: calls, events, requests and heartbeats flow."""
    CLOSED = "closed"
    """Closed by either side, or by a protocol violation. Nothing is sent any more."""


@attrs.frozen
class Subscribed:
    """Client side: the server accepted the subscription ``id`` to ``topic``."""

    id: int
    topic: str


@attrs.frozen
class SubscribeRefused:
    """Client side: the server refused the subscription ``id`` to ``topic``.

    ``details`` is the error frame's raw details (decode with the codec), or None.
    """

    id: int
    topic: str
    code: str
    message: str
    details: Any = None


@attrs.frozen
class Watching:
    """Client side: the server accepted the watch ``id`` of ``room``; its
    ``presence_state`` follows."""

    id: int
    room: str


@attrs.frozen
class WatchRefused:
    """Client side: the server refused the watch ``id`` of ``room``.

    ``details`` is the error frame's raw details (decode with the codec), or None.
    """

    id: int
    room: str
    code: str
    message: str
    details: Any = None


Event: TypeAlias = Frame | Subscribed | SubscribeRefused | Watching | WatchRefused
"""What :meth:`SocketProtocol.receive` returns (besides None)."""


@attrs.frozen
class _WatchOf:
    """What a pending watch waits for, in the table of pending calls (a topic
    string stands for a subscribe, None for a call)."""

    room: str


class WatchAnswer(NamedTuple):
    """What :meth:`SocketProtocol.accept_watch` returns."""

    watching: bool
    """True if the room is now watched; False if the client withdrew the watch
    meanwhile (``messages`` then answers it with error code ``cancelled``)."""
    messages: tuple[Message, ...]
    """The messages to send, in order: the answer, then the room's state."""


class SubscribeAnswer(NamedTuple):
    """What :meth:`SocketProtocol.accept_subscribe` returns."""

    subscribed: bool
    """True if the subscription is now active; False if the client withdrew it
    meanwhile (``message`` then answers it with error code ``cancelled``)."""
    message: Message
    """The message to send."""


@attrs.define
class IgnoredFrames:
    """Counts of frames that arrived well-formed but needed nothing (see the module)."""

    late_answers: int = 0
    """Results, errors, replies and reply errors for ids this side had forgotten
    (after a cancel, a timeout, or an unsubscribe from a pending subscription)."""
    late_cancels: int = 0
    """Cancels of ids already answered."""
    unknown_unsubscribes: int = 0
    """Unsubscribes from topics that were neither subscribed nor pending."""
    unsubscribed_events: int = 0
    """Client side: topic events for topics the client is not subscribed to."""
    unwatched_presence: int = 0
    """Client side: presence frames of rooms the client does not watch; server
    side: unwatches of rooms it did not watch."""
    after_close: int = 0
    """Messages received after the machine closed."""


_MISSING: Any = object()


_Receiver: TypeAlias = "Callable[[SocketProtocol, Any], Event | None]"


class SocketProtocol:
    """One end of one connection of meshline's socket protocol (see the module).

    ``side`` is which end this is; ``codec`` the encoding the subprotocol chose;
    ``max_message_size`` the largest message this side accepts, in bytes (0: no
    limit), sent to the peer in the handshake.
    """

    def __init__(self, side: Side | str, codec: Codec, *, max_message_size: int = 0) -> None:
        self.side = Side(side)
        self._peer = self.side.peer
        self.codec = codec
        if not 0 <= max_message_size <= MAX_ID:
            raise ValueError(f"max_message_size must be between 0 and 2**53-1: {max_message_size}")
        self.max_message_size = max_message_size
        """The largest message this side accepts (0: no limit)."""
        self.peer_max_message_size = 0
        """The largest message the peer accepts, from its hello or welcome (0: not stated)."""
        self.state = ProtocolState.START
        self.hello_frame: HelloFrame | None = None
        """The hello: received (server) or sent (client)."""
        self.welcome_frame: WelcomeFrame | None = None
        """The welcome: sent (server) or received (client)."""
        self.counters = IgnoredFrames()
        self.close_code: int | None = None
        """Set on close: the code sent (:meth:`close`, a protocol violation) or
        received (:meth:`peer_closed`)."""
        self.close_reason = ""
        self.closed_by_peer = False
        """Whether the peer closed first (:meth:`peer_closed`)."""

        self.heartbeat_interval = 0.0
        """Seconds between pings (0: heartbeat off)."""
        self.heartbeat_max_missed = DEFAULT_HEARTBEAT_MAX_MISSED
        self.sends_pings = False
        """Whether :meth:`heartbeat_due` schedules pings from this side (the server does)."""
        self.last_received_at: float | None = None
        """When the last frame (any frame) arrived, or when the heartbeat started."""
        self.last_ping_at: float | None = None
        """When this side last sent a ping."""
        self.last_pong_at: float | None = None
        """When this side last received a pong."""
        self.round_trip_time: float | None = None
        """From this side's last ping to its pong, when that pong came."""
        self._ping_clock = 0.0
        self._ping_seq = 0

        self._last_call_id = 0
        self._last_request_id = 0
        self._calls: dict[int, str | _WatchOf | None] = {}
        """Pending calls: the client's (sent, unanswered) or the server's (received,
        unanswered). The value is the topic of a subscribe, the room of a watch,
        None for a call."""
        self._requests: dict[int, None] = {}
        """Pending requests: the server's (sent) or the client's (received)."""
        self._withdrawn: dict[int, None] = {}
        """Server side: pending subscribes the client withdrew (cancel, unsubscribe)."""
        self._subscriptions: dict[str, None] = {}
        self._watches: dict[str, None] = {}

        self._receivers: dict[type[Any], _Receiver] = _NO_RECEIVERS
        self._set_state(ProtocolState.START)

    # --- Introspection -------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Whether the handshake is done and the machine is not closed."""
        return self.state is ProtocolState.OPEN

    @property
    def subscriptions(self) -> frozenset[str]:
        """Topics subscribed and acknowledged (on both sides)."""
        return frozenset(self._subscriptions)

    @property
    def watches(self) -> frozenset[str]:
        """Rooms whose presence is watched, the watch acknowledged (on both sides)."""
        return frozenset(self._watches)

    def is_watching(self, room: str) -> bool:
        """Whether ``room`` is in :attr:`watches` (without building the set)."""
        return room in self._watches

    @property
    def pending_calls(self) -> frozenset[int]:
        """Ids of calls and subscribes sent (client) or received (server) and not answered."""
        return frozenset(self._calls)

    @property
    def pending_requests(self) -> frozenset[int]:
        """Ids of requests sent (server) or received (client) and not answered."""
        return frozenset(self._requests)

    def __repr__(self) -> str:
        return (
            f"<SocketProtocol {self.side.value} {self.codec.subprotocol} {self.state.value}"
            f" calls={len(self._calls)} requests={len(self._requests)}>"
        )

    # --- Receiving -----------------------------------------------------------------

    def receive(self, message: Message, now: float) -> Event | None:
        """Take in one WebSocket message that arrived at ``now``; say what it means.

        Returns the frame, a derived event, or None (the frame needed nothing; see
        the module). Any frame, even one ignored, counts as a sign of life.

        :raises RemoteProtocolError: the message broke the protocol (malformed,
            too large, out of order, a duplicate or invented id); the machine is
            now closed, and the error carries the close code and reason to send.
        """
        if self.state is ProtocolState.CLOSED:
            self.counters.after_close += 1
            logger.debug("%s: message after close ignored", self.side.value)
            return None
        try:
            frame = self.codec.decode(message, max_size=self.max_message_size, sender=self._peer)
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise
        self.last_received_at = now
        receiver = self._receivers.get(type(frame))
        if receiver is None:
            self._violation(self._unexpected(frame))
        event: Event | None = receiver(self, frame)
        return event

    def _unexpected(self, frame: Frame) -> str:
        tag = type(frame).__struct_config__.tag
        if self.state is ProtocolState.START:
            if self.side is Side.SERVER:
                return f"expected hello first, got {tag!r}"
            return f"got {tag!r} before sending hello"
        if self.state is ProtocolState.HELLO:
            if self.side is Side.SERVER:
                return f"got {tag!r} before the welcome was sent"
            return f"expected welcome, got {tag!r}"
        return f"unexpected {tag!r} on an open connection"

    def _fail(self, exc: RemoteProtocolError) -> None:
        logger.warning(
            "protocol violation by the %s (closing with %d): %s",
            self._peer.value,
            exc.close_code,
            exc,
        )
        self.close(exc.close_code, exc.reason)

    def _violation(self, message: str, code: CloseCode = CloseCode.PROTOCOL_ERROR) -> NoReturn:
        error = RemoteProtocolError(message, code)
        self._fail(error)
        raise error

    def _ignored(self, what: str) -> None:
        logger.debug("%s: ignored %s", self.side.value, what)

    # Server side.

    def _receive_hello(self, frame: HelloFrame) -> Event:
        self.hello_frame = frame
        self.peer_max_message_size = frame.max_message_size
        self._set_state(ProtocolState.HELLO)
        return frame

    def _receive_call(self, frame: CallFrame) -> Event:
        if frame.id in self._calls:
            self._violation(f"call id {frame.id} is already in progress")
        self._calls[frame.id] = None
        return frame

    def _receive_subscribe(self, frame: SubscribeFrame) -> Event:
        if frame.id in self._calls:
            self._violation(f"call id {frame.id} is already in progress")
        self._calls[frame.id] = frame.topic
        return frame

    def _withdraw(self, active: dict[str, None], name: str, pending: str | _WatchOf) -> bool:
        """Server side: the client left ``name`` (a topic or a watched room): drop
        it from ``active`` and mark its pending subscribes or watches withdrawn.
        Whether anything changed."""
        changed = name in active
        active.pop(name, None)
        for call_id, waits_for in self._calls.items():
            if waits_for == pending and call_id not in self._withdrawn:
                self._withdrawn[call_id] = None
                changed = True
        return changed

    def _receive_unsubscribe_at_server(self, frame: UnsubscribeFrame) -> Event | None:
        topic = frame.topic
        if not self._withdraw(self._subscriptions, topic, topic):
            self.counters.unknown_unsubscribes += 1
            self._ignored(f"unsubscribe from {topic!r}, not subscribed")
            return None
        return frame

    def _receive_watch(self, frame: WatchFrame) -> Event:
        if frame.id in self._calls:
            self._violation(f"call id {frame.id} is already in progress")
        self._calls[frame.id] = _WatchOf(frame.room)
        return frame

    def _receive_unwatch_at_server(self, frame: UnwatchFrame) -> Event | None:
        room = frame.room
        if not self._withdraw(self._watches, room, _WatchOf(room)):
            self.counters.unwatched_presence += 1
            self._ignored(f"unwatch of {room!r}, not watched")
            return None
        return frame

    def _receive_cancel_at_server(self, frame: CancelFrame) -> Event | None:
        if frame.of != "call":
            self._violation(f"a client may only cancel its calls, not a {frame.of!r}")
        topic = self._calls.get(frame.id, _MISSING)
        if topic is _MISSING:
            self.counters.late_cancels += 1
            self._ignored(f"cancel of call {frame.id}, not pending")
            return None
        if topic is not None:
            self._withdrawn[frame.id] = None
        return frame

    def _receive_reply(self, frame: ReplyFrame | ReplyErrorFrame) -> Event | None:
        if frame.id in self._requests:
            del self._requests[frame.id]
            return frame
        if 0 < frame.id <= self._last_request_id:
            self.counters.late_answers += 1
            self._ignored(f"reply to request {frame.id}, no longer pending")
            return None
        self._violation(f"reply to request {frame.id}, which was never sent")

    # Client side.

    def _receive_welcome(self, frame: WelcomeFrame) -> Event:
        if frame.version > self._hello_version:
            self._violation(
                f"welcome names protocol revision {frame.version}, above the hello's",
                CloseCode.UNSUPPORTED_PROTOCOL,
            )
        self.welcome_frame = frame
        self.peer_max_message_size = frame.max_message_size
        self._set_state(ProtocolState.OPEN)
        assert self.last_received_at is not None
        self.configure_heartbeat(
            frame.heartbeat_interval,
            frame.heartbeat_max_missed,
            sends_pings=False,
            now=self.last_received_at,
        )
        return frame

    def _receive_answer(self, frame: ResultFrame | ErrorFrame) -> Event | None:
        topic = self._calls.pop(frame.id, _MISSING)
        if topic is None:
            return frame
        if topic is _MISSING:
            if 0 < frame.id <= self._last_call_id:
                self.counters.late_answers += 1
                self._ignored(f"answer to call {frame.id}, no longer pending")
                return None
            self._violation(f"answer to call {frame.id}, which was never sent")
        if isinstance(topic, _WatchOf):
            if isinstance(frame, ResultFrame):
                self._watches[topic.room] = None
                return Watching(frame.id, topic.room)
            return WatchRefused(frame.id, topic.room, frame.code, frame.message, frame.details)
        if isinstance(frame, ResultFrame):
            self._subscriptions[topic] = None
            return Subscribed(frame.id, topic)
        return SubscribeRefused(frame.id, topic, frame.code, frame.message, frame.details)

    def _receive_request(self, frame: RequestFrame) -> Event:
        if frame.id in self._requests:
            self._violation(f"request id {frame.id} is already awaiting a reply")
        self._requests[frame.id] = None
        return frame

    def _receive_cancel_at_client(self, frame: CancelFrame) -> Event | None:
        if frame.of != "request":
            self._violation(f"a server may only cancel its requests, not a {frame.of!r}")
        if frame.id not in self._requests:
            self.counters.late_cancels += 1
            self._ignored(f"cancel of request {frame.id}, not pending")
            return None
        return frame

    def _receive_event_at_client(self, frame: EventFrame) -> Event | None:
        if frame.topic is not None and frame.topic not in self._subscriptions:
            self.counters.unsubscribed_events += 1
            self._ignored(f"event on topic {frame.topic!r}, not subscribed")
            return None
        return frame

    def _receive_unsubscribe_at_client(self, frame: UnsubscribeFrame) -> Event | None:
        if frame.topic not in self._subscriptions:
            self.counters.unknown_unsubscribes += 1
            self._ignored(f"end of subscription to {frame.topic!r}, not subscribed")
            return None
        del self._subscriptions[frame.topic]
        return frame

    def _receive_unwatch_at_client(self, frame: UnwatchFrame) -> Event | None:
        if frame.room not in self._watches:
            self.counters.unwatched_presence += 1
            self._ignored(f"end of the watch of {frame.room!r}, not watched")
            return None
        del self._watches[frame.room]
        return frame

    def _receive_presence(self, frame: PresenceStateFrame | PresenceDiffFrame) -> Event | None:
        room = frame.room
        if room not in self._watches and _WatchOf(room) not in self._calls.values():
            self.counters.unwatched_presence += 1
            self._ignored(f"presence of {room!r}, not watched")
            return None
        return frame

    # Both sides.

    def _receive_as_is(self, frame: Frame) -> Event:
        return frame

    def _receive_pong(self, frame: PongFrame) -> Event:
        now = self.last_received_at
        assert now is not None
        if frame.seq == self._ping_seq and self.last_ping_at is not None:
            self.round_trip_time = now - self.last_ping_at
        self.last_pong_at = now
        return frame

    def _set_state(self, state: ProtocolState) -> None:
        self.state = state
        self._receivers = _RECEIVERS.get((self.side, state), _NO_RECEIVERS)

    @property
    def _hello_version(self) -> int:
        return self.hello_frame.version if self.hello_frame is not None else PROTOCOL_VERSION

    # --- Sending: checks -----------------------------------------------------------

    def _local_error(self, message: str) -> LocalProtocolError:
        logger.debug("%s: refused to send: %s", self.side.value, message)
        if self.state is ProtocolState.CLOSED:
            return ProtocolClosedError(f"{message}: the protocol is closed")
        return LocalProtocolError(message)

    def _require(self, side: Side, state: ProtocolState, what: str) -> None:
        if self.side is not side:
            raise self._local_error(f"a {self.side.value} cannot send {what}")
        if self.state is not state:
            if self.state is ProtocolState.CLOSED:
                raise self._local_error(f"cannot send {what}")
            raise self._local_error(f"cannot send {what} in state {self.state.value}")

    def _require_open(self, what: str) -> None:
        if self.state is not ProtocolState.OPEN:
            if self.state is ProtocolState.CLOSED:
                raise self._local_error(f"cannot send {what}")
            raise self._local_error(f"cannot send {what} before the handshake is done")

    def _check_seconds(self, name: str, value: float | None) -> None:
        if value is not None and not 0 <= value <= _MAX_SECONDS:  # NaN fails too
            raise self._local_error(f"{name} must be between 0 and {_MAX_SECONDS:g} s: {value!r}")

    def _check_id(self, name: str, value: int, low: int = 0) -> None:
        if not low <= value <= MAX_ID:
            raise self._local_error(f"{name} must be between {low} and 2**53-1: {value!r}")

    def _encode(self, frame: Frame) -> Message:
        return self.codec.encode(frame, max_size=self.peer_max_message_size)

    # --- Sending: handshake --------------------------------------------------------

    def hello(
        self,
        client_id: str = "",
        *,
        client_name: str = "",
        client_version: str = "",
        previous_connection_id: str = "",
        version: int = PROTOCOL_VERSION,
    ) -> Message:
        """Client: the hello that opens the connection (first thing sent).

        :raises LocalProtocolError: not a client, or hello already sent.
        :raises FrameEncodeError: a string holds lone surrogates.
        """
        self._require(Side.CLIENT, ProtocolState.START, "hello")
        self._check_id("version", version, low=1)
        frame = HelloFrame(
            version=version,
            client_id=client_id,
            client_name=client_name,
            client_version=client_version,
            previous_connection_id=previous_connection_id,
            max_message_size=self.max_message_size,
        )
        message = self._encode(frame)
        self.hello_frame = frame
        self._set_state(ProtocolState.HELLO)
        return message

    def welcome(
        self,
        connection_id: str,
        node_id: int,
        *,
        now: float,
        client_id: str | None = None,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_max_missed: int = DEFAULT_HEARTBEAT_MAX_MISSED,
        max_buffered_bytes: int = 0,
        call_timeout: float | None = None,
    ) -> Message:
        """Server: the welcome that answers the hello; the connection is then open.

        ``client_id`` defaults to the hello's. The heartbeat starts at ``now``
        with this side pinging (``heartbeat_interval`` 0 turns it off). The
        revision is the lower of the hello's and :data:`PROTOCOL_VERSION`.

        :raises LocalProtocolError: not a server, no hello received, welcome
            already sent, or a number out of range.
        :raises FrameEncodeError: a string holds lone surrogates.
        """
        self._require(Side.SERVER, ProtocolState.HELLO, "welcome")
        self._check_id("node_id", node_id)
        self._check_id("max_buffered_bytes", max_buffered_bytes)
        self._check_seconds("heartbeat_interval", heartbeat_interval)
        self._check_seconds("call_timeout", call_timeout)
        if not 1 <= heartbeat_max_missed <= 1_000_000:
            raise self._local_error(
                f"heartbeat_max_missed must be between 1 and 1e6: {heartbeat_max_missed}"
            )
        frame = WelcomeFrame(
            connection_id=connection_id,
            node_id=node_id,
            client_id=self._hello_client_id if client_id is None else client_id,
            version=min(self._hello_version, PROTOCOL_VERSION),
            heartbeat_interval=heartbeat_interval,
            heartbeat_max_missed=heartbeat_max_missed,
            max_message_size=self.max_message_size,
            max_buffered_bytes=max_buffered_bytes,
            call_timeout=call_timeout,
        )
        message = self._encode(frame)
        self.welcome_frame = frame
        self._set_state(ProtocolState.OPEN)
        self.configure_heartbeat(
            heartbeat_interval, heartbeat_max_missed, sends_pings=True, now=now
        )
        return message

    @property
    def _hello_client_id(self) -> str:
        return self.hello_frame.client_id if self.hello_frame is not None else ""

    # --- Sending: calls (client to server) -----------------------------------------

    def call(self, name: str, data: object = None) -> tuple[int, Message]:
        """Client: call ``name`` with ``data``; returns the new call id and the message.

        :raises LocalProtocolError: not a client, or not open.
        :raises FrameEncodeError: ``data`` cannot be encoded.
        :raises PeerLimitExceededError: the call is bigger than the server accepts.
        """
        self._require(Side.CLIENT, ProtocolState.OPEN, "a call")
        call_id = self._last_call_id + 1
        message = self._encode(CallFrame(call_id, name, data))
        self._last_call_id = call_id
        self._calls[call_id] = None
        return call_id, message

    def cancel_call(self, call_id: int) -> Message | None:
        """Client: give up on call ``call_id`` (a timeout, the caller cancelled).

        Returns the cancel to send, or None when the call is no longer pending
        (its answer already came): nothing to send. The call is forgotten at
        once; its answer, if it still comes, is ignored. A pending subscribe is
        withdrawn with :meth:`unsubscribe` instead.

        :raises LocalProtocolError: not a client, not open, or ``call_id`` is a
            pending subscribe.
        """
        self._require(Side.CLIENT, ProtocolState.OPEN, "a cancel")
        topic = self._calls.get(call_id, _MISSING)
        if topic is _MISSING:
            return None
        if isinstance(topic, _WatchOf):
            raise self._local_error(
                f"call {call_id} is a watch of {topic.room!r}: withdraw it with unwatch"
            )
        if topic is not None:
            raise self._local_error(
                f"call {call_id} is a subscribe to {topic!r}: withdraw it with unsubscribe"
            )
        message = self._encode(CancelFrame(call_id, "call"))
        del self._calls[call_id]
        return message

    def result(self, call_id: int, data: object = None) -> Message:
        """Server: answer call ``call_id`` with ``data`` (also after a cancel).

        :raises LocalProtocolError: not a server, not open, ``call_id`` not
            pending (answered already), or it is a subscribe (use
            :meth:`accept_subscribe`).
        :raises FrameEncodeError: ``data`` cannot be encoded.
        :raises PeerLimitExceededError: the result is bigger than the client
            accepts; the call is still pending, so answer it with an error.
        """
        self._require(Side.SERVER, ProtocolState.OPEN, "a result")
        topic = self._calls.get(call_id, _MISSING)
        if topic is _MISSING:
            raise self._local_error(f"call {call_id} is not pending")
        if isinstance(topic, _WatchOf):
            raise self._local_error(f"call {call_id} is a watch: use accept_watch")
        if topic is not None:
            raise self._local_error(f"call {call_id} is a subscribe: use accept_subscribe")
        message = self._encode(ResultFrame(call_id, data))
        del self._calls[call_id]
        return message

    def error(self, call_id: int, code: str, message: str = "", details: object = None) -> Message:
        """Server: answer call (or subscribe) ``call_id`` with an error.

        ``code`` is an :class:`~meshline._sockets._codes.ErrorCode` or the
        application's own. For a subscribe, this refuses it.

        :raises LocalProtocolError: not a server, not open, or ``call_id`` not pending.
        :raises FrameEncodeError: ``details`` cannot be encoded.
        :raises PeerLimitExceededError: the error is bigger than the client accepts.
        """
        self._require(Side.SERVER, ProtocolState.OPEN, "an error")
        if call_id not in self._calls:
            raise self._local_error(f"call {call_id} is not pending")
        encoded = self._encode(ErrorFrame(call_id, code, message, details))
        del self._calls[call_id]
        self._withdrawn.pop(call_id, None)
        return encoded

    # --- Sending: subscriptions ----------------------------------------------------

    def subscribe(self, topic: str) -> tuple[int, Message]:
        """Client: subscribe to ``topic``; returns the subscribe's call id and the message.

        The answer arrives as :class:`Subscribed` or :class:`SubscribeRefused`.
        A subscribe that is already pending or active is sent again all the same
        (the server treats it as any other).

        :raises LocalProtocolError: not a client, or not open.
        """
        self._require(Side.CLIENT, ProtocolState.OPEN, "a subscribe")
        call_id = self._last_call_id + 1
        message = self._encode(SubscribeFrame(call_id, topic))
        self._last_call_id = call_id
        self._calls[call_id] = topic
        return call_id, message

    def unsubscribe(self, topic: str) -> Message:
        """Client: leave ``topic``, or withdraw its pending subscribes.

        The topic leaves :attr:`subscriptions` at once; answers to its pending
        subscribes, and its events still on the way, are ignored. Always returns
        a message (the server ignores an unsubscribe from a topic it does not have).

        :raises LocalProtocolError: not a client, or not open.
        """
        self._require(Side.CLIENT, ProtocolState.OPEN, "an unsubscribe")
        message = self._encode(UnsubscribeFrame(topic))
        self._subscriptions.pop(topic, None)
        for call_id in [key for key, pending in self._calls.items() if pending == topic]:
            del self._calls[call_id]
        return message

    def accept_subscribe(self, call_id: int) -> SubscribeAnswer:
        """Server: accept the pending subscribe ``call_id``.

        The topic joins :attr:`subscriptions` and the answer is a result; unless
        the client withdrew the subscribe meanwhile (a later unsubscribe or a
        cancel), in which case the answer is an error of code ``cancelled`` and
        the topic stays out. Check :attr:`SubscribeAnswer.subscribed`.

        :raises LocalProtocolError: not a server, not open, or ``call_id`` is not
            a pending subscribe.
        """
        self._require(Side.SERVER, ProtocolState.OPEN, "a subscribe's answer")
        topic = self._calls.get(call_id)
        if not isinstance(topic, str):
            raise self._local_error(f"call {call_id} is not a pending subscribe")
        if call_id in self._withdrawn:
            message = self._encode(
                ErrorFrame(call_id, ErrorCode.CANCELLED, "withdrawn by the client")
            )
            del self._withdrawn[call_id]
            del self._calls[call_id]
            return SubscribeAnswer(False, message)
        message = self._encode(ResultFrame(call_id))
        del self._calls[call_id]
        self._subscriptions[topic] = None
        return SubscribeAnswer(True, message)

    def end_subscription(self, topic: str) -> Message:
        """Server: end the client's subscription to ``topic`` (revoked, topic gone).

        :raises LocalProtocolError: not a server, not open, or not subscribed.
        """
        self._require(Side.SERVER, ProtocolState.OPEN, "an unsubscribe")
        if topic not in self._subscriptions:
            raise self._local_error(f"not subscribed to {topic!r}")
        message = self._encode(UnsubscribeFrame(topic))
        del self._subscriptions[topic]
        return message

    # --- Sending: room presence (revision 2) ----------------------------------------

    def watch(self, room: str) -> tuple[int, Message]:
        """Client: watch who is in ``room``; returns the watch's call id and the message.

        The answer arrives as :class:`Watching` (then a ``presence_state``) or
        :class:`WatchRefused`. Watching a room already watched asks for a fresh
        state.

        :raises LocalProtocolError: not a client, not open, or the server speaks
            revision 1 (no room presence).
        """
        self._require(Side.CLIENT, ProtocolState.OPEN, "a watch")
        self._require_presence()
        call_id = self._last_call_id + 1
        message = self._encode(WatchFrame(call_id, room))
        self._last_call_id = call_id
        self._calls[call_id] = _WatchOf(room)
        return call_id, message

    def _require_presence(self) -> None:
        """:raises LocalProtocolError: the server speaks revision 1 (no room presence)."""
        assert self.welcome_frame is not None
        if self.welcome_frame.version < 2:
            raise self._local_error(
                f"the server speaks protocol revision {self.welcome_frame.version}, "
                "which has no room presence (revision 2 does)"
            )

    def unwatch(self, room: str) -> Message:
        """Client: stop watching ``room``, or withdraw its pending watches.

        The room leaves :attr:`watches` at once; answers to its pending watches,
        and its presence frames still on the way, are ignored.

        :raises LocalProtocolError: not a client, not open, or the server speaks
            revision 1 (no room presence: nothing was watched).
        """
        self._require(Side.CLIENT, ProtocolState.OPEN, "an unwatch")
        self._require_presence()
        message = self._encode(UnwatchFrame(room))
        self._watches.pop(room, None)
        pending = _WatchOf(room)
        for call_id in [key for key, waits_for in self._calls.items() if waits_for == pending]:
            del self._calls[call_id]
        return message

    def watch_pending(self, room: str) -> bool:
        """Client: whether a watch of ``room`` waits for its answer."""
        return _WatchOf(room) in self._calls.values()

    def end_watch(self, room: str, code: str) -> Message:
        """Server: end the client's watch of ``room``, for the reason ``code`` (an
        error code: ``forbidden``, ``too_large``...). The room leaves
        :attr:`watches` at once.

        :raises LocalProtocolError: not a server, not open, or not watched.
        """
        self._require(Side.SERVER, ProtocolState.OPEN, "an unwatch")
        if room not in self._watches:
            raise self._local_error(f"not watching {room!r}")
        message = self._encode(UnwatchFrame(room, code))
        del self._watches[room]
        return message

    def accept_watch(
        self, call_id: int, rev: int, members: tuple[PresenceMember, ...]
    ) -> WatchAnswer:
        """Server: accept the pending watch ``call_id``, with the room's state
        as of revision ``rev``.

        The room joins :attr:`watches`, and the messages are the result and the
        ``presence_state``; unless the client withdrew the watch meanwhile, in
        which case the one message is an error of code ``cancelled``. Later
        diffs go to every watcher at once, encoded once per codec
        (``codec.encode(PresenceDiffFrame(...))``), to connections whose machine
        :meth:`is_watching` the room.

        :raises LocalProtocolError: not a server, not open, ``call_id`` is not
            a pending watch, or ``rev`` is out of range.
        :raises FrameEncodeError: a member's fields cannot be encoded (the
            watch is still pending: answer it with an error).
        :raises PeerLimitExceededError: the state is bigger than the client
            accepts (the watch is still pending).
        """
        self._require(Side.SERVER, ProtocolState.OPEN, "a watch's answer")
        pending = self._calls.get(call_id)
        if not isinstance(pending, _WatchOf):
            raise self._local_error(f"call {call_id} is not a pending watch")
        self._check_id("rev", rev)
        if call_id in self._withdrawn:
            message = self._encode(
                ErrorFrame(call_id, ErrorCode.CANCELLED, "withdrawn by the client")
            )
            del self._withdrawn[call_id]
            del self._calls[call_id]
            return WatchAnswer(False, (message,))
        state = self._encode(PresenceStateFrame(pending.room, rev, members))
        answer = self._encode(ResultFrame(call_id))
        del self._calls[call_id]
        self._watches[pending.room] = None
        return WatchAnswer(True, (answer, state))

    # --- Sending: requests (server to client) --------------------------------------

    def request(
        self, name: str, data: object = None, *, timeout: float | None = None
    ) -> tuple[int, Message]:
        """Server: request ``name`` of the client; returns the new request id and the message.

        ``timeout`` tells the client how long the server waits (the server
        enforces it itself, and sends :meth:`cancel_request` when it runs out).

        :raises LocalProtocolError: not a server, not open, or a bad timeout.
        :raises FrameEncodeError: ``data`` cannot be encoded.
        :raises PeerLimitExceededError: the request is bigger than the client accepts.
        """
        self._require(Side.SERVER, ProtocolState.OPEN, "a request")
        self._check_seconds("timeout", timeout)
        request_id = self._last_request_id + 1
        message = self._encode(RequestFrame(request_id, name, data, timeout))
        self._last_request_id = request_id
        self._requests[request_id] = None
        return request_id, message

    def cancel_request(self, request_id: int) -> Message | None:
        """Server: give up on request ``request_id``; returns the cancel to send,
        or None when its answer already came. Its answer, if it still comes, is
        ignored.

        :raises LocalProtocolError: not a server, or not open.
        """
        self._require(Side.SERVER, ProtocolState.OPEN, "a cancel")
        if request_id not in self._requests:
            return None
        message = self._encode(CancelFrame(request_id, "request"))
        del self._requests[request_id]
        return message

    def reply(self, request_id: int, data: object = None) -> Message:
        """Client: answer request ``request_id`` with ``data`` (also after a cancel).

        :raises LocalProtocolError: not a client, not open, or not pending.
        :raises FrameEncodeError: ``data`` cannot be encoded.
        :raises PeerLimitExceededError: the reply is bigger than the server
            accepts; the request is still pending, so answer with an error.
        """
        self._require(Side.CLIENT, ProtocolState.OPEN, "a reply")
        if request_id not in self._requests:
            raise self._local_error(f"request {request_id} is not pending")
        message = self._encode(ReplyFrame(request_id, data))
        del self._requests[request_id]
        return message

    def reply_error(
        self, request_id: int, code: str, message: str = "", details: object = None
    ) -> Message:
        """Client: answer request ``request_id`` with an error.

        :raises LocalProtocolError: not a client, not open, or not pending.
        :raises FrameEncodeError: ``details`` cannot be encoded.
        """
        self._require(Side.CLIENT, ProtocolState.OPEN, "a reply error")
        if request_id not in self._requests:
            raise self._local_error(f"request {request_id} is not pending")
        encoded = self._encode(ReplyErrorFrame(request_id, code, message, details))
        del self._requests[request_id]
        return encoded

    # --- Sending: events and heartbeats --------------------------------------------

    def emit(
        self, name: str, data: object = None, *, key: str | None = None, topic: str | None = None
    ) -> Message:
        """Either side: the event ``name`` with ``data``.

        ``key`` is the coalescing key for backpressure ``latest``; ``topic``
        (server only) marks an event published to a topic the client subscribed to.

        :raises LocalProtocolError: not open; a client with a topic; a server with
            a topic the client is not subscribed to.
        :raises FrameEncodeError: ``data`` cannot be encoded.
        :raises PeerLimitExceededError: the event is bigger than the peer accepts.
        """
        self._require_open("an event")
        if topic is not None:
            if self.side is Side.CLIENT:
                raise self._local_error("a client cannot send an event on a topic")
            if topic not in self._subscriptions:
                raise self._local_error(f"the client is not subscribed to {topic!r}")
        return self._encode(EventFrame(name, data, key, topic))

    def ping(self, now: float) -> Message:
        """Either side: a ping, sent at ``now`` (the server, when :meth:`heartbeat_due`).

        :raises LocalProtocolError: not open.
        """
        self._require_open("a ping")
        seq = self._ping_seq + 1
        message = self._encode(PingFrame(seq))
        self._ping_seq = seq
        self.last_ping_at = self._ping_clock = now
        return message

    def pong(self, seq: int) -> Message:
        """Either side: the answer to the ping ``seq``.

        :raises LocalProtocolError: not open, or ``seq`` out of range.
        """
        self._require_open("a pong")
        self._check_id("seq", seq)
        return self._encode(PongFrame(seq))

    # --- Heartbeat -----------------------------------------------------------------

    def configure_heartbeat(
        self, interval: float, max_missed: int, *, sends_pings: bool, now: float
    ) -> None:
        """Run the heartbeat with ``interval`` (0: off) and ``max_missed`` from ``now``.

        Done by :meth:`welcome` (server, pinging) and on receiving the welcome
        (client, not pinging); call it to change either. The silence clock and
        the ping schedule both restart at ``now``.

        :raises ValueError: ``interval`` negative or not finite, ``max_missed`` below 1.
        """
        if not 0 <= interval <= _MAX_SECONDS:
            raise ValueError(f"interval must be between 0 and {_MAX_SECONDS:g} s: {interval!r}")
        if max_missed < 1:
            raise ValueError(f"max_missed must be at least 1: {max_missed!r}")
        self.heartbeat_interval = float(interval)
        self.heartbeat_max_missed = max_missed
        self.sends_pings = sends_pings
        self.last_received_at = now
        self._ping_clock = now

    def heartbeat_due(self, now: float) -> bool:
        """Whether this side should send a ping (:meth:`ping`) at ``now``."""
        return (
            self.sends_pings
            and self.heartbeat_interval > 0
            and self.state is ProtocolState.OPEN
            and now >= self._ping_clock + self.heartbeat_interval
        )

    def is_dead(self, now: float) -> bool:
        """Whether the peer has been silent too long at ``now``: close with
        :attr:`~meshline._sockets._codes.CloseCode.HEARTBEAT_MISSED`."""
        return now >= self._dead_at()

    def _dead_at(self) -> float:
        if (
            self.heartbeat_interval <= 0
            or self.state is not ProtocolState.OPEN
            or self.last_received_at is None
        ):
            return math.inf
        return self.last_received_at + self.heartbeat_interval * (self.heartbeat_max_missed + 1)

    def next_deadline(self) -> float:
        """When :meth:`heartbeat_due` or :meth:`is_dead` may next turn true, in the
        clock the caller passes as ``now`` (``inf``: never, as things stand).

        It moves later whenever a frame arrives or a ping goes out, so a shell
        sleeps until it, checks both, and asks again.
        """
        dead_at = self._dead_at()
        if self.sends_pings and dead_at < math.inf:
            return min(dead_at, self._ping_clock + self.heartbeat_interval)
        return dead_at

    # --- Closing -------------------------------------------------------------------

    def close(self, code: int, reason: str | None = None) -> None:
        """This side closes the connection with ``code`` (and ``reason``: by default
        :func:`~meshline._sockets._codes.close_reason`); the shell then closes the
        WebSocket with them. Pending ids are forgotten. Closing again does nothing.
        """
        if self.state is ProtocolState.CLOSED:
            return
        self._closed(code, close_reason(code) if reason is None else reason)
        logger.debug("%s: closed with %d (%s)", self.side.value, code, self.close_reason)

    def peer_closed(self, code: int | None, reason: str = "") -> None:
        """The WebSocket closed under this side: the peer sent ``code`` (None:
        the connection dropped without a close frame, recorded as 1006). Ignored if
        this side closed first."""
        if self.state is ProtocolState.CLOSED:
            return
        self.closed_by_peer = True
        self._closed(CloseCode.ABNORMAL if code is None else code, reason)
        logger.debug("%s: peer closed with %s (%s)", self.side.value, self.close_code, reason)

    def _closed(self, code: int, reason: str) -> None:
        self.close_code = code
        self.close_reason = reason
        self._set_state(ProtocolState.CLOSED)
        self._calls.clear()
        self._requests.clear()
        self._withdrawn.clear()


_NO_RECEIVERS: dict[type[Any], _Receiver] = {}
_RECEIVERS: dict[tuple[Side, ProtocolState], dict[type[Any], _Receiver]] = {
    (Side.SERVER, ProtocolState.START): {HelloFrame: SocketProtocol._receive_hello},
    (Side.CLIENT, ProtocolState.HELLO): {WelcomeFrame: SocketProtocol._receive_welcome},
    (Side.SERVER, ProtocolState.OPEN): {
        CallFrame: SocketProtocol._receive_call,
        EventFrame: SocketProtocol._receive_as_is,
        ReplyFrame: SocketProtocol._receive_reply,
        ReplyErrorFrame: SocketProtocol._receive_reply,
        CancelFrame: SocketProtocol._receive_cancel_at_server,
        SubscribeFrame: SocketProtocol._receive_subscribe,
        UnsubscribeFrame: SocketProtocol._receive_unsubscribe_at_server,
        WatchFrame: SocketProtocol._receive_watch,
        UnwatchFrame: SocketProtocol._receive_unwatch_at_server,
        PingFrame: SocketProtocol._receive_as_is,
        PongFrame: SocketProtocol._receive_pong,
    },
    (Side.CLIENT, ProtocolState.OPEN): {
        ResultFrame: SocketProtocol._receive_answer,
        ErrorFrame: SocketProtocol._receive_answer,
        EventFrame: SocketProtocol._receive_event_at_client,
        RequestFrame: SocketProtocol._receive_request,
        CancelFrame: SocketProtocol._receive_cancel_at_client,
        UnsubscribeFrame: SocketProtocol._receive_unsubscribe_at_client,
        UnwatchFrame: SocketProtocol._receive_unwatch_at_client,
        PresenceStateFrame: SocketProtocol._receive_presence,
        PresenceDiffFrame: SocketProtocol._receive_presence,
        PingFrame: SocketProtocol._receive_as_is,
        PongFrame: SocketProtocol._receive_pong,
    },
}
"""What each side accepts in each state, and the method that takes it: one table
for every connection (a table of bound methods per connection cost each about
1 KB)."""
