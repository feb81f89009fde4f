"""One client connection on the server: :class:`Connection`, and the tasks that run it.

Life of a connection
    The server accepts the WebSocket (after ``authenticate``) and hands it to
    :meth:`ConnectionHub.run_connection`, which runs in the server's nursery
    until the connection is over:

    1. what the server sends goes to the connection's
       :class:`~meshline._sockets._outbox.Outbox`; the server's
       :class:`SharedWriter` writes it, unless a call's own task writes its
       answer (which saves a task switch per call). A connection whose writes
       stall (a slow client) gets a writer task of its own. One task writes for
       a connection at a time;
    2. the ``hello`` is awaited (``handshake_timeout``: closed with 4002), the
       client id settled (the admission's wins over the hello's; with neither,
       the connection id) and the ``welcome`` queued;
    3. ``on_connect(conn)`` runs; the connection is not yet visible in
       introspection, so it can seed ``data`` and join rooms. If it raises, the
       connection closes with 1011 and ``on_disconnect`` is not called;
    4. the connection becomes visible. From then on trio-websocket's own reader
       task hands each message straight to the protocol machine
       (:func:`~meshline._sockets._inbound.deliver_directly`), which never
       blocks (trio-websocket stops reading, and answering WebSocket pings, while
       its one-message queue is full): calls and async event handlers run in
       tasks of their own. With a trio-websocket whose internals differ, the
       connection's task reads with ``get_message`` instead. The server's one
       timer task (:class:`~meshline._sockets._timers.Timers`) queues the
       pings and reaps silent clients;
    5. the connection ends through one path, :meth:`Connection._end`, whatever
       ends it: the client closing (or vanishing), the server closing it, the
       heartbeat reaping it, its outbox overflowing, a protocol violation, or the
       server exiting. The first cause wins and is recorded as
       :attr:`Connection.disconnect_reason`, with the close code sent (or
       received) as :attr:`Connection.close_code`. Pending server-to-client
       requests fail at once with :class:`~meshline.SocketClosedError`, running
       calls are cancelled, the connection leaves introspection, its rooms and
       topics;
    6. the WebSocket is closed within ``close_timeout``: for a close the server
       chose (``server_closed``, ``server_exit``) the close first sends what is
       queued; otherwise it only finishes the message it is writing. A peer that
       does not take the close in time has its TCP connection closed;
    7. the cancelled handlers are given ``close_timeout`` to unwind, then
       ``on_disconnect(conn, reason)`` runs, exactly once.

    Per connection that is two tasks (trio-websocket's reader, and the
    connection's own, which waits for the end) and no nursery beyond the
    stream's: every idle connection pays for each in memory.

    trio-websocket records 1000 locally whatever code the server sent, so the
    codes here are meshline's own record.

Cancellation
    Cancelling the task that runs a connection (the server's nursery) ends it as
    ``server_exit``: the WebSocket is closed at once and ``on_disconnect`` still
    runs, shielded, within ``close_timeout``.
"""

from __future__ import annotations

import collections
import contextvars
import enum
import inspect
import itertools
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .._errors import InvalidArgumentError
from ._batch import send_messages
from ._codes import CloseCode, ErrorCode, close_reason
from ._errors import CallFailedError, SocketClosedError, SocketError, SocketTimeoutError
from ._frames import (
    CallFrame,
    CancelFrame,
    Codec,
    EventFrame,
    FrameEncodeError,
    HelloFrame,
    Message,
    PayloadDecodeError,
    PeerLimitExceededError,
    PingFrame,
    PresenceDiffFrame,
    PresenceMember,
    ProtocolClosedError,
    RemoteProtocolError,
    ReplyErrorFrame,
    ReplyFrame,
    Side,
    SubscribeFrame,
    UnsubscribeFrame,
    UnwatchFrame,
    WatchFrame,
)
from ._inbound import Signal, deliver_directly
from ._outbox import Outbox, OverflowPolicy, PutOutcome
from ._protocol import SocketProtocol
from ._roles import MAX_NAME_BYTES, TOO_MANY_CALLS, CallSpec, EventSpec, RoleTable, check_name
from ._timers import Timer, Timers

if TYPE_CHECKING:
    from ._local import LocalRegistry
    from ._server import SocketServer

__all__ = [
    "Connection",
    "ConnectionHub",
    "ConnectionSettings",
    "check_close_code",
    "DisconnectReason",
    "fan_out",
    "fan_out_presence",
    "node_of_connection",
    "RoomPresenceSource",
]

logger = logging.getLogger("meshline.sockets")

_ERROR_CODES = frozenset(code.value for code in ErrorCode)
BATCH_MESSAGES = 16
"""The most queued messages one write to the socket carries (see :mod:`._batch`)."""
BATCH_BYTES = 64 * 1024
"""A batch stops growing once it holds this many bytes (a single message may be bigger)."""
_MAX_REASON_BYTES = 123
_TRIO_WEBSOCKET_TOO_BIG = "Exceeded maximum message size"
"""How trio-websocket's own close reason starts when a message went over
``max_message_size`` (it closes with 1009 before meshline sees the message)."""


class DisconnectReason(enum.StrEnum):
    """Why a connection ended: passed to ``on_disconnect`` and kept as
    :attr:`Connection.disconnect_reason`."""

    CLIENT_CLOSED = "client_closed"
    """The client closed the WebSocket, or the connection dropped (code 1006)."""
    SERVER_CLOSED = "server_closed"
    """The application closed it (:meth:`Connection.close`)."""
    REAPED = "reaped"
    """The client missed its heartbeats (closed with 4001)."""
    BACKPRESSURE = "backpressure"
    """The client did not read fast enough: its outgoing queue overflowed
    (closed with 1013)."""
    PROTOCOL_ERROR = "protocol_error"
    """The client broke the protocol (1002, 1003, 1009...)."""
    SERVER_EXIT = "server_exit"
    """The server shut down (closed with 1001, or the shutdown code)."""
    SUPERSEDED = "superseded"
    """A newer connection of the same client id took over, on this node or
    another (closed with 4502, terminal: the client is already elsewhere)."""


def node_of_connection(connection_id: str) -> int:
    """The node id a connection id names.

    Connection ids are ``"<node id>.<server incarnation>.<counter>"``: unique
    across the cluster and never reused (a restarted server has a new
    incarnation), and routable to their node without a lookup.

    :raises InvalidArgumentError: not a connection id.
    """
    if not isinstance(connection_id, str):
        raise InvalidArgumentError(f"not a connection id: {connection_id!r}")
    head, dot, _ = connection_id.partition(".")
    if not dot or not head or not head.isascii() or not head.isdigit():
        raise InvalidArgumentError(f"not a connection id: {connection_id!r}")
    return int(head)


def _truncate(text: str, limit: int = _MAX_REASON_BYTES) -> str:
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode("utf-8", "ignore") + "..."


def _shown(name: str) -> str:
    """A name for a message or a log line: repr, cut to a readable length."""
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


@attrs.frozen(kw_only=True)
class ConnectionSettings:
    """What every connection of one server shares (checked by the server)."""

    node_id: int
    roles: RoleTable
    client_requests: Mapping[str, tuple[Any, Any]] | None
    client_events: Mapping[str, Any] | None
    heartbeat_interval: float
    heartbeat_max_missed: int
    max_buffered_bytes: int
    policy: OverflowPolicy
    max_message_size: int
    call_timeout: float
    """math.inf: none."""
    close_timeout: float
    handshake_timeout: float
    max_concurrent_calls: int
    authorize_topic: Callable[[Connection, str], bool | Awaitable[bool]] | None
    authorize_presence: Callable[[Connection, str], bool | Awaitable[bool]] | None
    """None: a connection may watch the rooms it is in."""
    on_connect: Callable[[Connection], Awaitable[None] | None] | None
    on_disconnect: Callable[[Connection, DisconnectReason], Awaitable[None] | None] | None


class RoomPresenceSource(Protocol):
    """Where a server's connections get room presence from (the cluster layer)."""

    def presence(self, room: str) -> tuple[int, tuple[PresenceMember, ...]]:
        """The room's revision and members now."""
        ...

    def add_watcher(self, room: str, conn: Connection) -> None:
        """Send ``conn`` the room's diffs from now on."""
        ...

    def remove_watcher(self, room: str, conn: Connection) -> None:
        """Stop sending ``conn`` the room's diffs (nothing if it was not watching)."""
        ...


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


class _RunningCall:
    """A call (or subscribe) whose handler runs: its cancel scope, its timeout (a
    timer of the server's, rather than a deadline on the scope: see
    :mod:`~meshline._sockets._timers`), and why it was cancelled."""

    __slots__ = ("cancelled_by_client", "revoked", "scope", "timeout", "timer")

    def __init__(
        self, timeout: float, timers: Timers | None, scope: trio.CancelScope | None = None
    ) -> None:
        self.scope = trio.CancelScope() if scope is None else scope
        self.timeout = timeout
        self.timer: Timer | None = None
        if timers is not None and timeout < math.inf:
            self.timer = timers.add(trio.current_time() + timeout, self._expire)
        self.cancelled_by_client = False
        self.revoked = False
        """An authorization the application revoked while its hook decided."""

    def _expire(self, now: float) -> None:
        self.scope.cancel()


class _CallJob:
    """A call handed to the connection's call runner."""

    __slots__ = ("call_id", "running", "spec", "value")

    def __init__(self, call_id: int, spec: CallSpec, value: Any, running: _RunningCall) -> None:
        self.call_id = call_id
        self.spec = spec
        self.value = value
        self.running = running


class _CallRunner:
    """A task that runs a connection's calls one after the other, in one cancel
    scope, so that the common case (a client that waits for each answer before its
    next call) costs neither a task nor a cancel scope per call; each costs about
    as much as the rest of the call together. A call that comes while the runner
    is busy gets a task of its own. Cancelling a call the runner runs cancels the
    runner's scope, which ends the runner (after answering the call); the next
    call starts a new one. An idle runner stays parked (about 2 KB) until then or
    until the connection ends."""

    __slots__ = ("current", "deadline", "idle", "job", "scope", "timer", "wakeup")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.wakeup = Signal()
        self.job: _CallJob | None = None
        self.idle = False
        self.current: _RunningCall | None = None
        """The call the runner was handed last, until it finished."""
        self.deadline = math.inf
        """When :attr:`current` times out."""
        self.timer: Timer | None = None
        """The runner's one timer (see :meth:`take`)."""

    def take(self, job: _CallJob, timers: Timers) -> None:
        """Hand ``job`` to the runner and time it. Calls time out through one timer
        per runner rather than one per call: a later deadline leaves the timer
        armed (at its deadline it finds the call done, or moves itself to the
        current call's deadline), and only an earlier one replaces it."""
        self.job = job
        self.idle = False
        self.current = running = job.running
        self.deadline = deadline = (
            trio.current_time() + running.timeout if running.timeout < math.inf else math.inf
        )
        timer = self.timer
        if deadline < math.inf and (
            timer is None or timer.callback is None or timer.deadline > deadline
        ):
            if timer is not None:
                timers.withdraw(timer)
            self.timer = timers.add(deadline, self._expire)
        self.wakeup.set()

    def finished(self, running: _RunningCall) -> None:
        """``running`` is over (its timer, if armed, stays for the next call)."""
        if self.current is running:
            self.current = None
            self.deadline = math.inf

    def _expire(self, now: float) -> float | None:
        if self.current is not None and self.deadline <= now:
            self.current.scope.cancel()
        elif self.current is not None and self.deadline < math.inf:
            return self.deadline
        self.timer = None
        return None


class _PendingRequest:
    """A server-to-client request waiting for its answer."""

    __slots__ = ("answer", "closed", "done")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: ReplyFrame | ReplyErrorFrame | None = None
        self.closed: SocketClosedError | None = None


class Connection:
    """A client connected to this server (the server side of one WebSocket).

    Created by the server; applications get it in handlers and hooks, and from
    introspection (``server.local.connections``).

    Identity: :attr:`id` (assigned by the server, unique across the cluster and
    never reused; :func:`node_of_connection` reads the node from it),
    :attr:`client_id` (the client's own, stable across reconnects),
    :attr:`user_id`, :attr:`role` and :attr:`context` (from ``authenticate``).

    Emitting never waits: :meth:`emit` queues the event in the connection's
    outgoing queue (see backpressure in the Sockets docs).
    """

    __slots__ = (
        "_admitted_client_id",
        "_beat_timer",
        "_calls",
        "_clock_offset",
        "_closed",
        "_closing",
        "_connected",
        "_context",
        "_deciding",
        "_drain",
        "_event_scopes",
        "_finished",
        "_hub",
        "_idle",
        "_life",
        "_nursery",
        "_outbox",
        "_own_writer",
        "_protocol",
        "_requests",
        "_role_calls",
        "_role_events",
        "_rooms",
        "_runner",
        "_sending",
        "_sent_all",
        "_stream",
        "_visible",
        "_write_wanted",
        "_writer_scope",
        "_ws",
        "client_id",
        "client_name",
        "client_version",
        "close_code",
        "close_reason",
        "connected_at",
        "context",
        "data",
        "disconnect_reason",
        "id",
        "ignored_events",
        "previous_connection_id",
        "remote",
        "role",
        "subprotocol",
        "user_id",
    )

    def __init__(
        self,
        hub: ConnectionHub,
        ws: WebSocketConnection,
        codec: Codec,
        *,
        stream: trio.abc.AsyncResource,
        connection_id: str,
        role: str,
        user_id: str | None,
        client_id: str | None,
        context: Any,
        remote: str,
    ) -> None:
        settings = hub.settings
        self._hub = hub
        self._ws = ws
        self._stream = stream
        self._protocol = SocketProtocol(
            Side.SERVER, codec, max_message_size=settings.max_message_size
        )
        self._outbox = Outbox(settings.max_buffered_bytes, settings.policy)
        self.id = connection_id
        """Assigned by the server: unique across the cluster, never reused."""
        self.role = role
        """The name of the connection's role."""
        self.user_id = user_id
        """The user, as ``authenticate`` said (None: not stated)."""
        self.client_id = client_id or ""
        """The client's stable id: the admission's, else the hello's, else the
        connection id. Settled by the handshake ("" before it)."""
        self._admitted_client_id = client_id
        self.context = context
        """Whatever ``authenticate`` put in its admission (never sent anywhere)."""
        self.remote = remote
        """The peer's address, as ``host:port`` (or a description of the stream)."""
        self.subprotocol = codec.subprotocol
        self.connected_at = time.time()
        """When the WebSocket was accepted, wall clock (``time.time()``)."""
        self._clock_offset = self.connected_at - trio.current_time()
        self.data: Any = settings.roles.by_name[role].new_data()
        """Per-connection state: a fresh instance of the role's ``data`` class
        (None when the role declares none)."""
        self.ignored_events = 0
        """Events from the client that were dropped: not declared for the role,
        or data that did not fit (logged at debug level)."""
        self.client_name = ""
        self.client_version = ""
        self.previous_connection_id = ""
        """What the client said in its hello (free-form, and the id it had before
        a reconnect)."""
        self.disconnect_reason: DisconnectReason | None = None
        """Why the connection ended (None while it is open)."""
        self.close_code: int | None = None
        """The close code the server sent, or the client's (None while open)."""
        self.close_reason = ""
        self._role_calls: Mapping[str, CallSpec] = settings.roles.calls[role]
        self._role_events: Mapping[str, EventSpec] = settings.roles.events[role]
        self._rooms: dict[str, None] = {}
        self._deciding: dict[tuple[str, str], list[_RunningCall]] | None = None
        """The authorization hooks deciding now, by (kind, name) asked for: a
        revocation meanwhile (``unsubscribe``, ``unwatch``) refuses their answer.
        Made at the first hook that runs (most connections never need it)."""
        self._calls: dict[int, _RunningCall] = {}
        self._event_scopes: dict[trio.CancelScope, None] = {}
        self._idle: trio.Event | None = None
        self._requests: dict[int, _PendingRequest] = {}
        self._life = trio.CancelScope()
        self._sending = False
        self._beat_timer: Timer | None = None
        self._runner: _CallRunner | None = None
        self._sent_all: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._write_wanted = False
        """In the shared writer's queue (see :class:`SharedWriter`)."""
        self._own_writer: Signal | None = None
        """What wakes the connection's own writer, once it has one (its writes stalled)."""
        self._writer_scope: trio.CancelScope | None = None
        self._closing = False
        self._drain = False
        self._visible = False
        self._connected = False
        self._context: contextvars.Context | None = None
        """The context handler tasks start in: the connection task's after
        ``on_connect`` (set by :meth:`_open`, before any handler can start)."""
        self._finished = False
        self._closed: trio.Event | None = None
        """Made only when someone waits for the end (most connections end unwatched)."""

    # --- Introspection ---------------------------------------------------------------

    @property
    def server(self) -> SocketServer:
        """The server this connection is on (for rooms, topics and introspection
        from a handler)."""
        server: SocketServer = self._hub.server
        return server

    @property
    def rooms(self) -> frozenset[str]:
        """The rooms this connection is in."""
        return frozenset(self._rooms)

    @property
    def topics(self) -> frozenset[str]:
        """The topics the client subscribed to (and the server accepted)."""
        return self._protocol.subscriptions

    @property
    def last_ping_at(self) -> float | None:
        """When the server last sent a heartbeat ping, wall clock (None: never)."""
        at = self._protocol.last_ping_at
        return None if at is None else at + self._clock_offset

    @property
    def last_pong_at(self) -> float | None:
        """When the client last answered a ping, wall clock (None: never)."""
        at = self._protocol.last_pong_at
        return None if at is None else at + self._clock_offset

    @property
    def last_seen_at(self) -> float | None:
        """When the last frame (any frame) arrived from the client, wall clock."""
        at = self._protocol.last_received_at
        return None if at is None else at + self._clock_offset

    @property
    def round_trip_time(self) -> float | None:
        """Seconds from the server's last ping to its pong, when that pong came."""
        return self._protocol.round_trip_time

    @property
    def dropped(self) -> int:
        """Frames dropped by backpressure (policies ``drop`` and ``latest``)."""
        return self._outbox.dropped

    @property
    def coalesced(self) -> int:
        """Keyed events replaced by a newer value while waiting (policy ``latest``)."""
        return self._outbox.replaced

    @property
    def buffered_bytes(self) -> int:
        """Bytes waiting in the connection's outgoing queue."""
        return self._outbox.buffered_bytes

    @property
    def is_open(self) -> bool:
        """Whether the connection is open: welcomed and not closing."""
        return self._protocol.is_open and not self._closing

    @property
    def is_closed(self) -> bool:
        """Whether the connection is over (``on_disconnect`` has run)."""
        return self._finished

    async def wait_closed(self) -> None:
        """Wait until the connection is over (its ``on_disconnect`` has run).

        Cancellation: only the wait is cancelled.
        """
        if self._finished:
            await trio.lowlevel.checkpoint()
            return
        if self._closed is None:
            self._closed = trio.Event()
        await self._closed.wait()

    def __repr__(self) -> str:
        state = "open" if self.is_open else (self.disconnect_reason or "opening")
        return f"<Connection {self.id} role={self.role!r} client={self.client_id!r} {state}>"

    # --- Rooms -----------------------------------------------------------------------

    def join(self, room: str) -> None:
        """Put this connection in ``room`` (on this node). Joining again does nothing;
        neither does joining after the connection closed.

        :raises InvalidArgumentError: a bad room name.
        """
        check_name(room, "room name")
        if self._closing or room in self._rooms:
            return
        self._rooms[room] = None
        if self._visible:
            self._hub.registry.add_to_room(room, self)

    def leave(self, room: str) -> None:
        """Take this connection out of ``room``. Leaving a room it is not in does nothing.

        :raises InvalidArgumentError: a bad room name.
        """
        check_name(room, "room name")
        if room not in self._rooms:
            return
        self._rooms.pop(room, None)
        if self._visible:
            self._hub.registry.remove_from_room(room, self)
        if self._hub.settings.authorize_presence is None:  # the rule: members only
            self._end_watch(room, ErrorCode.FORBIDDEN, "left the room")

    def unwatch(self, room: str) -> bool:
        """End the client's watch of ``room``'s presence (its permission was
        revoked): the client is told (code ``forbidden``), and no more presence of
        the room reaches it. A watch of it whose ``authorize_presence`` hook is
        still deciding is refused. Returns False when it was not watching, or the
        connection is not open. (With the default rule, leaving a room does this.)

        :raises InvalidArgumentError: a bad room name.
        """
        check_name(room, "room name")
        self._revoke("room", room)
        return self._end_watch(room, ErrorCode.FORBIDDEN, "no longer allowed")

    def _revoke(self, kind: str, name: str) -> None:
        """The application revoked the permission to ``name``: the authorization
        hooks deciding on it now have their answer refused."""
        for running in (self._deciding or {}).get((kind, name), ()):
            running.revoked = True

    def _end_watch(self, room: str, code: str, why: str) -> bool:
        if not self.is_open or not self._protocol.is_watching(room):
            return False
        logger.info("connection %s: watch of %s ended (%s: %s)", self.id, _shown(room), code, why)
        message = self._protocol.end_watch(room, code)
        source = self._hub.presence
        if source is not None:
            source.remove_watcher(room, self)
        self._deliver(message, None, control=True)
        return True

    def unsubscribe(self, topic: str) -> bool:
        """End the client's subscription to ``topic`` (its permission was revoked,
        the topic is gone): the client is told, and nothing more published to the
        topic reaches it. A subscribe to it whose ``authorize_topic`` hook is still
        deciding is refused. Returns False when it was not subscribed, or the
        connection is not open.

        :raises InvalidArgumentError: a bad topic name.
        """
        check_name(topic, "topic")
        self._revoke("topic", topic)
        if not self.is_open or topic not in self._protocol.subscriptions:
            return False
        message = self._protocol.end_subscription(topic)
        if self._visible:
            self._hub.registry.remove_from_topic(topic, self)
        self._deliver(message, None, control=True)
        return True

    # --- Sending ---------------------------------------------------------------------

    def emit(self, event: str, data: Any = None, *, coalesce: str | None = None) -> bool:
        """Queue the event ``event`` with ``data`` for the client; never waits.

        ``coalesce`` is a coalescing key: under backpressure ``latest``, only the
        newest waiting event per key is kept. Returns True if the event was
        queued (or replaced an older one of its key); False if it was dropped by
        backpressure, or the connection is not open (dropped silently: a closing
        connection is not an error). An overflow under backpressure ``close``
        closes the connection with 1013.

        :raises InvalidArgumentError: an event name the server does not declare
            in ``client_events``, or a bad name.
        :raises FrameEncodeError: ``data`` cannot be encoded.
        :raises PeerLimitExceededError: the event is bigger than the client accepts.
        """
        self._hub.check_event(event)
        if coalesce is not None:
            check_name(coalesce, "coalescing key")
        if not self.is_open:
            logger.debug("connection %s: event %s not sent: not open", self.id, _shown(event))
            return False
        message = self._protocol.emit(event, data, key=coalesce)
        return self._deliver(message, coalesce)

    async def request(self, name: str, data: Any = None, *, timeout: float | None = None) -> Any:
        """Ask the client ``name`` with ``data``; return its reply, decoded into the
        declared output type.

        ``timeout`` is in seconds (None: the server's ``call_timeout``;
        ``math.inf``: wait as long as the connection lasts).

        Cancellation: if the caller is cancelled, the client is sent a cancel and
        its answer is ignored.

        :raises SocketTimeoutError: no answer in time (the client is sent a cancel).
        :raises CallFailedError: the client answered with an error (its ``code``;
            ``application`` is True for a code of the client's own), or a reply
            that does not fit the declared output type (code ``bad_input``).
        :raises SocketClosedError: the connection is closed, or closed while
            waiting (at once, not at the timeout).
        :raises InvalidArgumentError: ``name`` is not in ``client_requests``, or a
            bad timeout.
        :raises FrameEncodeError: ``data`` cannot be encoded.
        """
        output = self._hub.request_output(name)
        if timeout is None:
            timeout = self._hub.settings.call_timeout
        elif isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise InvalidArgumentError(f"timeout must be a positive number of seconds: {timeout!r}")
        if not self.is_open:
            raise self._closed_error()
        wire_timeout = timeout if timeout < 1e9 else None
        request_id, message = self._protocol.request(name, data, timeout=wire_timeout)
        pending = _PendingRequest()
        self._requests[request_id] = pending
        try:
            self._deliver(message, None, control=True)
            with trio.move_on_after(timeout):
                await pending.done.wait()
        finally:
            del self._requests[request_id]
            if not pending.done.is_set() and self._protocol.is_open:
                cancel = self._protocol.cancel_request(request_id)
                if cancel is not None:
                    self._deliver(cancel, None, control=True)
        if pending.closed is not None:
            raise pending.closed
        answer = pending.answer
        if answer is None:
            raise SocketTimeoutError(f"no answer to request {_shown(name)} within {timeout:g} s")
        codec = self._protocol.codec
        if isinstance(answer, ReplyErrorFrame):
            details = None
            if answer.details is not None:
                try:
                    details = codec.decode_data(answer.details, Any)
                except PayloadDecodeError:
                    details = None
            raise CallFailedError(
                answer.code,
                answer.message,
                details,
                application=answer.code not in _ERROR_CODES,
            )
        try:
            return codec.decode_data(answer.data, output)
        except PayloadDecodeError as exc:
            raise CallFailedError(
                ErrorCode.BAD_INPUT, f"the reply to {_shown(name)} did not validate: {exc}"
            ) from None

    async def close(self, code: int = CloseCode.KICKED, reason: str | None = None) -> None:
        """Close the connection with ``code`` and wait until it is over.

        The default, 4501 (kicked), is in the terminal band: the client does not
        come back by itself. Use :attr:`CloseCode.RECONNECT <meshline.CloseCode>`
        (or another reconnect-band code) to send it away for a moment. What is
        already queued for the client is sent first, within ``close_timeout``.
        ``on_disconnect`` gets ``server_closed``. Closing a closed connection does
        nothing.

        Called from one of this connection's own handlers, the handler is
        cancelled (the connection's handlers all are).

        Cancellation: only the wait is cancelled; the connection closes anyway.

        :raises InvalidArgumentError: a code that cannot be sent (1005, 1006,
            1015, or outside 1000-4999).
        """
        self.close_nowait(code, reason)
        await self.wait_closed()

    def close_nowait(self, code: int = CloseCode.KICKED, reason: str | None = None) -> None:
        """Start closing the connection (see :meth:`close`) and return at once."""
        code = check_close_code(code)
        self._end(DisconnectReason.SERVER_CLOSED, code, reason)

    # --- Internals: sending ---------------------------------------------------------------

    def _deliver(self, message: Message, key: str | None, *, control: bool = False) -> bool:
        """Put ``message`` in the outbox and wake the writer (unless a task is
        writing already: it takes the message too); apply the overflow policy."""
        outcome = self._outbox.put(message, key=key, control=control)
        if outcome is PutOutcome.QUEUED or outcome is PutOutcome.REPLACED:
            if not self._sending:
                own_writer = self._own_writer
                if own_writer is not None:
                    own_writer.set()
                elif not self._write_wanted:
                    self._write_wanted = True
                    self._hub.writer.want(self)
            return True
        if outcome is PutOutcome.DROPPED:
            dropped = self._outbox.dropped
            if dropped & (dropped - 1) == 0:  # 1, 2, 4, 8...: logged, never flooding
                logger.warning(
                    "connection %s: slow client, %d frame(s) dropped so far (%d bytes queued)",
                    self.id,
                    dropped,
                    self._outbox.buffered_bytes,
                )
            else:
                logger.debug("connection %s: frame dropped (%d so far)", self.id, dropped)
            return False
        if not self._closing:
            logger.warning(
                "connection %s: slow client, over %d buffered bytes: closing with 1013",
                self.id,
                self._outbox.max_buffered_bytes,
            )
            self._end(DisconnectReason.BACKPRESSURE, CloseCode.TRY_AGAIN_LATER)
        return False

    def _closed_error(self) -> SocketClosedError:
        return SocketClosedError(
            "the connection is closed", close_code=self.close_code, reason=self.close_reason
        )

    # --- Internals: ending ------------------------------------------------------------

    def _end(self, reason: DisconnectReason, code: int, text: str | None = None) -> bool:
        """The one way a connection ends (see the module); the first cause wins.

        Synchronous, callable from any task: records the reason and code, fails
        pending requests, cancels the connection's tasks and lets the writer
        finish. Returns False if the connection was already ending.
        """
        if self._closing:
            return False
        self._closing = True
        self._visible_off()
        self.disconnect_reason = reason
        self.close_code = code
        self.close_reason = _truncate(close_reason(code) if text is None else text)
        self._protocol.close(code, self.close_reason)
        self._drain = reason in (DisconnectReason.SERVER_CLOSED, DisconnectReason.SERVER_EXIT)
        if not self._drain:
            self._outbox.clear()
        error = self._closed_error()
        for pending in self._requests.values():
            if not pending.done.is_set():
                pending.closed = error
                pending.done.set()
        self._life.cancel()
        runner = self._runner
        if runner is not None and runner.idle:
            runner.wakeup.set()  # it sees the close and ends
        if self._beat_timer is not None:
            self._hub.timers.withdraw(self._beat_timer)
        for running in self._calls.values():
            running.scope.cancel()
        for scope in self._event_scopes:
            scope.cancel()
        if self._own_writer is not None:
            self._own_writer.set()  # it sees the close and ends
        log = logger.info if reason is not DisconnectReason.CLIENT_CLOSED else logger.debug
        log("connection %s: %s (code %s: %s)", self.id, reason.value, code, self.close_reason)
        return True

    def _visible_off(self) -> None:
        if self._visible:
            self._visible = False
            self._hub.registry.detach(self)
            source = self._hub.presence
            if source is not None:
                for room in self._protocol.watches:
                    source.remove_watcher(room, self)

    def _peer_gone(self, exc: ConnectionClosed) -> None:
        """The reader or the writer found the WebSocket closed under it."""
        reason = exc.reason
        code = int(CloseCode.ABNORMAL if reason is None else reason.code)
        text = "" if reason is None else (reason.reason or "")
        if code == CloseCode.MESSAGE_TOO_BIG and text.startswith(_TRIO_WEBSOCKET_TOO_BIG):
            logger.warning("connection %s: closed with 1009: %s", self.id, text)
            self._end(DisconnectReason.PROTOCOL_ERROR, code, text)
            return
        self._protocol.peer_closed(code, text)
        self._end(DisconnectReason.CLIENT_CLOSED, code, text)

    # --- Internals: the tasks ----------------------------------------------------------------

    async def _run(self, hello_timeout: float, nursery: trio.Nursery) -> None:
        """The whole life of the connection (see the module).

        This task waits for the end (or reads, on the ``get_message`` path). The
        handlers run in ``nursery`` (the stream's own), each in a cancel scope
        the connection's end cancels: no nursery of the connection's own, since
        every idle connection pays for it in memory. The server's
        :class:`SharedWriter` writes (in the server's nursery).
        """
        self._nursery = nursery
        try:
            with self._life:
                if await self._open(hello_timeout):
                    deadline = self._protocol.next_deadline()
                    if deadline < math.inf:
                        self._beat_timer = self._hub.timers.add(deadline, self._beat)
                    reader_end = deliver_directly(
                        self._ws, self._on_message, self._on_inbound_closed
                    )
                    if reader_end is not None:
                        await reader_end.wait()
                        self._on_inbound_closed()
                    else:
                        await self._read_loop()
            if not self._closing:  # cannot happen: the reader ends through _end
                self._end(DisconnectReason.SERVER_CLOSED, CloseCode.INTERNAL_ERROR)
            await self._close_websocket()
        finally:
            if not self._closing:  # cancelled from outside: the server is going away
                self._end(DisconnectReason.SERVER_EXIT, CloseCode.GOING_AWAY)
            with trio.CancelScope(shield=True):
                if self._ws.closed is None:
                    await self._abort_websocket()
                if self._writer_scope is not None:
                    self._writer_scope.cancel()
                await self._handlers_finished()
                await self._disconnected()

    def _spawn(self, handler: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Start a handler task in the connection's nursery, in the context the
        connection's own task had after ``on_connect`` (messages arrive in
        trio-websocket's reader task, whose context is older)."""
        assert self._nursery is not None and self._context is not None
        self._context.run(self._nursery.start_soon, handler, *args)

    def _running_handlers(self) -> int:
        return len(self._calls) + len(self._event_scopes)

    def _call_finished(self, call_id: int) -> None:
        running = self._calls.pop(call_id, None)
        if running is not None:
            if running.timer is not None:
                self._hub.timers.withdraw(running.timer)
            elif self._runner is not None:
                self._runner.finished(running)
        self._handler_done()

    def _handler_done(self) -> None:
        if self._idle is not None and not self._running_handlers():
            self._idle.set()

    async def _handlers_finished(self) -> None:
        """Wait (within ``close_timeout``) for the cancelled handlers to unwind, so
        that ``on_disconnect`` runs after them."""
        if not self._running_handlers():
            return
        self._idle = trio.Event()
        with trio.move_on_after(self._hub.settings.close_timeout) as scope:
            await self._idle.wait()
        if scope.cancelled_caught:
            logger.warning(
                "connection %s: %d handler(s) still running %g s after the close",
                self.id,
                self._running_handlers(),
                self._hub.settings.close_timeout,
            )

    async def _open(self, hello_timeout: float) -> bool:
        """Handshake, ``on_connect``, visibility; False if the connection ended meanwhile."""
        protocol = self._protocol
        hello: HelloFrame | None = None
        with trio.move_on_after(hello_timeout):
            try:
                message = await self._ws.get_message()
            except ConnectionClosed as exc:
                self._peer_gone(exc)
                return False
            try:
                event = protocol.receive(message, trio.current_time())
            except RemoteProtocolError as exc:
                self._end(DisconnectReason.PROTOCOL_ERROR, exc.close_code, exc.reason)
                return False
            assert isinstance(event, HelloFrame)  # anything else is a protocol error
            hello = event
        if hello is None:
            logger.info("connection %s: no hello within %g s", self.id, hello_timeout)
            self._end(DisconnectReason.PROTOCOL_ERROR, CloseCode.HANDSHAKE_TIMEOUT)
            return False
        self.client_name = hello.client_name
        self.client_version = hello.client_version
        self.previous_connection_id = hello.previous_connection_id
        client_id = self._admitted_client_id or hello.client_id or self.id
        if len(client_id.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            self._end(
                DisconnectReason.PROTOCOL_ERROR,
                CloseCode.POLICY_VIOLATION,
                f"client id over {MAX_NAME_BYTES} bytes",
            )
            return False
        self.client_id = client_id
        settings = self._hub.settings
        try:
            welcome = protocol.welcome(
                self.id,
                settings.node_id,
                now=trio.current_time(),
                client_id=client_id,
                heartbeat_interval=settings.heartbeat_interval,
                heartbeat_max_missed=settings.heartbeat_max_missed,
                max_buffered_bytes=settings.max_buffered_bytes,
                call_timeout=settings.call_timeout if settings.call_timeout < 1e9 else None,
            )
        except FrameEncodeError:
            self._end(DisconnectReason.PROTOCOL_ERROR, CloseCode.POLICY_VIOLATION, "bad client id")
            return False
        self._deliver(welcome, None, control=True)
        if settings.on_connect is not None:
            try:
                await _maybe_await(settings.on_connect(self))
            except Exception:
                logger.exception("connection %s: on_connect failed; closing with 1011", self.id)
                self._end(DisconnectReason.SERVER_CLOSED, CloseCode.INTERNAL_ERROR)
                return False
        self._connected = True
        self._context = contextvars.copy_context()
        if self._closing:
            return False
        self._visible = True
        self._hub.registry.attach(self, frozenset(self._rooms), self._protocol.subscriptions)
        logger.debug("connection %s: open (role %r, client %r)", self.id, self.role, client_id)
        return True

    def _go_alone(self, scope: trio.CancelScope) -> None:
        """The shared writer stalled on this connection: the stalled task, whose
        cancel scope is ``scope``, becomes its own writer (:meth:`_write_alone`)."""
        self._own_writer = Signal()
        self._writer_scope = scope

    async def _write_alone(self) -> None:
        """The connection's own writer (see :class:`SharedWriter`): whenever
        messages wait and no task is writing, it writes them, until the client has
        caught up (nothing left to write), when the connection goes back to the
        shared writer. Ends when the connection closes; the close writes what is
        left.

        Cancellation: the connection's end cancels the writer's scope (which
        :meth:`_go_alone` was given) once the WebSocket is closed or aborted.
        """
        wakeup = self._own_writer
        assert wakeup is not None
        try:
            while not self._closing:
                if self._sending:
                    await wakeup.wait()
                elif self._outbox:
                    await self._send_queued()
                else:
                    break
        finally:
            self._own_writer = None
            self._writer_scope = None

    def _write_failed(self) -> None:
        """A write raised something unexpected (logged): close the connection,
        with nothing more to write on it."""
        logger.exception("connection %s: failed to write", self.id)
        self._end(DisconnectReason.SERVER_CLOSED, CloseCode.INTERNAL_ERROR)
        self._outbox.clear()

    async def _send_queued(self, at_most: int = 0) -> None:
        """Write what the outbox holds, in order, from the calling task, until it is
        empty (or ``at_most`` messages are written, when not 0). One task at a
        time writes (:attr:`_sending`): the shared writer, the connection's own,
        a call task sending its own answer (which saves a task switch), or the
        close.

        Cancellation: nothing here cancels a write halfway (that would cut a
        message in the middle). When the client does not take the close within
        ``close_timeout``, the WebSocket is aborted, which fails a write blocked
        on it, and the scope of the connection's own writer (if it has one) is
        cancelled; a call task still writing then is cancelled with the rest of
        the connection's tasks when its stream's nursery ends.
        """
        self._sending = True
        outbox, ws = self._outbox, self._ws
        left = at_most or -1
        try:
            while left and (message := outbox.take()) is not None:
                left -= 1
                batch = [message]
                size = len(message)
                while (
                    left
                    and len(batch) < BATCH_MESSAGES
                    and size < BATCH_BYTES
                    and (message := outbox.take()) is not None
                ):
                    left -= 1
                    batch.append(message)
                    size += len(message)
                await send_messages(ws, batch)
        except ConnectionClosed as exc:
            if not self._closing:
                self._peer_gone(exc)
        finally:
            self._sending = False
            if self._sent_all is not None:
                self._sent_all.set()

    def _deliver_quietly(self, message: Message) -> bool:
        """:meth:`_deliver` for a control message, without waking the writer (the
        caller writes it, or whoever writes already does)."""
        sending, self._sending = self._sending, True
        try:
            return self._deliver(message, None, control=True)
        finally:
            self._sending = sending

    def _on_message(self, message: Message) -> None:
        """One message from the client, straight from trio-websocket's reader task
        (see :mod:`~meshline._sockets._inbound`): into the protocol, then to its
        handler. Never waits, never raises: what must wait runs in a task."""
        if self._closing:
            return
        try:
            try:
                event = self._protocol.receive(message, trio.current_time())
            except RemoteProtocolError as exc:
                self._end(DisconnectReason.PROTOCOL_ERROR, exc.close_code, exc.reason)
                return
            if event is not None:
                self._dispatch(event)
        except Exception:  # a bug here must not take trio-websocket's reader down
            logger.exception("connection %s: failed to handle a message", self.id)
            self._end(DisconnectReason.SERVER_CLOSED, CloseCode.INTERNAL_ERROR)

    def _on_inbound_closed(self) -> None:
        """trio-websocket says the WebSocket closed (the client's close, a dropped
        stream, its own 1009, or the server's close coming back)."""
        if not self._closing:
            self._peer_gone(ConnectionClosed(self._ws.closed))

    async def _read_loop(self) -> None:
        """Read with ``get_message``, when trio-websocket's channel cannot be
        replaced (see :func:`~meshline._sockets._inbound.deliver_directly`)."""
        ws = self._ws
        while not self._closing:
            try:
                message = await ws.get_message()
            except ConnectionClosed as exc:
                self._peer_gone(exc)
                return
            self._on_message(message)

    def _beat(self, now: float) -> float | None:
        """A heartbeat deadline may have passed (the server's heartbeat task asks):
        reap a client silent too long, queue a ping when one is due (through the
        outbox). The next deadline to look again at, or None: no more beats."""
        if self._closing:
            return None
        protocol = self._protocol
        if protocol.is_dead(now):
            logger.info(
                "connection %s: silent for %g s: reaped",
                self.id,
                protocol.heartbeat_interval * (protocol.heartbeat_max_missed + 1),
            )
            self._end(DisconnectReason.REAPED, CloseCode.HEARTBEAT_MISSED)
            return None
        if protocol.heartbeat_due(now):
            self._deliver(protocol.ping(now), None, control=True)
        deadline = protocol.next_deadline()
        return None if deadline == math.inf else deadline

    async def _close_websocket(self) -> None:
        """Let the task writing finish, write what is left (the outbox was emptied
        unless the close drains), then close the WebSocket, all within
        ``close_timeout``."""
        with trio.move_on_after(self._hub.settings.close_timeout) as deadline:
            deadline.shield = True
            while self._sending:
                self._sent_all = trio.Event()
                await self._sent_all.wait()
            if self._outbox:
                await self._send_queued()
            if self._ws.closed is None:
                await self._ws.aclose(self.close_code or CloseCode.GOING_AWAY, self.close_reason)
        if deadline.cancelled_caught:
            logger.info(
                "connection %s: the client did not take the close within %g s; dropped",
                self.id,
                self._hub.settings.close_timeout,
            )
            if self._writer_scope is not None:
                self._writer_scope.cancel()
            await self._abort_websocket()

    async def _abort_websocket(self) -> None:
        """Close the WebSocket's stream at once (no close handshake): a write
        blocked on it fails. (trio-websocket's own ``aclose`` leaves the stream
        open when a close was already under way.)"""
        with trio.CancelScope() as scope:
            scope.cancel()
            await self._ws.aclose(self.close_code or CloseCode.GOING_AWAY, self.close_reason)
        await trio.aclose_forcefully(self._stream)

    async def _disconnected(self) -> None:
        """Leave introspection; run ``on_disconnect`` once (shielded by the caller)."""
        self._visible_off()
        self._hub.serving.discard(self)
        try:
            on_disconnect = self._hub.settings.on_disconnect
            if self._connected and on_disconnect is not None:
                reason = self.disconnect_reason or DisconnectReason.SERVER_EXIT
                with trio.move_on_after(self._hub.settings.close_timeout) as scope:
                    try:
                        await _maybe_await(on_disconnect(self, reason))
                    except Exception:
                        logger.exception("connection %s: on_disconnect failed", self.id)
                if scope.cancelled_caught:
                    logger.warning(
                        "connection %s: on_disconnect did not finish within %g s",
                        self.id,
                        self._hub.settings.close_timeout,
                    )
        finally:
            self._finished = True
            if self._closed is not None:
                self._closed.set()

    # --- Internals: what arrives --------------------------------------------------------------

    def _dispatch(self, event: object) -> None:
        if isinstance(event, CallFrame):
            self._on_call(event)
        elif isinstance(event, EventFrame):
            self._on_event(event)
        elif isinstance(event, PingFrame):
            self._deliver(self._protocol.pong(event.seq), None, control=True)
        elif isinstance(event, ReplyFrame | ReplyErrorFrame):
            pending = self._requests.get(event.id)
            if pending is not None and not pending.done.is_set():
                pending.answer = event
                pending.done.set()
        elif isinstance(event, CancelFrame):
            running = self._calls.get(event.id)
            if running is not None:
                running.cancelled_by_client = True
                running.scope.cancel()
        elif isinstance(event, SubscribeFrame):
            self._on_subscribe(event)
        elif isinstance(event, UnsubscribeFrame):
            self._hub.registry.remove_from_topic(event.topic, self)
        elif isinstance(event, WatchFrame):
            self._on_watch(event)
        elif isinstance(event, UnwatchFrame):
            source = self._hub.presence
            if source is not None:
                source.remove_watcher(event.room, self)
        # PongFrame: the protocol recorded it; nothing else to do.

    def _answer_error(
        self, call_id: int, code: str, message: str = "", details: Any = None
    ) -> None:
        answer = self._error_message(call_id, code, message, details)
        if answer is not None:
            self._deliver(answer, None, control=True)

    def _error_message(
        self, call_id: int, code: str, message: str = "", details: Any = None
    ) -> Message | None:
        """The error answer to call ``call_id`` (None: the connection is closed)."""
        protocol = self._protocol
        try:
            return protocol.error(call_id, code, message, details)
        except ProtocolClosedError:
            return None
        except (FrameEncodeError, PeerLimitExceededError) as exc:
            logger.error(
                "connection %s: error details for call %d not sendable (%s); sent without",
                self.id,
                call_id,
                exc,
            )
            try:
                return protocol.error(call_id, code, _truncate(message, 1024))
            except ProtocolClosedError:
                return None

    def _result_message(self, call_id: int, name: str, value: Any) -> Message | None:
        """The answer to call ``call_id``: its result, or the error that it cannot
        be sent (None: the connection is closed)."""
        try:
            return self._protocol.result(call_id, value)
        except ProtocolClosedError:
            return None
        except PeerLimitExceededError as exc:
            return self._error_message(call_id, ErrorCode.TOO_LARGE, str(exc))
        except FrameEncodeError as exc:
            logger.error(
                "connection %s: the result of call %s cannot be encoded: %s",
                self.id,
                _shown(name),
                exc,
            )
            return self._error_message(
                call_id, ErrorCode.INTERNAL, "the result could not be encoded"
            )

    def _start_call(
        self, call_id: int, timeout: float | None, scope: trio.CancelScope | None = None
    ) -> _RunningCall | None:
        """Account for a new call; None (and an error answer) if it may not start.

        With ``scope`` (the call runner's), the runner times the call; otherwise
        the call gets a timer of its own."""
        if self._closing:
            return None
        if self._hub.closing:
            self._answer_error(call_id, ErrorCode.SHUTTING_DOWN, "the server is shutting down")
            return None
        limit = self._hub.settings.max_concurrent_calls
        if self._running_handlers() >= limit:
            self._answer_error(
                call_id, TOO_MANY_CALLS, f"{limit} calls already in progress on this connection"
            )
            return None
        running = _RunningCall(
            self._hub.settings.call_timeout if timeout is None else timeout,
            self._hub.timers if scope is None else None,
            scope,
        )
        self._calls[call_id] = running
        return running

    def _on_call(self, frame: CallFrame) -> None:
        spec = self._role_calls.get(frame.name)
        if spec is None:
            if frame.name in self._hub.settings.roles.declared_calls:
                self._answer_error(
                    frame.id,
                    ErrorCode.FORBIDDEN,
                    f"role {_shown(self.role)} may not call {_shown(frame.name)}",
                )
            else:
                self._answer_error(
                    frame.id, ErrorCode.UNKNOWN_CALL, f"no call named {_shown(frame.name)}"
                )
            return
        try:
            value = self._protocol.codec.decode_data(frame.data, spec.input)
        except PayloadDecodeError as exc:
            self._answer_error(frame.id, ErrorCode.BAD_INPUT, str(exc))
            return
        current = self._runner
        if current is None or current.idle:
            fresh = current is None
            runner = _CallRunner() if current is None else current
            running = self._start_call(frame.id, spec.timeout, runner.scope)
            if running is None:
                return
            runner.take(_CallJob(frame.id, spec, value, running), self._hub.timers)
            if fresh:
                self._runner = runner
                self._spawn(self._run_calls, runner)
            return
        running = self._start_call(frame.id, spec.timeout)
        if running is not None:
            self._spawn(self._run_call, frame.id, spec, value, running)

    async def _run_calls(self, runner: _CallRunner) -> None:
        """The connection's call runner (see :class:`_CallRunner`): runs the calls
        that come while it is idle, one after the other, in its one cancel scope,
        until one of them is cancelled (by the client, its timeout, or the
        connection's end), which ends the runner; the next call starts a new one."""
        job: _CallJob | None = None
        with runner.scope:
            while not self._closing:
                job = runner.job
                if job is None:
                    runner.idle = True
                    await runner.wakeup.wait()
                    continue
                runner.job = None
                answer = await self._call_result_or_error(job.call_id, job.spec, job.value)
                self._call_finished(job.call_id)
                job = None
                if runner.scope.cancel_called:
                    # Cancelled just as the handler returned: a write here would be
                    # cancelled too, so the writer sends the answer.
                    if answer is not None:
                        self._deliver(answer, None, control=True)
                    break
                await self._send_answer(answer)
        if self._runner is runner:
            self._runner = None
        if runner.current is not None:
            runner.finished(runner.current)
        job = job or runner.job
        if job is not None:  # cancelled: the call it ran, or the one handed to it
            answer = self._cancelled_answer(job.call_id, job.spec.name, job.running)
            self._call_finished(job.call_id)
            await self._send_answer(answer)

    async def _call_result_or_error(
        self, call_id: int, spec: CallSpec, value: Any
    ) -> Message | None:
        """Run the handler; its result, or the error it raised, as an answer.
        Cancellation goes through."""
        try:
            result = await spec.handler(self, value)
        except SocketError as exc:
            logger.debug(
                "connection %s: call %s answered error %r", self.id, _shown(spec.name), exc.code
            )
            return self._error_message(
                call_id, exc.code or ErrorCode.APPLICATION_ERROR, exc.message, exc.details
            )
        except Exception:
            logger.exception("connection %s: call %s failed", self.id, _shown(spec.name))
            return self._error_message(call_id, ErrorCode.INTERNAL, "internal error")
        return self._result_message(call_id, spec.name, result)

    async def _send_answer(self, answer: Message | None) -> None:
        """Queue an answer; write it from this task when no other task writes."""
        if (
            answer is not None
            and self._deliver_quietly(answer)
            and not self._sending
            and not self._closing
        ):
            await self._send_queued()

    async def _run_call(
        self, call_id: int, spec: CallSpec, value: Any, running: _RunningCall
    ) -> None:
        """A call that came while the runner was busy: a task and a cancel scope of
        its own."""
        answer: Message | None = None
        try:
            with running.scope:
                answer = await self._call_result_or_error(call_id, spec, value)
            if running.scope.cancelled_caught:
                answer = self._cancelled_answer(call_id, spec.name, running)
        finally:
            self._call_finished(call_id)
        await self._send_answer(answer)

    def _cancelled_answer(self, call_id: int, name: str, running: _RunningCall) -> Message | None:
        """The answer to a call whose handler was cancelled (None: the connection
        is closing, nobody waits for it)."""
        if self._closing:
            return None
        if running.cancelled_by_client:
            return self._error_message(call_id, ErrorCode.CANCELLED, "cancelled by the client")
        logger.info(
            "connection %s: call %s timed out after %g s",
            self.id,
            _shown(name),
            running.timeout,
        )
        return self._error_message(
            call_id, ErrorCode.TIMEOUT, f"no answer within {running.timeout:g} s"
        )

    def _on_event(self, frame: EventFrame) -> None:
        spec = self._role_events.get(frame.name)
        if spec is None:
            self.ignored_events += 1
            logger.debug(
                "connection %s: role %r may not send event %s: dropped",
                self.id,
                self.role,
                _shown(frame.name),
            )
            return
        try:
            value = self._protocol.codec.decode_data(frame.data, spec.data_type)
        except PayloadDecodeError as exc:
            self.ignored_events += 1
            logger.debug(
                "connection %s: event %s with bad data dropped: %s",
                self.id,
                _shown(frame.name),
                exc,
            )
            return
        handler = spec.handler
        if handler is None:
            return
        if spec.is_async:
            if self._closing:
                return
            if self._running_handlers() >= self._hub.settings.max_concurrent_calls:
                self.ignored_events += 1
                logger.warning(
                    "connection %s: event %s dropped: too many handlers running",
                    self.id,
                    _shown(frame.name),
                )
                return
            scope = trio.CancelScope()
            self._event_scopes[scope] = None
            self._spawn(self._run_event, spec, value, scope)
            return
        try:
            result = handler(self, value)
        except Exception:
            logger.exception(
                "connection %s: handler of event %s failed", self.id, _shown(frame.name)
            )
            return
        if inspect.iscoroutine(result):  # a plain function that returned a coroutine
            result.close()
            logger.error(
                "connection %s: handler of event %s returned a coroutine; declare it async",
                self.id,
                _shown(frame.name),
            )

    async def _run_event(self, spec: EventSpec, value: Any, scope: trio.CancelScope) -> None:
        try:
            with scope:
                assert spec.handler is not None
                await _maybe_await(spec.handler(self, value))
        except Exception:
            logger.exception(
                "connection %s: handler of event %s failed", self.id, _shown(spec.name)
            )
        finally:
            self._event_scopes.pop(scope, None)
            self._handler_done()

    def _on_subscribe(self, frame: SubscribeFrame) -> None:
        self._authorize(
            frame.id,
            frame.topic,
            _Authorization(
                "topic", "subscribe to", "authorize_topic", self._hub.settings.authorize_topic
            ),
            self._accept_subscribe,
        )

    def _on_watch(self, frame: WatchFrame) -> None:
        authorize = self._hub.settings.authorize_presence
        if authorize is None:
            authorize = _is_member
        self._authorize(
            frame.id,
            frame.room,
            _Authorization("room", "watch", "authorize_presence", authorize),
            self._accept_watch,
        )

    def _authorize(
        self,
        call_id: int,
        name: str,
        authorization: _Authorization,
        accept: Callable[[int, str], None],
    ) -> None:
        """Answer a subscribe or a watch: check the name, ask the hook (in a task
        of its own, under the call timeout, when it is not the membership
        check), accept or refuse."""
        try:
            check_name(name, authorization.kind)
        except Exception as exc:
            self._answer_error(call_id, ErrorCode.BAD_INPUT, str(exc))
            return
        hook = authorization.hook
        if hook is None:
            accept(call_id, name)
            return
        if hook is _is_member:
            if name in self._rooms:
                accept(call_id, name)
            else:
                self._refuse(call_id, name, authorization)
            return
        running = self._start_call(call_id, None)
        if running is None:
            return
        if self._deciding is None:
            self._deciding = {}
        self._deciding.setdefault((authorization.kind, name), []).append(running)
        self._spawn(self._run_authorization, call_id, name, authorization, accept, running)

    def _refuse(self, call_id: int, name: str, authorization: _Authorization) -> None:
        logger.debug("connection %s: may not %s %s", self.id, authorization.verb, _shown(name))
        self._answer_error(
            call_id, ErrorCode.FORBIDDEN, f"may not {authorization.verb} {_shown(name)}"
        )

    async def _run_authorization(
        self,
        call_id: int,
        name: str,
        authorization: _Authorization,
        accept: Callable[[int, str], None],
        running: _RunningCall,
    ) -> None:
        hook = authorization.hook
        assert hook is not None
        try:
            with running.scope:
                try:
                    allowed = await _maybe_await(hook(self, name))
                except SocketError as exc:
                    self._answer_error(
                        call_id, exc.code or ErrorCode.FORBIDDEN, exc.message, exc.details
                    )
                    return
                except Exception:
                    logger.exception(
                        "connection %s: %s failed for %s",
                        self.id,
                        authorization.hook_name,
                        _shown(name),
                    )
                    self._answer_error(call_id, ErrorCode.INTERNAL, "internal error")
                    return
                if allowed is True and not running.revoked:
                    accept(call_id, name)
                else:  # refused, or revoked while the hook decided
                    self._refuse(call_id, name, authorization)
                return
            if self._closing:
                return
            if running.cancelled_by_client:
                self._answer_error(call_id, ErrorCode.CANCELLED, "cancelled by the client")
            else:
                self._answer_error(
                    call_id, ErrorCode.TIMEOUT, f"no answer within {running.timeout:g} s"
                )
        finally:
            self._call_finished(call_id)
            assert self._deciding is not None
            deciding = self._deciding[authorization.kind, name]
            deciding.remove(running)
            if not deciding:
                del self._deciding[authorization.kind, name]

    def _accept_subscribe(self, call_id: int, topic: str) -> None:
        try:
            answer = self._protocol.accept_subscribe(call_id)
        except ProtocolClosedError:
            return
        if answer.subscribed and self._visible:
            self._hub.registry.add_to_topic(topic, self)
        self._deliver(answer.message, None, control=True)

    def _accept_watch(self, call_id: int, room: str) -> None:
        source = self._hub.presence
        if source is None:  # the server's cluster link is not running (yet, or any more)
            self._answer_error(call_id, ErrorCode.SHUTTING_DOWN, "room presence is not available")
            return
        rev, members = source.presence(room)
        try:
            answer = self._protocol.accept_watch(call_id, rev, members)
        except ProtocolClosedError:
            return
        except (FrameEncodeError, PeerLimitExceededError) as exc:
            logger.warning(
                "connection %s: the presence of %s cannot be sent: %s", self.id, _shown(room), exc
            )
            code = (
                ErrorCode.TOO_LARGE
                if isinstance(exc, PeerLimitExceededError)
                else ErrorCode.INTERNAL
            )
            self._answer_error(call_id, code, f"the room's presence cannot be sent: {exc}")
            return
        if answer.watching and self._visible:
            source.add_watcher(room, self)
        for message in answer.messages:
            self._deliver(message, None, control=True)


@attrs.frozen
class _Authorization:
    """What a subscribe or a watch is checked with."""

    kind: str
    """What the name is, for a bad-name error ("topic", "room")."""
    verb: str
    """What the client asked to do, for a refusal ("subscribe to", "watch")."""
    hook_name: str
    hook: Callable[[Connection, str], bool | Awaitable[bool]] | None


def _is_member(conn: Connection, room: str) -> bool:
    """The default room presence check: a connection may watch a room it is in."""
    return room in conn.rooms


def check_close_code(code: object) -> int:
    """``code``, if a server may send it.

    :raises InvalidArgumentError: 1004-1006, 1015, or outside 1000-1014 and 3000-4999.
    """
    if isinstance(code, bool) or not isinstance(code, int):
        raise InvalidArgumentError(f"close code must be an int: {code!r}")
    if code in (1004, 1005, 1006, 1015) or not (1000 <= code <= 1014 or 3000 <= code <= 4999):
        raise InvalidArgumentError(f"close code {code} cannot be sent")
    return int(code)


def fan_out(
    connections: Iterable[Connection],
    event: str,
    data: Any,
    *,
    key: str | None = None,
    topic: str | None = None,
) -> int:
    """Queue one event to many connections, encoded once per encoding.

    Connections not open are skipped, as are those whose client accepts smaller
    messages than the encoded event (logged). Returns how many it was queued to
    (replacing an older value of its key counts; a drop does not).

    :raises FrameEncodeError: ``data`` cannot be encoded.
    """
    frame = EventFrame(event, data, key, topic)
    return _queue_to_all(connections, frame, key, False, f"event {_shown(event)}")


def fan_out_presence(connections: Iterable[Connection], frame: PresenceDiffFrame) -> int:
    """Queue a room presence diff to the connections that watch the room,
    encoded once per encoding, as a control message (never dropped: a lost
    diff would leave the client's view wrong). A watcher whose client accepts
    smaller messages has its watch ended (``too_large``) instead: it is told,
    rather than left with a view that lacks the change. Returns how many it was
    queued to.

    :raises FrameEncodeError: a member's fields cannot be encoded.
    """
    room = frame.room
    watchers = [conn for conn in connections if conn._protocol.is_watching(room)]
    return _queue_to_all(watchers, frame, None, True, f"presence of {_shown(room)}")


def _queue_to_all(
    connections: Iterable[Connection],
    frame: EventFrame | PresenceDiffFrame,
    key: str | None,
    control: bool,
    what: str,
) -> int:
    encoded: dict[Codec, Message] = {}
    count = 0
    for conn in connections:
        if not conn.is_open:
            continue
        protocol = conn._protocol
        codec = protocol.codec
        message = encoded.get(codec)
        if message is None:
            message = codec.encode(frame)
            encoded[codec] = message
        limit = protocol.peer_max_message_size
        if limit and len(message) > limit:
            logger.warning(
                "connection %s: %s of %d bytes is over the client's limit; not sent",
                conn.id,
                what,
                len(message),
            )
            if isinstance(frame, PresenceDiffFrame):
                conn._end_watch(frame.room, ErrorCode.TOO_LARGE, "a change over its limit")
            continue
        if conn._deliver(message, key, control=control):
            count += 1
    return count


class SharedWriter:
    """Writes the connections' outboxes from one task, in turn, the way a plain
    send loop would, and hands a connection whose write stalls a task of its own.

    Why: a room emit to a thousand connections used to wake a thousand writer
    tasks, and each one's write (trio-websocket's ``send_message`` down to the
    socket) keeps a chain of a dozen short-lived objects alive across a
    scheduling turn. A thousand such chains at once set off Python's cyclic
    garbage collector over and over, and it then cost more than the writes.
    Written in turn from one task, a write's objects are gone before the next
    one starts.

    How: a connection with something to write (and no task writing for it) joins
    the ``ready`` queue once; the lead task takes connections from the queue and
    writes up to :data:`WRITES_PER_TURN` messages for each, queueing it again
    when more wait. A write that waits on a slow client would hold every other
    connection up, so a watch (one timer, ticking every ``stall_after`` seconds
    while the lead is busy) checks that turns go by: a turn still going at two
    ticks in a row (it took between one and two ``stall_after``) makes a new lead
    task take over the queue, and the stalled task stays with its connection as
    that connection's own writer until the client has caught up (nothing left
    to write), when the connection comes back to the shared writer. A one-off
    hiccup therefore costs a task for a moment, and a client that stays slow
    keeps its own writer, as every connection had before.

    The tasks run in the server's nursery (:meth:`run`).
    """

    WRITES_PER_TURN = 16
    """The most messages written for one connection before the next one's turn."""

    def __init__(self, timers: Timers, *, stall_after: float = 0.01) -> None:
        self.stall_after = stall_after
        self._timers = timers
        self._ready: collections.deque[Connection] = collections.deque()
        self._wakeup = Signal()
        self._idle = False
        self._lead = 0
        """Which lead task is current (each gets the next number)."""
        self._lead_scope: trio.CancelScope | None = None
        self._busy_with: Connection | None = None
        self._turns = 0
        """Turns taken so far (the watch's measure of progress)."""
        self._watched = 0
        """The turn the watch saw going at its last tick (0: none)."""
        self._watching = False
        self._nursery: trio.Nursery | None = None
        self.stalls = 0
        """How many times a connection was handed a writer of its own."""

    def want(self, conn: Connection) -> None:
        """``conn`` has messages to write: queue it (once) for the lead task."""
        self._ready.append(conn)
        if self._idle:
            self._idle = False
            self._wakeup.set()
        if not self._watching:
            self._watching = True
            self._timers.add(trio.current_time() + self.stall_after, self._watch)

    async def run(self, nursery: trio.Nursery) -> None:
        """Be the first lead task; later ones start in ``nursery``.

        Cancellation: the lead stops; a write it was doing is cut (the server
        cancels it only once its connections are closed or being dropped).
        """
        self._nursery = nursery
        await self._write_in_turn(self._lead)

    async def _write_in_turn(self, lead: int) -> None:
        """A lead task: take turns writing for the connections in the queue, until
        a newer lead took over (this one stalled: it goes on as the connection's
        own writer, in this task's cancel scope) or the server exits."""
        ready = self._ready
        with trio.CancelScope() as scope:
            self._lead_scope = scope
            while True:
                if not ready:
                    self._idle = True
                    await self._wakeup.wait()
                    continue
                conn = ready.popleft()
                conn._write_wanted = False
                if conn._closing or conn._sending or conn._own_writer is not None:
                    continue  # its close, or the task writing for it, takes the rest
                if not conn._outbox:
                    continue
                self._busy_with = conn
                self._turns += 1
                try:
                    await conn._send_queued(self.WRITES_PER_TURN)
                    if lead != self._lead:  # stalled on conn: a new lead took over
                        await conn._write_alone()
                except Exception:
                    conn._write_failed()
                if lead != self._lead:
                    return
                self._busy_with = None
                if conn._outbox and not conn._closing and not conn._write_wanted:
                    conn._write_wanted = True
                    ready.append(conn)

    def _watch(self, now: float) -> float | None:
        """The stall watch (a timer): every ``stall_after`` while anything is
        being written or waits to be. A turn still going at two ticks in a row
        took too long: its connection keeps the task, and a new lead starts."""
        try:
            return self._check(now)
        except BaseException:
            self._watching = False  # the next want() starts a new watch
            raise

    def _check(self, now: float) -> float | None:
        conn = self._busy_with
        if conn is None:
            self._watched = 0
            if not self._ready:
                self._watching = False
                return None
            return now + self.stall_after
        if self._turns != self._watched:
            self._watched = self._turns
            return now + self.stall_after
        self._watched = 0
        self._busy_with = None
        self._lead += 1
        self.stalls += 1
        assert self._lead_scope is not None and self._nursery is not None
        conn._go_alone(self._lead_scope)
        logger.info(
            "connection %s: a write turn took over %g s (slow client); "
            "it gets a writer of its own until it catches up",
            conn.id,
            self.stall_after,
        )
        self._nursery.start_soon(self._write_in_turn, self._lead)
        if not self._ready:
            self._watching = False
            return None
        return now + self.stall_after


class ConnectionHub:
    """What a server's connections share: settings, the registry, ids, the shutdown
    flag, the timers."""

    def __init__(self, settings: ConnectionSettings, registry: LocalRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.serving: set[Connection] = set()
        """Every connection being run, visible or not yet."""
        self.closing = False
        """Set when the server starts shutting down: no new connections or calls."""
        self.server: Any = None
        """The :class:`SocketServer` (set by it)."""
        self.incarnation = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self.timers = Timers()
        """Every connection's heartbeat and every running call's timeout (its task
        runs in the server's nursery)."""
        self.writer = SharedWriter(self.timers)
        self.presence: RoomPresenceSource | None = None
        """Where watched rooms' presence comes from (set by the cluster layer)."""
        """What writes the connections' outboxes (its tasks run in the server's
        nursery)."""

    def adopt_node_id(self, node_id: int) -> None:
        """Name ``node_id`` in the ids of connections from now on (the mesh's)."""
        self.settings = attrs.evolve(self.settings, node_id=node_id)

    def new_connection_id(self) -> str:
        return f"{self.settings.node_id}.{self.incarnation}.{next(self._ids)}"

    def check_event(self, event: str) -> None:
        """:raises InvalidArgumentError: a bad or undeclared server-to-client event name."""
        check_name(event, "event name")
        events = self.settings.client_events
        if events is not None and event not in events:
            raise InvalidArgumentError(
                f"event {_shown(event)} is not declared in the server's client_events"
            )

    def request_output(self, name: str) -> Any:
        """The declared output type of the server-to-client request ``name``.

        :raises InvalidArgumentError: not declared in ``client_requests``.
        """
        check_name(name, "request name")
        requests = self.settings.client_requests
        if requests is None:
            return Any
        spec = requests.get(name)
        if spec is None:
            raise InvalidArgumentError(
                f"request {_shown(name)} is not declared in the server's client_requests"
            )
        return spec[1]

    async def run_connection(
        self,
        ws: WebSocketConnection,
        codec: Codec,
        *,
        stream: trio.abc.AsyncResource,
        role: str,
        user_id: str | None,
        client_id: str | None,
        context: Any,
        remote: str,
        nursery: trio.Nursery,
    ) -> Connection:
        """Run one accepted WebSocket as a connection until it is over; return it.

        ``nursery`` runs the connection's handlers (it must outlive the call);
        ``stream`` is what ``ws`` runs over (closed at once to abort it)."""
        conn = Connection(
            self,
            ws,
            codec,
            stream=stream,
            connection_id=self.new_connection_id(),
            role=role,
            user_id=user_id,
            client_id=client_id,
            context=context,
            remote=remote,
        )
        self.serving.add(conn)
        if self.closing:
            conn._end(DisconnectReason.SERVER_EXIT, CloseCode.GOING_AWAY)
        await conn._run(self.settings.handshake_timeout, nursery)
        return conn

    def supersede(self, conn: Connection) -> bool:
        """Close ``conn`` as ``superseded`` (4502): a newer connection of its client
        id took over. False if it was already ending."""
        return conn._end(DisconnectReason.SUPERSEDED, CloseCode.SUPERSEDED)

    def end_all(self, connections: Iterable[Connection], code: int) -> None:
        """Start closing ``connections`` as ``server_exit`` with ``code``."""
        for conn in connections:
            conn._end(DisconnectReason.SERVER_EXIT, code)
